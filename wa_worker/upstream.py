"""An instance's upstream proxy (``proxy_url`` from the edge proxy): validated
once here, redacted wherever it is shown.

Accepted: ``http://``, ``https://`` (TLS to the proxy) and ``socks5://`` (or
``socks5h://``: the proxy resolves names either way), a host, an explicit port,
optional ``user:password@``; nothing else (no path, query or fragment). A
:class:`ProxyProblem` names what is wrong without repeating the credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

SCHEMES = ("http", "https", "socks5", "socks5h")
# other schemes named in a refusal (anything else might be a secret typed in the wrong place)
_KNOWN_SCHEMES = frozenset({"ftp", "socks", "socks4", "socks4a", "ws", "wss", "tcp", "tls", "ssh", "file", "gopher"})
MAX_URL_CHARS = 2048


class ProxyProblem(ValueError):
    """A ``proxy_url`` that cannot be used; the message never holds its credentials."""


@dataclass(frozen=True, slots=True)
class ProxyURL:
    scheme: str  # http | https | socks5 (socks5h is read as socks5)
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def redacted(self) -> str:
        """``scheme://[***@]host:port``: fit for logs, health and errors."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{'***@' if self.username is not None else ''}{host}:{self.port}"


def parse_proxy_url(value: Any) -> ProxyURL:
    """``value`` as a :class:`ProxyURL`; raises :class:`ProxyProblem`."""
    if not isinstance(value, str):
        raise ProxyProblem(f"proxy_url is a {type(value).__name__}, not a string")
    if len(value) > MAX_URL_CHARS:
        raise ProxyProblem(f"proxy_url longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ProxyProblem("proxy_url contains whitespace or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ProxyProblem("proxy_url is not a URL with a valid port") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = scheme if scheme in _KNOWN_SCHEMES else "?"
        raise ProxyProblem(f"proxy_url scheme {shown!r} is not supported (http, https or socks5)")
    if not parts.hostname:
        raise ProxyProblem("proxy_url has no host")
    if port is None or not 0 < port < 65536:
        raise ProxyProblem("proxy_url has no port (e.g. http://host:3128)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ProxyProblem("proxy_url has a path, query or fragment (only scheme://[user:pass@]host:port)")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme.startswith("socks5") and username is not None and (len(username.encode()) > 255
                                                                 or len((password or "").encode()) > 255):
        raise ProxyProblem("socks5 proxy_url credentials longer than 255 bytes")
    return ProxyURL("socks5" if scheme == "socks5h" else scheme, parts.hostname, port, username, password)


@dataclass(frozen=True, slots=True)
class ProxyChoice:
    """What the edge proxy said about an instance's upstream proxy: ``url`` (None:
    dial directly) or, when the value was unusable, ``problem`` (the instance
    then does not connect: never directly behind the operator's back)."""

    url: str | None = None
    problem: str | None = None

    @property
    def shown(self) -> str:
        """For logs and health: the redacted URL, "direct" or "invalid"."""
        if self.problem is not None:
            return "invalid"
        return parse_proxy_url(self.url).redacted if self.url is not None else "direct"


def proxy_choice(value: Any) -> ProxyChoice:
    """A ``proxy_url`` field's value (``null`` or ``""``: direct) as a :class:`ProxyChoice`."""
    if value is None or value == "":
        return ProxyChoice()
    try:
        parse_proxy_url(value)
    except ProxyProblem as exc:
        return ProxyChoice(problem=str(exc))
    return ProxyChoice(url=value)
