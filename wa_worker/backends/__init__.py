"""WhatsApp backends: one interface (``base``), a real one (``neonize``, a
package) and an in-process fake network (``simulator``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings
    from .base import Backend


def make_backend(settings: "Settings") -> "Backend":
    """The backend named by ``WA_BACKEND``."""
    auth = Path(settings.AUTH_DIR)
    if settings.WA_BACKEND.value == "simulator":
        # each backend is imported only when chosen: neonize's import has process-wide effects
        from .simulator import SimulatorBackend

        # DATABASE_URL: simulated sessions in PostgreSQL too, so simulated instances move between workers
        return SimulatorBackend(auth, auto_scan_ms=settings.SIMULATOR_AUTO_SCAN_MS,
                                send_delay_s=settings.simulator_send_delay_s, database_url=settings.database_url)
    from .neonize.loading import configure_bot_tag  # no neonize import yet

    configure_bot_tag(settings.WA_BOT_BADGE)  # before neonize is first imported
    from .neonize import NeonizeBackend  # only now: the bot tag must be set first

    return NeonizeBackend(auth, connect_timeout_s=settings.CONNECT_TIMEOUT_S, database_url=settings.database_url,
                          database_idle_timeout_s=settings.DATABASE_IDLE_TIMEOUT_S)
