# Sourced by scripts/test.sh: the tools some tests need (PostgreSQL 15 + Deno for the
# Supabase kit, chromium for the dev page, ffmpeg for voice notes, promtool for the
# Prometheus alert rules).
#   * as root with apt-get (CI): installed when missing;
#   * otherwise (a developer without root): each missing tool prints ONE line saying
#     which tests it skips, and the run goes on (the tests skip themselves);
#   * under CI=true nothing is skipped: a tool that cannot be installed fails the run.
# WA_TEST_PG_BINDIR overrides where PostgreSQL is looked for (as in tests/pg_helpers.py).

_in_ci() { local ci="${CI:-}"; case "${ci,,}" in 1|true|yes) return 0;; esac; return 1; }
_can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# $1 tool, $2 what it is for, $3 how to get it
_missing() {
    if _in_ci; then
        echo "test.sh: $1 is missing and could not be installed; CI=true runs every test: $3" >&2
        return 1
    fi
    echo "test.sh: skipping $2: $1 not installed ($3)" >&2
}

_apt_install() {
    local pkg="$1" log
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$pkg"; } >"$log" 2>&1 \
        || { tail -n 20 "$log" >&2; echo "test.sh: could not install $pkg" >&2; }
    rm -f "$log"
}

prepare_test_tools() {
    local out
    if ! out="$(bash scripts/ci_prepare_supabase.sh 2>&1)"; then
        _missing "PostgreSQL 15 or Deno" "the Supabase kit tests (tests/test_supabase_*.py)" \
            "${out##*$'\n'}; as root, scripts/ci_prepare_supabase.sh installs them" || return 1
    fi
    if ! command -v chromium >/dev/null 2>&1; then
        _can_apt && _apt_install chromium
        command -v chromium >/dev/null 2>&1 \
            || _missing chromium "the dev page's browser test (tests/test_dev_page_browser.py)" \
                "apt-get install chromium" || return 1
    fi
    if ! command -v ffmpeg >/dev/null 2>&1; then
        _can_apt && _apt_install ffmpeg
        command -v ffmpeg >/dev/null 2>&1 \
            || _missing ffmpeg "the voice-note conversion tests (tests/test_media.py)" \
                "apt-get install ffmpeg, or brew install ffmpeg" || return 1
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        _can_apt && _apt_install prometheus
        command -v promtool >/dev/null 2>&1 \
            || _missing promtool "the alert-rule check (tests/test_metrics.py::test_alert_rules_pass_promtool)" \
                "apt-get install prometheus" || return 1
    fi
    return 0
}
