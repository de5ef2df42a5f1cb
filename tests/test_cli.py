"""The ``wa-worker`` command line (the real installed command) and configuration messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from wa_worker.config import DESCRIPTIONS, ConfigError, LogLevel, Settings, load_settings

WA_WORKER = shutil.which("wa-worker", path=str(Path(sys.executable).parent)) or "wa-worker"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WA_WORKER, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_help_lists_the_commands_and_every_variable() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for command in ("run", "dev", "doctor"):
        assert f"\n  {command} " in done.stdout
    for name, field in Settings.model_fields.items():
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(name + " "))
        if not field.is_required():
            assert str(field.get_default()).split(".")[-1].lower() in line.lower() or "(empty)" in line
    assert "/data/auth" in done.stdout and "required" in done.stdout


def test_version_comes_from_the_package_metadata() -> None:
    done = _run("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"wa-worker {metadata.version('wa-worker')}"


@pytest.mark.parametrize("args", [["--port", "4000"], ["serve"], ["run", "extra"]])
def test_unknown_arguments_are_an_error_with_a_usage_line(args: list[str], tmp_path: Path) -> None:
    # a valid environment: the old command started the daemon here, ignoring the arguments
    env = {"EDGE_BASE_URL": "http://127.0.0.1:9", "WORKER_SECRET": "0123456789", "PORT": "0",
           "AUTH_DIR": str(tmp_path / "auth"), "STATE_DB": str(tmp_path / "s.db"), "WA_BACKEND": "simulator"}
    done = _run(*args, env=env)
    assert done.returncode == 2
    assert f"unknown argument {args[-1]!r}" in done.stderr or f"unknown argument {args[0]!r}" in done.stderr
    assert "usage: wa-worker" in done.stderr
    assert not (tmp_path / "auth").exists()  # it never started


def test_dev_keeps_its_own_arguments() -> None:
    done = _run("dev", "--help")
    assert done.returncode == 0 and "--simulator" in done.stdout


def test_doctor_has_help() -> None:
    done = _run("doctor", "--help")
    assert done.returncode == 0 and "--probe-batch" in done.stdout


def test_short_secret_says_characters() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(EDGE_BASE_URL="http://x", WORKER_SECRET="short")
    assert "WORKER_SECRET: must be at least 8 characters" in str(err.value)
    assert "items" not in str(err.value) and "short" not in str(err.value).replace("short", "", 0)


@pytest.mark.parametrize("url", ["your-project.supabase.co/functions/v1/worker-proxy", "localhost:54321/fn"])
def test_a_url_without_scheme_hints_http(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(EDGE_BASE_URL=url, WORKER_SECRET="0123456789")
    assert "EDGE_BASE_URL" in str(err.value) and "add http:// or https://" in str(err.value)


@pytest.mark.parametrize("value", ["debug", "Info", " warning "])
def test_log_level_is_case_insensitive(value: str) -> None:
    s = load_settings(EDGE_BASE_URL="http://x", WORKER_SECRET="0123456789", LOG_LEVEL=value)
    assert s.LOG_LEVEL is LogLevel[value.strip().upper()]


def test_every_variable_has_a_one_line_description() -> None:
    # a new setting needs its line in wa_worker/config.py DESCRIPTIONS (as in README's table)
    assert set(DESCRIPTIONS) == set(Settings.model_fields)
    assert all(text and "\n" not in text and len(text) <= 100 for text in DESCRIPTIONS.values())
