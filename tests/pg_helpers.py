"""Throwaway PostgreSQL 15 server and the Supabase-kit fixtures for tests.

Import the fixtures you need into a test module (or list this module in the
root conftest's ``pytest_plugins``)::

    from pg_helpers import pg_server, wa_db, clean_wa_db, edge_function

* ``pg_server`` (session) -> :class:`PgServer`: a real PostgreSQL 15 on
  127.0.0.1 with a random port, temp data dir, ``trust`` auth, user
  ``postgres``; ``.dsn()``, ``.psql()``, ``.query()``, ``.create_database()``.
* ``wa_db`` (session) -> :class:`WaDb`: a fresh database with
  ``supabase/migrations/*.sql`` applied, plus helpers to insert instances
  and outbound rows and read every table back.
* ``clean_wa_db`` (function) -> the same :class:`WaDb`, emptied first.
* :class:`PgBouncer` - PgBouncer (transaction mode) in front of one database.
* ``edge_function`` (session) -> :class:`EdgeFunction`: the real
  ``supabase/functions/worker-proxy`` under Deno (npm ``deno`` package,
  installed into ``supabase/.test-cache``) against ``wa_db``;
  ``.base_url``, ``.secret``, ``.request()``, ``.worker_env()``.

Servers are process-wide singletons: importing the fixtures into several
modules starts one PostgreSQL and one Deno. Without PostgreSQL binaries (or
npm for Deno) the fixtures skip, except under ``CI=true`` where they fail.

No Python PostgreSQL driver is needed: SQL goes through ``psql``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.proc import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
SUPABASE_DIR = REPO_ROOT / "supabase"
MIGRATIONS_DIR = SUPABASE_DIR / "migrations"
FUNCTION_DIR = SUPABASE_DIR / "functions" / "worker-proxy"
CACHE_DIR = Path(os.environ.get("WA_TEST_SUPABASE_CACHE", SUPABASE_DIR / ".test-cache"))

PG_MAJOR = 15
# What the CI prep script installs too (scripts/ci_prepare_supabase.sh).
NPM_PACKAGES = ("deno@2.9.6", "postgres@3.4.9")

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI: CI must have everything installed."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: install it, see scripts/ci_prepare_supabase.sh)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------- PostgreSQL


def find_pg_bindir() -> Path | None:
    """A directory holding initdb, postgres and psql of PostgreSQL 15."""
    candidates: list[Path] = []
    if os.environ.get("WA_TEST_PG_BINDIR"):
        candidates.append(Path(os.environ["WA_TEST_PG_BINDIR"]))
    candidates.append(Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin"))
    for tool in ("initdb", "pg_ctl", "postgres"):
        found = shutil.which(tool)
        if found:
            candidates.append(Path(found).resolve().parent)
    # Another Debian major (13+) runs the migration too; newest first.
    others = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    candidates += [p for p in others if p.parent.name.isdigit() and int(p.parent.name) >= 13]
    for bindir in candidates:
        if all((bindir / t).is_file() for t in ("initdb", "postgres", "psql")):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The environment minus PG* variables that could redirect psql."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def sql_literal(value: Any) -> str:
    """A SQL literal for value (tests only: None, bool, numbers, str, dict/list as jsonb)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list)):
        return sql_literal(json.dumps(value)) + "::jsonb"
    text = str(value)
    if "\x00" in text:
        raise ValueError("NUL byte in SQL literal")
    return "'" + text.replace("'", "''") + "'"


