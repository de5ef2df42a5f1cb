# Sourced by scripts/dev.sh and scripts/test.sh: make sure $VENV has wa-worker
# installed (editable) with the given extras, e.g. `ensure_venv test`.
VENV="${WA_VENV:-.venv}"
ensure_venv() {
    local extras="${1:-}"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    local target="."
    [ -n "$extras" ] && target=".[$extras]"
    "$VENV/bin/python" -m pip install -q -e "$target" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import wa_worker.daemon, neonize" # fail early and clearly
}
