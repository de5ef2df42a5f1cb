"""Loading neonize: the bot-tag environment, the lazy import, the Go log callback.

Importing neonize loads goneonize (a Go shared library) and has process-wide
side effects, so it happens once, on first use (:meth:`NeonizeLib.get`).
goneonize reads ``NEONIZE_BOT_TAG`` from the environment block the process was
*started* with, not from ``os.environ``; see docs/neonize.md ("The AI badge").
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import TypeAdapter, ValidationError

log = logging.getLogger("wa_worker.backends.neonize")

BOT_TAG_VAR = "NEONIZE_BOT_TAG"
#: goneonize ``shouldAddBotNode``: these values (trimmed, any case) switch the badge off
_BOT_TAG_OFF = frozenset({"off", "none", "false", "0"})
#: set for the one re-exec that puts the variable into the launch environment
_REEXEC_MARK = "WA_WORKER_BOT_TAG_REEXEC"
_PROC_ENVIRON = Path("/proc/self/environ")


def bot_tag_value(enabled: bool) -> str:
    return "on" if enabled else "off"


def go_adds_badge(value: str | None) -> bool:
    """What goneonize does with this ``NEONIZE_BOT_TAG`` value (absent: badge on)."""
    return (value or "").strip().lower() not in _BOT_TAG_OFF


def launch_environment_value(proc_environ: Path = _PROC_ENVIRON) -> str | None:
    """``NEONIZE_BOT_TAG`` in the environment the process started with (the one
    Go copies), from ``/proc/self/environ``; falls back to ``os.environ``."""
    try:
        block = proc_environ.read_bytes()
    except OSError:
        return os.environ.get(BOT_TAG_VAR)
    prefix = BOT_TAG_VAR.encode() + b"="
    for entry in block.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode("utf-8", "replace")
    return None


def configure_bot_tag(enabled: bool) -> bool:
    """Ask for the badge on or off (``WA_BOT_BADGE`` decides, whatever
    ``NEONIZE_BOT_TAG`` said). Returns True when goneonize will obey, i.e. the
    launch environment already agrees; otherwise it logs why it will not."""
    os.environ[BOT_TAG_VAR] = bot_tag_value(enabled)  # for child processes
    launch = launch_environment_value()
    if go_adds_badge(launch) == enabled:
        return True
    log.warning(
        "WhatsApp's AI badge will be %s: goneonize reads %s only from the environment the process "
        "started with (%s=%s there); start it with %s=%s (the Docker image does, `wa-worker` restarts "
        "itself to get it)",
        "ON" if not enabled else "OFF", BOT_TAG_VAR, BOT_TAG_VAR, launch if launch is not None else "(unset)",
        BOT_TAG_VAR, bot_tag_value(enabled),
    )
    return False


def ensure_bot_tag(enabled: bool) -> None:
    """For entry points, before anything else runs: when the launch environment
    disagrees with ``enabled``, replace this process (same pid, same argv) by one
    started with the right ``NEONIZE_BOT_TAG``. At most once."""
    if go_adds_badge(launch_environment_value()) == enabled:
        os.environ[BOT_TAG_VAR] = bot_tag_value(enabled)
        os.environ.pop(_REEXEC_MARK, None)
        return
    if os.environ.pop(_REEXEC_MARK, None):
        configure_bot_tag(enabled)  # re-exec did not help (no /proc?): say so, carry on
        return
    os.environ[BOT_TAG_VAR] = bot_tag_value(enabled)
    os.environ[_REEXEC_MARK] = "1"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, sys.orig_argv)


def bot_badge_setting() -> bool:
    """``WA_BOT_BADGE`` from the environment or ``./.env``, parsed like Settings
    (for ``wa-worker dev``, which builds its Settings later; invalid -> False)."""
    raw = os.environ.get("WA_BOT_BADGE")
    if raw is None:
        try:
            raw = dotenv_values(".env").get("WA_BOT_BADGE")
        except OSError:
            raw = None
    if raw is None or raw == "":
        return False
    try:
        return TypeAdapter(bool).validate_python(raw)
    except ValidationError:
        return False


class NeonizeLib:
    """neonize, imported on first use (its import has process-wide side effects)."""

    _mod: "NeonizeLib | None" = None

    def __init__(self) -> None:
        # the lazy import itself (its side effects: the module docstring)
        from neonize import _binder
        from neonize.aioze import events as aio_events
        from neonize.aioze.client import NewAClient
        from neonize.events import INT_TO_EVENT
        from neonize.exc import ConvertStickerError, DownloadError, RejectCallError, SendMessageError, UploadError
        from neonize.proto import Neonize_pb2
        from neonize.proto.waCompanionReg.WAWebProtobufsCompanionReg_pb2 import DeviceProps
        from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as WAMessage
        from neonize.utils.jid import build_jid

        self.binder = _binder
        self.gocode = _binder.gocode
        self.ProxySettings = _binder.ProxySettings
        self.func_string = _binder.func_string
        self.func_callback_bytes = _binder.func_callback_bytes
        self.func_callback_bytes2 = _binder.func_callback_bytes2
        self.aio_events = aio_events
        self.NewAClient = NewAClient
        self.INT_TO_EVENT = INT_TO_EVENT
        self.SendMessageError = SendMessageError
        self.RejectCallError = RejectCallError
        self.UploadError = UploadError
        self.DownloadError = DownloadError
        self.ConvertStickerError = ConvertStickerError
        self.pb = Neonize_pb2
        self.DeviceProps = DeviceProps
        self.WAMessage = WAMessage
        self.build_jid = build_jid
        self.log_cb: Any = None

    @classmethod
    def get(cls) -> "NeonizeLib":
        if cls._mod is None:
            cls._mod = cls()
        return cls._mod


_WHATSMEOW_LOG = logging.getLogger("wa_worker.whatsmeow")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


def _go_log(buf: int, size: int) -> None:
    """whatsmeow log callback (Go thread). Only WARN+ is asked for by default."""
    try:
        nz = NeonizeLib.get()
        entry = nz.pb.LogEntry.FromString(ctypes.string_at(buf, size))
        _WHATSMEOW_LOG.log(_LEVELS.get(entry.Level, logging.INFO), "[%s] %s", entry.Name, entry.Message)
    except Exception:  # noqa: BLE001 - never raise into Go
        pass


def log_callback() -> Any:
    """The process's one whatsmeow log callback (alive forever: zombie goroutines may log)."""
    nz = NeonizeLib.get()
    if nz.log_cb is None:
        nz.log_cb = nz.func_callback_bytes2(_go_log)
    return nz.log_cb


def jid_proto(jid: str) -> Any:
    """``user@server`` (device/agent suffix dropped) -> neonize JID protobuf."""
    user, sep, server = jid.strip().rpartition("@")
    if not sep or not user or not server:
        raise ValueError(f"not a JID: {jid!r}")
    user = user.split(":", 1)[0]
    if server == "s.whatsapp.net":
        user = user.split(".", 1)[0]
    return NeonizeLib.get().build_jid(user, server)
