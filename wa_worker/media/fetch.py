"""SSRF-safe, bounded download of a ``media_url`` to a private temp file.

Policy (docs/media.md): http/https only; at most ``max_redirects`` redirects, each hop
re-validated; one total deadline for everything (DNS, connect, headers, redirects, body);
``max_bytes`` enforced from Content-Length and again while streaming; unless
``allow_private``, every address the host resolves to must be globally routable
(:func:`is_public_address`), and the connection goes only to an address that was checked:
the validating resolver *is* the connector's resolver (no DNS-rebinding window), and numeric
hosts (which aiohttp connects to without its resolver) are checked before the request.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import anyio
from aiohttp.abc import ResolveResult
from yarl import URL

from wa_worker.media.errors import MediaError, redact_url
from wa_worker.media.files import CappedFile, FetchedMedia, StorageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]

CHUNK = 64 * 1024
REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
ALLOWED_SCHEMES = frozenset(("http", "https"))
_PRIVATE_HINT = "the worker only fetches from public addresses (MEDIA_ALLOW_PRIVATE=true lifts this, for dev only)"


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address (IPv4-mapped/compatible IPv6 judged as IPv4).

    Refuses private, loopback, link-local (169.254.169.254 included), multicast, reserved,
    unspecified (0.0.0.0, ::), shared (100.64/10) and documentation ranges.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public_address(mapped)
        if ip.teredo is not None:
            return False
        if ip in ipaddress.IPv6Network("::/96"):  # deprecated IPv4-compatible form (::127.0.0.1)
            return False
    return bool(
        ip.is_global
        and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local)
        and not (ip.is_reserved or ip.is_unspecified)
    )


def _looks_numeric(host: str) -> bool:
    """aiohttp's own test for "an IP, skip the resolver" (aiohttp.helpers.is_ip_address)."""
    return ":" in host or host.replace(".", "").isdigit()


def _numeric_address(host: str) -> IPAddress:
    """The address a numeric host means to the OS (``2130706433``, ``0177.0.0.1``, ``127.1`` -> 127.0.0.1)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        raise MediaError("media_refused", f"the media URL's host {host!r} is not a valid address") from None
    return ipaddress.ip_address(str(infos[0][4][0]).split("%", 1)[0])


class _Refused(OSError):
    pass


class _ValidatingResolver(aiohttp.ThreadedResolver):
    """The connector's resolver: every answer is checked, and one bad address refuses the host."""

    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self._policy = policy
        self.refusal: MediaError | None = None

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        for r in results:
            ip = ipaddress.ip_address(str(r["host"]).split("%", 1)[0])
            if not self._policy(ip):
                self.refusal = MediaError(
                    "media_refused", f"the media URL's host {host!r} resolves to the non-public address {ip}; {_PRIVATE_HINT}"
                )
                raise _Refused(f"refused address for {host}")
        return results


def _check_url(url: URL, policy: AddressPolicy | None) -> None:
    if url.scheme not in ALLOWED_SCHEMES:
        raise MediaError(
            "media_refused", f"media URLs must be http or https, not {url.scheme or 'relative'!r}: {redact_url(url)}"
        )
    host = url.raw_host
    if not host:
        raise MediaError("media_refused", f"the media URL has no host: {redact_url(url)}")
    if policy is not None and _looks_numeric(host):
        ip = _numeric_address(host)
        if not policy(ip):
            raise MediaError("media_refused", f"the media URL points at the non-public address {ip}; {_PRIVATE_HINT}")


_SAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


def _clean_filename(name: str | None) -> str | None:
    if not name:
        return None
    name = _SAFE_NAME.sub("_", name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]).strip().lstrip(".")
    return name[:200] or None


def _name_from_url(url: URL) -> str | None:
    last = unquote(url.raw_path.rsplit("/", 1)[-1])
    return _clean_filename(last) if "." in last else None


