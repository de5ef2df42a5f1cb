# Sourced by scripts/dev.sh and scripts/test.sh: make sure $VENV has wa-worker
# installed (editable) with the given extras, e.g. `ensure_venv test`.
# Checks for Python >= 3.11 first (`$PYTHON`, default python3), says what it is
# doing, fails when pip fails (its output is shown), and skips the install when
# pyproject.toml and the extras are unchanged since the last good one (a stamp
# file in the venv holds their hash).
VENV="${WA_VENV:-.venv}"

_venv_stamp_value() {
    # hash of what the install depends on: pyproject.toml, the extras, the interpreter
    {
        cat pyproject.toml
        printf '\nextras=%s\n' "$1"
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
    } | cksum | cut -d' ' -f1
}

ensure_venv() {
    local extras="${1:-}"
    local python="${PYTHON:-python3}"
    local stamp="$VENV/.wa-worker-install"
    if [ ! -x "$VENV/bin/python" ]; then
        if ! command -v "$python" >/dev/null 2>&1; then
            echo "error: $python not found; wa-worker needs Python 3.11 or newer" \
                "(e.g. apt install python3.11 python3.11-venv, brew install python@3.11)," \
                "or set PYTHON=/path/to/python3.11" >&2
            return 1
        fi
        local version
        version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "error: $python is Python $version; wa-worker needs Python 3.11 or newer" \
                "(e.g. apt install python3.11 python3.11-venv, brew install python@3.11)," \
                "then run again with PYTHON=python3.11" >&2
            return 1
        fi
        echo "creating $VENV (Python $version)..." >&2
        "$python" -m venv "$VENV" || {
            echo "error: could not create $VENV with $python (on Debian/Ubuntu: apt install python3-venv)" >&2
            return 1
        }
    fi
    local want
    want="$(_venv_stamp_value "$extras")"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local target="."
    [ -n "$extras" ] && target=".[$extras]"
    echo "installing wa-worker${extras:+ [$extras]} into $VENV (first run ~30 s)..." >&2
    local log
    log="$(mktemp)"
    if ! "$VENV/bin/python" -m pip install -q -e "$target" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log" "$stamp"
        echo "error: pip install failed (output above); fix it and run again" >&2
        return 1
    fi
    grep -v "^WARNING: Location" "$log" >&2 || true  # only pip's own noise is dropped
    rm -f "$log"
    # fail early and clearly when the install is not importable (e.g. libmagic missing:
    # see docs/dev-mode.md)
    "$VENV/bin/python" -c "import wa_worker.daemon, neonize" || return 1
    echo "$want" >"$stamp"
}
