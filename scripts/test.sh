#!/usr/bin/env bash
# The test command (README "Run the tests", and what .ci/run executes).
# Installs what the suite needs, on a fresh machine too:
#   * a virtualenv (.venv, or $WA_VENV) with wa-worker and its [test] extras;
#   * PostgreSQL 15 + Deno for the Supabase kit (scripts/ci_prepare_supabase.sh);
#   * Debian's chromium for the dev page's browser test, ffmpeg for the voice-note
#     tests (tests/test_media.py) and promtool for the alert rules, when run as root.
# Without root, a missing tool prints one line naming the tests it skips; under CI=true
# a missing tool fails the run (scripts/_test_prereqs.sh).
# Then ruff and mypy (zero findings, or the run fails) and pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/_venv.sh
ensure_venv test

source scripts/_test_prereqs.sh
prepare_test_tools

# lint and types first: any finding fails the run (config in pyproject.toml)
"$VENV/bin/ruff" check wa_worker tests scripts
"$VENV/bin/mypy"

exec "$VENV/bin/python" -m pytest "$@"
