"""requirements.lock: agrees with pyproject.toml, installs with --require-hashes, covers arm64."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)(?:\s*;\s*(.+?))?\s*\\?$")


def pins() -> dict[str, list[tuple[str, str | None]]]:
    out: dict[str, list[tuple[str, str | None]]] = {}
    for line in LOCK.read_text().splitlines():
        if m := PIN.match(line):
            out.setdefault(canonicalize_name(m.group(1)), []).append((m.group(2), m.group(3)))
    return out


def test_every_pin_has_hashes() -> None:
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n\n", 1)[-1])
    entries = [b for b in blocks if PIN.match(b.splitlines()[0])]
    assert entries
    for block in entries:
        assert "--hash=sha256:" in block, block.splitlines()[0]


def test_the_lock_agrees_with_pyproject_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = pins()
    build = project["build-system"]["requires"]
    for spec in [*project["project"]["dependencies"], *build]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in requirements.lock: regenerate it"
        for version, marker in locked[name]:
            if marker is None or "python_full_version < '3.12'" in marker or "sys_platform == 'linux'" in marker:
                assert req.specifier.contains(version, prereleases=True), f"{name}=={version} vs {req.specifier}"


def test_the_dockerfile_installs_the_lock_with_hashes_then_the_package_alone() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lock_step = text.index("pip install --require-hashes -r requirements.lock")
    package_step = text.index("pip install --no-deps --no-build-isolation .")
    assert lock_step < package_step
    assert "requirements.lock" not in (ROOT / ".dockerignore").read_text().split("\n", 1)[1]


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # as in the image: the public index only, not this machine's pip configuration (mirrors, constraints)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    if cert := os.environ.get("PIP_CERT"):
        env["PIP_CERT"] = cert
    return subprocess.run(list(args), capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


@pytest.mark.slow
def test_the_lock_installs_in_a_fresh_venv_then_the_package_without_deps(tmp_path: Path) -> None:
    """What the Dockerfile runs, from the registry (downloads ~60 MB; bounded at 15 minutes)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    done = _pip(py, "-m", "pip", "install", "-q", "--no-cache-dir", "--require-hashes", "-r", str(LOCK), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _pip(py, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps", "--no-build-isolation", str(ROOT),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _pip(py, "-c", "import neonize.aioze.client, wa_worker.daemon; print('ok')", cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    done = _pip(py, "-m", "pip", "check", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# pip does not widen --platform to older manylinux tags: name those python:3.11-slim-bookworm (glibc 2.36) accepts
ARM64_PLATFORMS = [arg for tag in ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_24_aarch64",
                                   "manylinux_2_27_aarch64", "manylinux_2_28_aarch64", "manylinux_2_31_aarch64",
                                   "manylinux_2_34_aarch64", "manylinux_2_36_aarch64", "linux_aarch64")
                   for arg in ("--platform", tag)]


@pytest.mark.slow
def test_the_lock_has_a_hashed_arm64_wheel_for_every_linux_dependency(tmp_path: Path) -> None:
    """The multi-arch build: pip resolves every pin to a linux/arm64 wheel whose hash is in the lock
    (the image's Python is the latest 3.11.x; markers are evaluated by this interpreter)."""
    done = _pip(sys.executable, "-m", "pip", "download", "-q", "--no-cache-dir", "--only-binary=:all:",
                *ARM64_PLATFORMS, "--python-version", "3.11.14", "--implementation", "cp",
                "--require-hashes", "--no-deps", "-r", str(LOCK), "-d", str(tmp_path / "wheels"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [p.name for p in (tmp_path / "wheels").iterdir()]
    assert any(n.startswith("neonize-") and "aarch64" in n for n in names), names
