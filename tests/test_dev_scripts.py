"""scripts/dev.sh and scripts/_venv.sh, run for real in a temp copy of the repo.

The venv is either a real one (first run, pip against an unreachable loopback
index) or one whose `bin/python` wraps the shared venv's interpreter and
records pip calls (so an install is instant and observable)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _copy_repo(dest: Path) -> Path:
    repo = dest / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copytree(ROOT / "wa_worker", repo / "wa_worker", ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "WA_VENV", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


def _run(repo: Path, script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_old_python_is_refused_up_front_with_a_hint(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    fake = fakebin / "python3"
    # a python3 that says it is 3.10 (and would fail loudly if asked to make a venv)
    fake.write_text(
        "#!/bin/sh\n"
        'case "$2" in\n'
        '  *print*) echo 3.10 ;;\n'
        '  *sys.exit*) exit 1 ;;\n'
        '  *) echo "fake python3 asked to: $*" >&2; exit 3 ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    env = _env(tmp_path, PATH=f"{fakebin}:{os.environ['PATH']}")
    res = _run(repo, "scripts/dev.sh --simulator", env, timeout=30)
    assert res.returncode != 0
    assert "Python 3.10" in res.stderr and "3.11 or newer" in res.stderr, res.stderr
    assert "PYTHON=" in res.stderr  # the hint says how to pick another interpreter
    assert "fake python3 asked to" not in res.stderr
    assert not (repo / ".venv").exists()


@pytest.mark.slow
def test_first_run_says_what_happens_and_a_failed_pip_fails_the_run(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    # a real interpreter >= 3.11 as python3, pip pointed at a closed loopback port
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    base = getattr(sys, "_base_executable", sys.executable)
    (fakebin / "python3").symlink_to(base)
    env = _env(
        tmp_path,
        PATH=f"{fakebin}:{os.environ['PATH']}",
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_RETRIES="0",
        PIP_TIMEOUT="2",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    res = _run(repo, "scripts/dev.sh --simulator", env, timeout=240)
    assert res.returncode != 0
    err = res.stderr
    assert "creating .venv" in err and "first run ~30 s" in err, err
    assert "127.0.0.1" in err or "ERROR" in err  # pip's own output is shown
    assert "pip install failed" in err, err
    assert "ModuleNotFoundError" not in err  # stopped at pip, not at a later import
    assert not (repo / ".venv" / ".wa-worker-install").exists()


def _wrapped_venv(tmp_path: Path, repo: Path, pip_exit: int) -> Path:
    """A .venv whose python is the shared venv's (with `repo` importable) and whose pip
    only logs its arguments to pip.log and exits with `pip_exit`."""
    venv = repo / ".venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    py = venv / "bin" / "python"
    py.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then\n'
        f'  echo "$*" >> {log}\n'
        f'  [ {pip_exit} = 0 ] || echo "ERROR: No matching distribution found for nothing-such" >&2\n'
        f"  exit {pip_exit}\n"
        "fi\n"
        f'PYTHONPATH={repo} exec {sys.executable} "$@"\n'
    )
    py.chmod(0o755)
    return log


def test_install_is_skipped_when_nothing_changed(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    log = _wrapped_venv(tmp_path, repo, pip_exit=0)
    env = _env(tmp_path)
    script = "source scripts/_venv.sh && ensure_venv test && echo READY"
    for _ in range(2):
        res = _run(repo, script, env, timeout=60)
        assert res.returncode == 0 and "READY" in res.stdout, res.stderr
    assert len(log.read_text().splitlines()) == 1  # the second run skipped pip
    # other extras: install again
    res = _run(repo, "source scripts/_venv.sh && ensure_venv && echo READY", env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(log.read_text().splitlines()) == 2
    # pyproject.toml changed: install again
    with (repo / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    res = _run(repo, "source scripts/_venv.sh && ensure_venv && echo READY", env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert len(log.read_text().splitlines()) == 3


def test_a_failed_pip_is_not_swallowed_when_the_old_install_still_imports(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    _wrapped_venv(tmp_path, repo, pip_exit=1)
    res = _run(repo, "source scripts/_venv.sh && ensure_venv test && echo READY", _env(tmp_path), timeout=60)
    assert res.returncode != 0
    assert "READY" not in res.stdout
    assert "No matching distribution" in res.stderr and "pip install failed" in res.stderr
