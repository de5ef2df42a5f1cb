"""What ``wa-worker dev`` prints: pairing QR codes, status changes, messages.

Two feeds:

* the worker's backend events (``Worker(on_event=...)``) give the raw QR
  *string*, which is drawn with half-block characters (two QR rows per text
  line) so a phone can scan it off the screen;
* the reference proxy's events (:class:`~wa_worker.dev.proxy.ProxyEvent`) give
  status changes and messages, i.e. exactly what a real SaaS would see.

Never prints the secret (it is never handed to this module). With ``log``
(``LOG_FORMAT=json``), every line goes through that logger instead, so the
dev mode's lines and the worker's are one format on one stream (QR codes are
not drawn then: a JSON line cannot show one; the dev page does).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

import qrcode
from qrcode.constants import ERROR_CORRECT_L

from ..backends.base import Connected, LoggedOut, QrCode
from .proxy import ProxyEvent
from .text import clip, describe

QUIET_ZONE = 2  # modules of white border (the spec says 4; 2 scans fine on screens)

_RESET = "\x1b[0m"
# black ink on white paper, whatever the terminal's theme
_PAPER = "\x1b[30;107m"


def qr_matrix(data: str, *, border: int = QUIET_ZONE) -> list[list[bool]]:
    """The QR modules of ``data`` (True = dark), including the quiet zone."""
    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_L, border=border)
    qr.add_data(data)
    qr.make(fit=True)
    return [list(row) for row in qr.get_matrix()]


def render_qr(data: str, *, color: bool, border: int = QUIET_ZONE) -> str:
    """Draw ``data`` as a QR code with ``█ ▀ ▄`` and spaces, two module rows per line.

    With ``color`` the lines are wrapped in ANSI codes forcing black on white,
    so the code stays scannable on dark terminals. Without it, a dark module is
    ink (``█``), i.e. correct when printed on a light background.
    """
    matrix = qr_matrix(data, border=border)
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))
    lines = []
    for top, bottom in zip(matrix[0::2], matrix[1::2], strict=True):
        chars = []
        for t, b in zip(top, bottom, strict=True):
            chars.append("█" if t and b else "▀" if t else "▄" if b else " ")
        line = "".join(chars)
        lines.append(f"{_PAPER}{line}{_RESET}" if color else line)
    return "\n".join(lines)


class TerminalPrinter:
    """Prints dev-mode events, one line each (QR codes as a block)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        color: bool | None = None,
        page_url: str | None = None,
        print_qr: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.log = log
        if color is None:
            color = log is None and bool(getattr(self.stream, "isatty", lambda: False)())
        self.color = color
        self.page_url = page_url
        self.print_qr = print_qr
        self._last_qr: dict[str, str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ output

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self.stream.write(text if text.endswith("\n") else text + "\n")
                self.stream.flush()
            except (ValueError, OSError):  # closed stream at shutdown
                pass

    def line(self, instance_id: str | None, text: str) -> None:
        if self.log is not None:
            self.log.info("%s", text, extra={"instance_id": instance_id} if instance_id else None)
            return
        stamp = time.strftime("%H:%M:%S")
        where = f" [{instance_id}]" if instance_id else ""
        self._write(f"{stamp}{where} {text}")

    def _bold(self, text: str) -> str:
        return f"\x1b[1m{text}{_RESET}" if self.color else text

    # ------------------------------------------------------------------ worker events

    def worker_event(self, instance_id: str, event: Any) -> None:
        """The ``on_event`` hook of the worker: prints new pairing QR codes."""
        if isinstance(event, QrCode):
            if not self.print_qr or self._last_qr.get(instance_id) == event.code:
                return
            self._last_qr[instance_id] = event.code
            self.qr(instance_id, event.code)
        elif isinstance(event, (Connected, LoggedOut)):
            self._last_qr.pop(instance_id, None)

    def qr(self, instance_id: str, code: str) -> None:
        where = f" or open {self.page_url}" if self.page_url else ""
        if self.log is not None:
            self.line(instance_id, f"new QR code: open {self.page_url or 'the dev page'} and scan it with WhatsApp "
                                   "› Linked devices › Link a device")
            return
        header = (
            f"{time.strftime('%H:%M:%S')} [{instance_id}] "
            + self._bold("scan this QR code")
            + f" with WhatsApp › Linked devices › Link a device{where}:"
        )
        self._write(header + "\n" + render_qr(code, color=self.color) + "\n")

    # ------------------------------------------------------------------ proxy events

    def proxy_event(self, event: ProxyEvent) -> None:
        d = event.data
        iid = event.instance_id
        if event.kind == "instance_added":
            self.line(iid, "instance added")
        elif event.kind == "status":
            text = f"{d.get('old_status')} → {self._bold(str(d.get('status')))}"
            if d.get("status") == "CONNECTED" and d.get("phone_number"):
                text += f" as +{clip(d['phone_number'], 30)}"
            if d.get("status") == "DISCONNECTED" and d.get("reason"):
                text += f" ({clip(d['reason'], 80)})"
            self.line(iid, "status " + text)
        elif event.kind == "queued":
            m = d["message"]
            self.line(iid, f"queued {m['id']} → {clip(m['to'], 80)}: {clip(describe(m))}")
        elif event.kind == "sent":
            m = d["message"]
            wa = f" (wa id {clip(m['wa_message_id'], 80)})" if m.get("wa_message_id") else ""
            self.line(iid, f"sent {m['id']} → {clip(m['to'], 80)}{wa}")
        elif event.kind == "failed":
            m = d["message"]
            code = f"[{clip(m['error_code'], 40)}] " if m.get("error_code") else ""
            self.line(iid, f"failed {m['id']} → {clip(m['to'], 80)}: {code}{clip(m.get('error'))}")
        elif event.kind == "receipt":
            m = d["message"]
            receipt = m.get("receipt") or {}
            self.line(iid, f"{clip(str(receipt.get('status')), 20)} {m['id']} → {clip(m['to'], 80)}")
        elif event.kind == "lease":
            self.line(iid, f"lease {clip(str(d.get('change')), 20)} ({clip(str(d.get('holder')), 130)})")
        elif event.kind == "inbound":
            m = d["message"]
            who = clip(m["from"], 80) + (f" ({clip(m['push_name'], 60)})" if m.get("push_name") else "")
            arrow = "→ (from me)" if m.get("from_me") else "←"
            self.line(iid, f"{arrow} {who}: {clip(describe(m))}")
