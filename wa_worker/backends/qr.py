"""QR strings to PNG data URLs (what ``/update-status`` carries)."""

from __future__ import annotations

import base64
import io

import qrcode
from qrcode.constants import ERROR_CORRECT_L


def qr_png_data_url(code: str, *, box_size: int = 6, border: int = 4) -> str:
    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_L, box_size=box_size, border=border)
    qr.add_data(code)
    qr.make(fit=True)
    img = qr.make_image(fill_color="black", back_color="white")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
