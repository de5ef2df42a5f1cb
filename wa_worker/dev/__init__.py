"""``wa-worker dev``: a reference edge proxy, a web page and CLI helpers for local development.

See docs/dev-mode.md.
"""
