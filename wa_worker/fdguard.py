"""File-descriptor budget.

goneonize 0.5.2 leaks one SQLite descriptor per connection attempt (its Go
store is never closed) — with ``DATABASE_URL`` one socket to PostgreSQL, which
sits in ``CLOSE_WAIT`` once the server closed it (docs/fleet.md) — so an
instance that keeps failing to dial slowly eats the process's descriptors. The worker raises its soft limit to the hard limit
at start, shows usage in /health (sockets and everything else apart), fails
/ready past a warning level, and past a restart level:

* if the leak is the cause — non-socket descriptors (files, SQLite, pipes) and
  sockets whose peer has closed (``CLOSE_WAIT``: nobody will ever read them) make
  up at least half of the restart level — it stops gracefully with exit code
  75 (EX_TEMPFAIL) so the container's restart policy gives it a fresh budget;
  sessions are resumed from disk in seconds, which beats dying later on EMFILE
  in the middle of a send;
* otherwise sockets are the cause (connections to the HTTP server, sessions): a
  restart would not help and would drop every session, so the HTTP server
  refuses new connections instead (level ``refuse``) until usage falls.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass
from typing import Literal

EXIT_FD_EXHAUSTED = 75
MAX_SOFT_LIMIT = 1 << 20
FD_DIR = "/proc/self/fd"

Level = Literal["ok", "warn", "refuse", "restart"]


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE := hard (capped); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else MAX_SOFT_LIMIT
    target = min(target, MAX_SOFT_LIMIT)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def fd_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_SOFT_LIMIT if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class FdUsage:
    """Open descriptors by kind. ``sockets`` is -1 when they could not be told apart;
    ``stale``: sockets (among ``sockets``) in ``CLOSE_WAIT``, closed by their peer."""

    open: int
    sockets: int
    limit: int
    stale: int = 0

    @property
    def files(self) -> int:
        """Everything that is not a socket: files, SQLite, pipes, event fds."""
        return self.open - max(self.sockets, 0)

    @property
    def leaked(self) -> int:
        """What a restart gives back: files and sockets whose peer is gone."""
        return self.files + self.stale

    def as_health(self) -> dict[str, int]:
        return {"open_fds": self.open, "fd_limit": self.limit, "socket_fds": self.sockets,
                "file_fds": self.files, "stale_socket_fds": self.stale}


def fd_usage(fd_dir: str = FD_DIR) -> FdUsage:
    """Count this process's descriptors by kind (``readlink`` of each: ``socket:[…]`` or not).

    At EMFILE the directory itself cannot be opened: that is reported as the
    whole budget in use, kinds unknown. Elsewhere (no /proc) ``open`` is -1.
    """
    limit = fd_limit()
    try:
        names = os.listdir(fd_dir)
    except OSError as exc:
        return FdUsage(limit if exc.errno in (errno.EMFILE, errno.ENFILE) else -1, -1, limit)
    opened = sockets = 0
    inodes: list[str] = []
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:  # closed meanwhile (e.g. the listing's own descriptor)
            continue
        opened += 1
        if target.startswith("socket:["):
            sockets += 1
            inodes.append(target[8:-1])
    stale = 0
    if inodes:
        waiting = close_wait_inodes()
        stale = sum(1 for i in inodes if i in waiting)
    return FdUsage(opened, sockets, limit, stale)


def close_wait_inodes(tables: tuple[str, ...] = ("/proc/self/net/tcp", "/proc/self/net/tcp6")) -> set[str]:
    """Inodes of this network namespace's TCP sockets in ``CLOSE_WAIT`` (state 08)."""
    found: set[str] = set()
    for table in tables:
        try:
            with open(table) as f:
                next(f, None)  # the header
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[3] == "08":
                        found.add(cols[9])
        except OSError:
            continue
    return found


@dataclass
class FdBudget:
    warn_ratio: float = 0.8
    restart_ratio: float = 0.95
    leak_share: float = 0.5  # leaked share (files, CLOSE_WAIT sockets) of the restart level worth a restart

    @staticmethod
    def usage() -> FdUsage:
        return fd_usage()

    def level(self, usage: FdUsage | None = None) -> Level:
        u = usage if usage is not None else self.usage()
        if u.open < 0 or u.limit <= 0:
            return "ok"
        restart_at = u.limit * self.restart_ratio
        if u.open >= restart_at:
            leaking = u.sockets >= 0 and u.leaked >= restart_at * self.leak_share
            return "restart" if leaking else "refuse"
        if u.open >= u.limit * self.warn_ratio:
            return "warn"
        return "ok"
