"""What every HTTP server of the project needs from a request: a constant-time
bearer check and a bounded JSON-object reader.

Used by the worker's server (:mod:`wa_worker.http.server`) and the reference
proxy of ``wa-worker dev`` (:mod:`wa_worker.dev.proxy`). Errors are aiohttp
``HTTPException`` responses with a JSON body ``{"error": "..."}`` that never
echoes the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from typing import Any, NoReturn

from aiohttp import web

MAX_JSON_DEPTH = 32
DEFAULT_READ_TIMEOUT_S = 10.0

# a JSON string (skipped whole) or one bracket; possessive, so a long string is one linear step
_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False))


def http_error(status: int, message: str) -> web.HTTPException:
    """An aiohttp exception (raise it) whose body is ``{"error": message}``."""
    exc = web.HTTPException(text=json.dumps({"error": message}), content_type="application/json")
    exc.set_status(status)
    return exc


def bearer_matches(request: web.BaseRequest, secret: bytes) -> bool:
    """``Authorization: Bearer <secret>`` (scheme case-insensitive), compared in constant time.

    Both sides are hashed first, so neither the content nor the length of the
    secret leaks through timing; a header that is not UTF-8 is simply wrong.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = token.strip().encode("utf-8", "surrogateescape")  # aiohttp decodes headers with surrogateescape
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(secret).digest())


def json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in ``text`` (strings skipped), without recursion."""
    depth = deepest = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def decode_json_object(raw: bytes, *, allow_empty: bool = False, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """``raw`` as a JSON object, or a 400 that says why (never a 500, whatever the bytes)."""
    if not raw.strip():
        if allow_empty:
            return {}
        raise http_error(400, "a JSON body is required")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise http_error(400, "body is not valid JSON: not UTF-8") from None
    if json_depth(text) > max_depth:
        raise http_error(400, f"body is not accepted: JSON nested deeper than {max_depth} levels")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise http_error(400, f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except (ValueError, RecursionError) as exc:  # a number past int's digit limit, NaN/Infinity
        reason = "number too large" if "digits" in str(exc) else "NaN and Infinity are not JSON"
        raise http_error(400, f"body is not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise http_error(400, "body must be a JSON object")
    return data


async def read_body(request: web.Request, *, max_bytes: int, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> bytes:
    """The whole body, at most ``max_bytes`` (else 413), within ``read_timeout_s`` (else 408)."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise http_error(413, f"body larger than {max_bytes} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(read_timeout_s):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > max_bytes:
                    raise http_error(413, f"body larger than {max_bytes} bytes")
    except TimeoutError:
        raise http_error(408, f"request body not received within {read_timeout_s:g} s") from None
    return bytes(body)


async def read_json_object(
    request: web.Request,
    *,
    max_bytes: int,
    allow_empty: bool = False,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> dict[str, Any]:
    """Read (bounded in size and time) and decode the body as a JSON object; 400/408/413 otherwise."""
    raw = await read_body(request, max_bytes=max_bytes, read_timeout_s=read_timeout_s)
    return decode_json_object(raw, allow_empty=allow_empty)
