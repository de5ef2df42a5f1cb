"""The real WhatsApp backend: neonize (Python over Go whatsmeow), one session
per instance. How it works and the goneonize traps it avoids: docs/neonize.md.

``backend`` shared services · ``session`` one instance · ``attempt`` one Go
client · ``events`` pure protobuf → event mapping · ``connect_relay`` the
loopback CONNECT relay · ``threads`` and ``gate`` blocking Go calls ·
``store`` the session database · ``loading`` the lazy import and bot tag.
"""

from .backend import NeonizeBackend
from .session import NeonizeSession, SessionState
from .store import DB_NAME

__all__ = ["DB_NAME", "NeonizeBackend", "NeonizeSession", "SessionState"]
