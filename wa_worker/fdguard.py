"""File-descriptor budget.

goneonize 0.5.2 leaks one SQLite descriptor per connection attempt (its Go
store is never closed), so an instance that keeps failing to dial slowly eats
the process's descriptors. The worker raises its soft limit to the hard limit
at start, shows usage in /health, fails /ready past a warning level, and past
a restart level stops gracefully with exit code 75 (EX_TEMPFAIL) so the
container's restart policy gives it a fresh budget — sessions are resumed from
disk in seconds, which beats dying later on EMFILE in the middle of a send.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

EXIT_FD_EXHAUSTED = 75
MAX_SOFT_LIMIT = 1 << 20


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


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


@dataclass
class FdBudget:
    warn_ratio: float = 0.8
    restart_ratio: float = 0.95

    @staticmethod
    def usage() -> tuple[int, int]:
        return open_fds(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    def level(self) -> str:
        used, limit = self.usage()
        if used < 0 or limit <= 0:
            return "ok"
        if used >= limit * self.restart_ratio:
            return "restart"
        if used >= limit * self.warn_ratio:
            return "warn"
        return "ok"
