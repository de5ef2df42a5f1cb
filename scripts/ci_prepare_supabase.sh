#!/usr/bin/env bash
# Installs what tests/test_supabase_kit.py needs, on a fresh machine or CI:
#   * PostgreSQL 15 server binaries (Debian package postgresql-15) and PgBouncer (pgbouncer),
#     only if missing;
#   * Deno and postgres.js from the npm registry into supabase/.test-cache/
#     (gitignored), only if missing.
# Idempotent and quiet: prints nothing on success, a short message on failure.
# Keep the npm versions in step with NPM_PACKAGES in tests/pg_helpers.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${WA_TEST_SUPABASE_CACHE:-$ROOT/supabase/.test-cache}"
NPM_PACKAGES=(deno@2.9.6 postgres@3.4.9)
PG_BIN="${WA_TEST_PG_BINDIR:-/usr/lib/postgresql/15/bin}"

have_pg() {
    [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/postgres" ] && [ -x "$PG_BIN/psql" ]
}

have_pgbouncer() {
    command -v pgbouncer >/dev/null 2>&1
}

can_apt() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
}

if ! have_pg && ! can_apt; then
    echo "ci_prepare_supabase: PostgreSQL 15 missing and cannot apt-get install it" >&2
    exit 1
fi
need=()
have_pg || need+=(postgresql-15)
# tests/test_neonize_pg.py (sessions through a transaction pooler); without root it only skips that test
have_pgbouncer || ! can_apt || need+=(pgbouncer)
if [ "${#need[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    log="$(mktemp)"
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        echo "ci_prepare_supabase: apt-get install ${need[*]} failed" >&2
        exit 1
    fi
    rm -f "$log"
fi

have_deno() {
    [ -d "$CACHE/node_modules/postgres" ] && {
        [ -x "$CACHE/node_modules/@deno/linux-x64-glibc/deno" ] ||
        [ -x "$CACHE/node_modules/@deno/linux-arm64-glibc/deno" ] ||
        [ -x "$CACHE/node_modules/.bin/deno" ]
    }
}

if ! have_deno; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "ci_prepare_supabase: npm not found (needed to install Deno)" >&2
        exit 1
    fi
    mkdir -p "$CACHE"
    [ -f "$CACHE/package.json" ] || echo '{"private": true}' >"$CACHE/package.json"
    if ! out="$(npm install --prefix "$CACHE" --no-audit --no-fund --no-save --loglevel=error \
                "${NPM_PACKAGES[@]}" 2>&1)"; then
        printf '%s\n' "$out" | tail -n 20 >&2
        echo "ci_prepare_supabase: npm install ${NPM_PACKAGES[*]} failed" >&2
        exit 1
    fi
    have_deno || { echo "ci_prepare_supabase: Deno binary missing after npm install" >&2; exit 1; }
fi