class PgServer:
    """A PostgreSQL server owned by the test run (started unprivileged when root)."""

    def __init__(self, bindir: Path, max_connections: int = 50) -> None:
        self.bindir = bindir
        self.max_connections = max_connections
        self.host = "127.0.0.1"
        self.port = 0
        self.user = "postgres"
        self.base_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._run_as: pwd.struct_passwd | None = None

    # -- lifecycle
    def _os_user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists")

    def _popen_kwargs(self) -> dict[str, Any]:
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "postgres.log"

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def start(self, timeout: float = 30.0) -> None:
        self._run_as = self._os_user()
        self.base_dir = Path(tempfile.mkdtemp(prefix="wa-pg-"))
        if self._run_as is not None:
            os.chown(self.base_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        data = self.base_dir / "data"
        init = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust",
             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            capture_output=True, env=_clean_env(), cwd=self.base_dir, timeout=120,
            **self._popen_kwargs(),
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.decode(errors='replace')[-2000:]}")
        last_error = ""
        for _attempt in range(3):
            self.port = _free_port()
            with open(self.log_path, "ab") as log:
                if self._run_as is not None:
                    os.chown(self.log_path, self._run_as.pw_uid, self._run_as.pw_gid)
                self.proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                     "-k", str(self.base_dir), "-c", "listen_addresses=127.0.0.1",
                     "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                     "-c", f"max_connections={self.max_connections}", "-c", "shared_buffers=32MB"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=_clean_env(), cwd=self.base_dir, start_new_session=True,
                    **self._popen_kwargs(),
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                probe = subprocess.run(
                    self._psql_argv("postgres") + ["-c", "select 1"],
                    capture_output=True, env=_clean_env(), timeout=10,
                )
                if probe.returncode == 0:
                    return
                time.sleep(0.1)
            last_error = self.log_tail()
            self._stop_proc()
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start: {last_error}")

    def _stop_proc(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, 15, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown

    def stop(self) -> None:
        self._stop_proc()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    # -- access
    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def _psql_argv(self, dbname: str) -> list[str]:
        return [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", dbname]

    def psql(self, sql: str, dbname: str = "postgres", check: bool = True,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a SQL script (fed on stdin, stops at the first error)."""
        env = _clean_env()
        env["PGOPTIONS"] = "-c client_min_messages=warning"
        result = subprocess.run(self._psql_argv(dbname), input=sql, capture_output=True,
                                text=True, env=env, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}\n--- SQL ---\n{sql[:2000]}")
        return result

    def query(self, sql: str, dbname: str = "postgres") -> list[dict[str, Any]]:
        """Rows of one SELECT (or INSERT/UPDATE/DELETE ... RETURNING) as dicts."""
        wrapped = (f"with q as (\n{sql.strip().rstrip(';')}\n)\n"
                   "select coalesce(json_agg(q), '[]'::json) from q;")
        out = self.psql(wrapped, dbname).stdout.strip()
        return json.loads(out) if out else []

    def scalar(self, sql: str, dbname: str = "postgres") -> Any:
        rows = self.query(sql, dbname)
        return next(iter(rows[0].values())) if rows else None

    def create_database(self, name: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"bad database name {name!r}")
        self.psql(f"drop database if exists {name} with (force);")
        self.psql(f"create database {name};")
        return self.dsn(name)


# Process-wide singletons, refcounted so that fixtures imported into several
# modules share one server and the last user stops it.
_lock = threading.Lock()
_shared: dict[str, Any] = {}
_refs: dict[str, int] = {}


@contextlib.contextmanager
def _shared_resource(key: str, start, stop) -> Iterator[Any]:
    with _lock:
        if key not in _shared:
            _shared[key] = start()
            _refs[key] = 0
        _refs[key] += 1
        value = _shared[key]
    try:
        yield value
    finally:
        with _lock:
            _refs[key] -= 1
            if _refs[key] == 0:
                del _shared[key]
                stop(value)


def start_pg_server() -> PgServer:
    bindir = find_pg_bindir()
    if bindir is None:
        unavailable(f"PostgreSQL {PG_MAJOR} binaries (initdb, postgres, psql) not found")
    server = PgServer(bindir)
    server.start()
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A running PostgreSQL 15 server for the whole test session."""
    with _shared_resource("pg_server", start_pg_server, PgServer.stop) as server:
        yield server


# --------------------------------------------------------------- PgBouncer


class PgBouncer:
    """PgBouncer in transaction mode in front of ``server``'s database ``dbname`` (as the
    server's OS user when root); ``url()`` is a DATABASE_URL for the worker."""

    def __init__(self, server: PgServer, dbname: str, *, pool_size: int = 10, client_idle_timeout_s: int = 0) -> None:
        self.server, self.dbname = server, dbname
        self.pool_size, self.client_idle_timeout_s = pool_size, client_idle_timeout_s
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="wa-pgb-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("pgbouncer")
        if binary is None:
            unavailable("pgbouncer not found (Debian package pgbouncer)")
        assert binary is not None
        self.port = _free_port()
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
{self.dbname} = host=127.0.0.1 port={self.server.port} dbname={self.dbname}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
admin_users = {self.server.user}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 5000
client_idle_timeout = {self.client_idle_timeout_s}
ignore_startup_parameters = extra_float_digits,options
logfile = {self.dir}/pgbouncer.log
""")
        (self.dir / "users.txt").write_text(f'"{self.server.user}" ""\n')
        run_as = self.server._os_user()
        kwargs: dict[str, Any] = {}
        if run_as is not None:  # pgbouncer refuses to run as root
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
            kwargs = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen([binary, str(self.dir / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_clean_env(),
                                     start_new_session=True, **kwargs)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        log = self.log_tail()
        self.stop()
        raise RuntimeError(f"pgbouncer did not start: {log}")

    def url(self) -> str:
        """lib/pq needs ``binary_parameters=yes`` behind a transaction pooler (docs/fleet.md)."""
        return (f"postgresql://{self.server.user}@127.0.0.1:{self.port}/{self.dbname}"
                "?sslmode=disable&binary_parameters=yes")

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "pgbouncer.log").read_text(errors="replace")[-chars:]
        return ""

    def client_connections(self) -> int:
        return pgbouncer_client_connections(self.server, self.port, self.dbname)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


def pgbouncer_client_connections(server: PgServer, port: int, dbname: str) -> int:
    """Client connections the PgBouncer on ``port`` holds for ``dbname`` (SHOW POOLS:
    cl_active + cl_waiting), asked through its admin console."""
    out = subprocess.run([str(server.bindir / "psql"), "-X", "-A", "-t", "-F", ",", "-h", "127.0.0.1",
                          "-p", str(port), "-U", server.user, "-d", "pgbouncer", "-c", "SHOW POOLS"],
                         capture_output=True, text=True, timeout=10, env=_clean_env())
    total = 0
    for line in out.stdout.splitlines():
        cols = line.split(",")
        if len(cols) > 3 and cols[0] == dbname:
            total += int(cols[2]) + int(cols[3])
    return total


# --------------------------------------------------------- wa-worker schema


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


class WaDb:
    """A database with the wa-worker migration applied, plus row helpers."""

    TABLES = ("wa_inbound", "wa_outbound", "wa_instances")

    def __init__(self, server: PgServer, dbname: str) -> None:
        self.server = server
        self.dbname = dbname

    @property
    def dsn(self) -> str:
        return self.server.dsn(self.dbname)

    def psql(self, sql: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.server.psql(sql, self.dbname, check=check)

    def query(self, sql: str) -> list[dict[str, Any]]:
        return self.server.query(sql, self.dbname)

    def scalar(self, sql: str) -> Any:
        return self.server.scalar(sql, self.dbname)

    def apply_migrations(self) -> None:
        for path in migration_files():
            self.psql(path.read_text())

    def reset(self) -> None:
        self.psql("truncate " + ", ".join(f"public.{t}" for t in self.TABLES) + " cascade;\n"
                  # the fleet's workers (20261128000000_wa_worker_leases.sql), where migrated
                  "do $$ begin if to_regclass('public.wa_workers') is not null then "
                  "truncate public.wa_workers; end if; end $$;")

    # -- instances
    def insert_instance(self, instance_id: str, status: str = "DISCONNECTED", priority: int = 0,
                        **columns: Any) -> dict[str, Any]:
        cols = {"id": instance_id, "status": status, "priority": priority, **columns}
        names = ", ".join(f'"{c}"' for c in cols)
        values = ", ".join(sql_literal(v) for v in cols.values())
        return self.query(f"insert into public.wa_instances ({names}) values ({values}) returning *")[0]

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        rows = self.query(f"select * from public.wa_instances where id = {sql_literal(instance_id)}")
        return rows[0] if rows else None

    def instances(self) -> list[dict[str, Any]]:
        return self.query("select * from public.wa_instances order by id")

    # -- outbound
    def insert_outbound(self, instance_id: str, to: str, body: str, *, status: str = "queued",
                        created_ago_s: float | None = None, claimed_ago_s: float | None = None,
                        **columns: Any) -> str:
        """Queue a message (as the SaaS would); returns its uuid.

        ``created_ago_s`` / ``claimed_ago_s`` backdate created_at / claimed_at.
        """
        cols: dict[str, str] = {"instance_id": sql_literal(instance_id), "to": sql_literal(to),
                                "body": sql_literal(body), "status": sql_literal(status)}
        if created_ago_s is not None:
            cols["created_at"] = f"now() - make_interval(secs => {float(created_ago_s)})"
        if claimed_ago_s is not None:
            cols["claimed_at"] = f"now() - make_interval(secs => {float(claimed_ago_s)})"
        for name, value in columns.items():
            cols[name] = sql_literal(value)
        names = ", ".join(f'"{c}"' for c in cols)
        return self.scalar(f"insert into public.wa_outbound ({names}) values ({', '.join(cols.values())}) returning id")

    def outbound(self, message_id: str) -> dict[str, Any] | None:
        rows = self.query(f"select * from public.wa_outbound where id = {sql_literal(message_id)}::uuid")
        return rows[0] if rows else None

    def outbound_rows(self, instance_id: str | None = None) -> list[dict[str, Any]]:
        where = f"where instance_id = {sql_literal(instance_id)}" if instance_id else ""
        return self.query(f"select * from public.wa_outbound {where} order by created_at, seq")

    # -- inbound
    def inbound_rows(self, instance_id: str | None = None) -> list[dict[str, Any]]:
        where = f"where instance_id = {sql_literal(instance_id)}" if instance_id else ""
        return self.query(f"select * from public.wa_inbound {where} order by id")


def start_wa_db(server: PgServer) -> WaDb:
    db = WaDb(server, f"wa_worker_test_{os.getpid()}")
    server.create_database(db.dbname)
    db.apply_migrations()
    return db


@pytest.fixture(scope="session")
def wa_db(pg_server: PgServer) -> Iterator[WaDb]:
    """A database with the wa-worker migration applied (shared by the session)."""
    with _shared_resource("wa_db", lambda: start_wa_db(pg_server), lambda db: None) as db:
        yield db


@pytest.fixture
def clean_wa_db(wa_db: WaDb) -> WaDb:
    """``wa_db`` with all three tables emptied."""
    wa_db.reset()
    return wa_db


# ------------------------------------------------------------ Deno function


def _deno_binary(cache_dir: Path) -> Path | None:
    for candidate in (cache_dir / "node_modules" / "@deno" / "linux-x64-glibc" / "deno",
                      cache_dir / "node_modules" / "@deno" / "linux-arm64-glibc" / "deno",
                      cache_dir / "node_modules" / ".bin" / "deno"):
        if candidate.exists() and os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_deno_toolchain(cache_dir: Path = CACHE_DIR) -> Path:
    """The Deno binary, after ``npm install deno postgres`` into cache_dir if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deno = _deno_binary(cache_dir)
        if deno is None or not (cache_dir / "node_modules" / "postgres" / "package.json").exists():
            npm = shutil.which("npm")
            if npm is None:
                unavailable("npm not found: cannot install Deno from the npm registry")
            if not (cache_dir / "package.json").exists():
                (cache_dir / "package.json").write_text('{"private": true}\n')
            result = subprocess.run(
                [npm, "install", "--prefix", str(cache_dir), "--no-audit", "--no-fund", "--no-save",
                 "--loglevel=error", *NPM_PACKAGES],
                cwd=cache_dir, capture_output=True, text=True, timeout=600,
            )
            deno = _deno_binary(cache_dir)
            if result.returncode != 0 or deno is None:
                unavailable(f"npm install {' '.join(NPM_PACKAGES)} failed: {result.stderr[-1500:]}")
    assert deno is not None
    return deno


def deno_env(cache_dir: Path = CACHE_DIR) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DENO_", "PG"))}
    env.update(DENO_DIR=str(cache_dir / "deno-dir"), DENO_NO_UPDATE_CHECK="1",
               DENO_NO_PROMPT="1", NO_COLOR="1")
    return env


def stage_function(cache_dir: Path = CACHE_DIR) -> Path:
    """Copy the function under cache_dir, beside the npm node_modules it resolves."""
    staged = cache_dir / "runs" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}" / "worker-proxy"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FUNCTION_DIR, staged, ignore=shutil.ignore_patterns("node_modules", "deno.lock"))
    return staged


class EdgeFunction:
    """supabase/functions/worker-proxy running under Deno on a loopback port."""

    def __init__(self, db_url: str, secret: str | None = None, *, lease_seconds: int | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.db_url = db_url
        self.secret = secret or "test-secret-" + uuid.uuid4().hex
        self.lease_seconds = lease_seconds
        self.extra_env = extra_env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.staged: Path | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """EDGE_BASE_URL for the worker (Supabase's URL form)."""
        return f"{self.origin}/functions/v1/worker-proxy"

    @property
    def log_path(self) -> Path:
        assert self.staged is not None
        return self.staged.parent / "deno.log"

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError, AssertionError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def worker_env(self) -> dict[str, str]:
        """Environment variables pointing a wa-worker at this function."""
        return {"EDGE_BASE_URL": self.base_url, "WORKER_SECRET": self.secret}

    def start(self, timeout: float = 60.0) -> None:
        deno = ensure_deno_toolchain()
        self.staged = stage_function()
        env = deno_env()
        env.update(SUPABASE_DB_URL=self.db_url, WORKER_SECRET=self.secret,
                   WORKER_PROXY_PORT="0", WORKER_PROXY_HOSTNAME="127.0.0.1", **self.extra_env)
        if self.lease_seconds is not None:
            env["CLAIM_LEASE_SECONDS"] = str(self.lease_seconds)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(deno), "run", "--no-lock", "--allow-net", "--allow-env", "--allow-read",
                 "--allow-sys", str(self.staged / "index.ts")],
                cwd=self.staged, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", self.log_tail(100_000))
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        log = self.log_tail()
        self.stop()
        raise RuntimeError(f"worker-proxy did not start under Deno: {log}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, 10)
        if self.staged is not None:
            shutil.rmtree(self.staged.parent, ignore_errors=True)

    # -- client helpers
    def headers(self, secret: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret if secret is None else secret}"}

    def request(self, method: str, endpoint: str, *, json: Any = None, params: dict[str, Any] | None = None,
                secret: str | None = None, headers: dict[str, str] | None = None,
                content: bytes | str | None = None, timeout: float = 15.0):
        """One HTTP call to ``<base_url>/<endpoint>`` with the bearer secret; an httpx.Response."""
        import httpx

        hdrs = self.headers(secret)
        hdrs.update(headers or {})
        return httpx.request(method, f"{self.base_url}/{endpoint.lstrip('/')}", json=json, params=params,
                             headers=hdrs, content=content, timeout=timeout)


def start_edge_function(db: WaDb) -> EdgeFunction:
    fn = EdgeFunction(db.dsn)
    fn.start()
    return fn


@pytest.fixture(scope="session")
def edge_function(wa_db: WaDb) -> Iterator[EdgeFunction]:
    """The worker-proxy function under Deno against ``wa_db`` (5-minute lease)."""
    with _shared_resource("edge_function", lambda: start_edge_function(wa_db), EdgeFunction.stop) as fn:
        yield fn
