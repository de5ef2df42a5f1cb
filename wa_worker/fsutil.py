"""Private files and folders: auth state and the journal are secrets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make the leaf 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def tighten_tree(path: Path) -> None:
    """Make every folder 0700 and every file 0600 below ``path`` (inclusive)."""
    if not path.exists():
        return
    if path.is_dir():
        os.chmod(path, DIR_MODE)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), DIR_MODE)
            for f in files:
                p = os.path.join(root, f)
                if not os.path.islink(p):
                    os.chmod(p, FILE_MODE)
    else:
        os.chmod(path, FILE_MODE)


def wipe_dir(path: Path) -> None:
    """Delete a folder and everything in it (a logged-out session)."""
    shutil.rmtree(path, ignore_errors=True)


def append_private(path: Path, line: str) -> None:
    """Append one line to a 0600 file, durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, text: str) -> None:
    """Replace a 0600 file atomically and durably (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