def _describe(exc: BaseException) -> str:
    """A short cause without the URL (aiohttp messages may echo it, query string included)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection broke while reading the body"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


# long: the redirect loop and the mapping of every failure to one MediaError read best together
async def fetch_to_file(
    url: str,
    dest_dir: Path,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool,
    max_redirects: int = 3,
    address_policy: AddressPolicy = is_public_address,
    user_agent: str = "wa-worker media fetch",
) -> FetchedMedia:
    """Download ``url`` into a new 0600 file in ``dest_dir``; raise :class:`MediaError` otherwise
    (or :class:`~wa_worker.media.files.StorageError` when the worker's own disk fails).

    ``address_policy`` decides which addresses are reachable when ``allow_private`` is false
    (a seam for allowlists and tests). Partial files are removed on every failure.
    """
    policy = None if allow_private else address_policy
    try:
        current = URL(url)
    except (ValueError, TypeError):
        raise MediaError("media_refused", "media_url is not a valid URL") from None
    original = current
    resolver = _ValidatingResolver(policy) if policy is not None else aiohttp.ThreadedResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, force_close=True)
    headers = {"User-Agent": user_agent, "Accept-Encoding": "identity"}
    try:
        with anyio.fail_after(timeout_s):
            async with aiohttp.ClientSession(
                connector=connector, trust_env=False, timeout=aiohttp.ClientTimeout(total=None)
            ) as session:
                for _ in range(max_redirects + 1):
                    _check_url(current, policy)
                    async with session.get(current, allow_redirects=False, headers=headers) as resp:
                        if resp.status in REDIRECT_STATUSES:
                            location = resp.headers.get("Location")
                            if not location:
                                raise MediaError(
                                    "media_fetch_failed",
                                    f"{redact_url(current)} answered {resp.status} without a Location",
                                )
                            try:
                                current = current.join(URL(location))
                            except (ValueError, TypeError):
                                raise MediaError(
                                    "media_fetch_failed", f"{redact_url(current)} redirected to an invalid URL"
                                ) from None
                            continue
                        return await _save(resp, current, original, dest_dir, max_bytes)
                raise MediaError(
                    "media_fetch_failed",
                    f"{redact_url(original)} redirected more than {max_redirects} times; give the final URL",
                )
    except TimeoutError:
        raise MediaError(
            "media_fetch_failed",
            f"fetching {redact_url(original)} took longer than {timeout_s:g} s; "
            "serve it faster or send a smaller file",
        ) from None
    except StorageError:
        raise
    except (aiohttp.ClientError, OSError) as exc:
        if isinstance(resolver, _ValidatingResolver) and resolver.refusal is not None:
            raise resolver.refusal from None
        raise MediaError(
            "media_fetch_failed", f"could not fetch {redact_url(current)}: {_describe(exc)}; check the URL is reachable"
        ) from None


async def _save(
    resp: aiohttp.ClientResponse, url: URL, original: URL, dest_dir: Path, max_bytes: int
) -> FetchedMedia:
    if resp.status != 200:
        raise MediaError(
            "media_fetch_failed",
            f"{redact_url(url)} answered HTTP {resp.status}; the media URL must return the file with 200",
        )
    hint = "send a smaller file"
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise MediaError(
            "media_too_large",
            f"the media is {resp.content_length} bytes, over the {max_bytes}-byte limit (MEDIA_MAX_BYTES); {hint}",
        )
    content_type = None
    if "Content-Type" in resp.headers:
        content_type = resp.content_type.lower() or None
    filename = _filename(resp, url, original)
    with CappedFile(dest_dir, max_bytes, hint) as out:
        async for chunk in resp.content.iter_chunked(CHUNK):
            out.write(chunk)
        return out.finish(content_type, filename)


def _filename(resp: aiohttp.ClientResponse, url: URL, original: URL) -> str | None:
    cd: Any = None
    try:
        cd = resp.content_disposition
    except (ValueError, TypeError):
        cd = None
    if cd is not None and cd.filename:
        return _clean_filename(str(cd.filename))
    return _name_from_url(original) or _name_from_url(url)
