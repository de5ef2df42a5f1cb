#!/usr/bin/env bash
# The test command (README "Run the tests", and what .ci/run executes).
# Installs what the suite needs, on a fresh machine too:
#   * a virtualenv (.venv, or $WA_VENV) with wa-worker and its [test] extras;
#   * PostgreSQL 15 + Deno for the Supabase kit (scripts/ci_prepare_supabase.sh);
#   * Debian's chromium for the dev page's browser test, and ffmpeg for the voice-note
#     tests (tests/test_media.py), when run as root.
# Then ruff and mypy (zero findings, or the run fails) and pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source scripts/_venv.sh
ensure_venv test

bash scripts/ci_prepare_supabase.sh

if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1 \
        || { tail -n 20 "$log" >&2; echo "test.sh: could not install chromium" >&2; }
    rm -f "$log"
fi

if ! command -v ffmpeg >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg; } >"$log" 2>&1 \
        || { tail -n 20 "$log" >&2; echo "test.sh: could not install ffmpeg (the voice-note tests fail under CI=true without it)" >&2; }
    rm -f "$log"
fi

# lint and types first: any finding fails the run (config in pyproject.toml)
"$VENV/bin/ruff" check wa_worker tests scripts
"$VENV/bin/mypy"

exec "$VENV/bin/python" -m pytest "$@"
