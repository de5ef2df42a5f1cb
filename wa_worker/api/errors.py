"""The direct API's error shape: ``{"error": {"code", "message"}}``, machine-readable
codes next to a human message that never echoes the request."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def api_error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The body; ``extra`` fields that are None are left out."""
    return {"error": {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}}


def api_error(status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
              **extra: Any) -> web.HTTPException:
    """An aiohttp exception (raise it) carrying the API's error body."""
    exc = web.HTTPException(text=json.dumps(api_error_body(code, message, **extra), ensure_ascii=False),
                            content_type="application/json", headers=headers)
    exc.set_status(status)
    return exc
