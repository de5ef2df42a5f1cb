"""Logging set-up: one line per record, and secrets scrubbed from every record."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactFilter(logging.Filter):
    """Replace every known secret in a record's final text by ``***``.

    The code never logs the secret on purpose; this is the belt to those
    braces (an exception text echoing a header, a URL with credentials...).
    """

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        text = record.getMessage()
        exc_text = None
        if record.exc_info:
            exc_text = logging.Formatter().formatException(record.exc_info)
        changed = False
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
                changed = True
            if exc_text and s in exc_text:
                exc_text = exc_text.replace(s, "***")
                changed = True
        if changed:
            record.msg, record.args = text, None
            if exc_text is not None:
                record.exc_info, record.exc_text = None, exc_text
        return True


def setup_logging(level: str, secrets: list[str]) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RedactFilter(secrets))
    root.addHandler(handler)
    root.setLevel(level)
    # chatty libraries: keep them at WARNING unless we debug
    for name in ("httpx", "httpcore", "aiohttp.access", "whatsmeow", "Whatsmeow", "neonize"):
        logging.getLogger(name).setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
