"""Logging set-up: one line per record (text, or JSON for log shippers), and secrets
scrubbed from every record."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# query parameters whose value is a credential (matched as substrings of the lower-cased name)
_SECRET_PARAMS = ("key", "token", "secret", "pass", "pwd", "auth", "sig", "cred", "session", "jwt", "bearer")


def _secret_param(name: str) -> bool:
    lowered = name.lower()
    return any(p in lowered for p in _SECRET_PARAMS)


def redact_url(url: str) -> str:
    """``url`` fit to print: ``user:password@`` and the values of credential-like
    query parameters (``apikey``, ``token``, ``secret``, ``key``…) become ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = []
        for chunk in query.split("&"):
            name, eq, _value = chunk.partition("=")
            pairs.append(f"{name}=***" if eq and _secret_param(unquote(name)) else chunk)
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str, *, user_alone_is_secret: bool = True) -> list[str]:
    """The credentials inside ``url`` (raw and percent-decoded), for :class:`RedactFilter`.
    A user name without a password counts as a token unless ``user_alone_is_secret`` is
    False (a database URL: its user is a role name like ``postgres``, not a credential)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        if password:
            found += [userinfo, password, unquote(password)]
        elif user_alone_is_secret:  # a token as the user name
            found += [userinfo, user, unquote(user)]
    for chunk in parts.query.split("&"):
        name, eq, value = chunk.partition("=")
        if eq and value and _secret_param(unquote(name)):
            found += [value, unquote(value)]
    return sorted({s for s in found if s}, key=len, reverse=True)


class RedactFilter(logging.Filter):
    """Replace every known secret in a record's final text by ``***``.

    The code never logs the secret on purpose; this is the belt to those
    braces (an exception text echoing a header, a URL with credentials...).
    """

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # longest first: a secret containing another is replaced whole
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        text = record.getMessage()
        exc_text = None
        if record.exc_info:
            exc_text = logging.Formatter().formatException(record.exc_info)
            exc_type, exc, _tb = record.exc_info
            if exc_type is not None:  # kept for the JSON fields, whatever happens to exc_info below
                record.error_type = exc_type.__name__
                record.error = self.scrub(str(exc))
        changed = False
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
                changed = True
            if exc_text and s in exc_text:
                exc_text = exc_text.replace(s, "***")
                changed = True
        if changed:
            record.msg, record.args = text, None
            if exc_text is not None:
                record.exc_info, record.exc_text = None, exc_text
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``event``
    (the message), ``instance_id`` (``extra={"instance_id": …}``) and, with an exception,
    ``error_type``, ``error`` and ``traceback``. Every text passes ``scrub`` (the
    :class:`RedactFilter`'s) as well: the filter runs first, this catches the rest."""

    def __init__(self, scrub: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.scrub = scrub or (lambda text: text)

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.fields(record), ensure_ascii=False)

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        scrub = self.scrub
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": scrub(record.getMessage()),
        }
        instance_id = getattr(record, "instance_id", None)
        if instance_id is not None:
            out["instance_id"] = str(instance_id)
        if record.exc_info and record.exc_info[0] is not None:
            out["error_type"] = record.exc_info[0].__name__
            out["error"] = scrub(str(record.exc_info[1]))
            out["traceback"] = scrub(self.formatException(record.exc_info))
        elif record.exc_text:  # the RedactFilter replaced exc_info by its scrubbed text
            out["error_type"] = getattr(record, "error_type", "Exception")
            out["error"] = scrub(str(getattr(record, "error", "")))
            out["traceback"] = scrub(record.exc_text)
        return out


def scrubbed(exc: BaseException, secrets: list[str], limit: int = 300) -> str:
    """An exception's text on one line, ``secrets`` replaced by ``***``, at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for s in secrets:
        text = text.replace(s, "***")
    return text[:limit]


def make_handler(log_format: str, secrets: list[str], stream: TextIO | None = None) -> logging.Handler:
    """A handler writing ``log_format`` (``text`` or ``json``) lines, secrets scrubbed."""
    redact = RedactFilter(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redact.scrub) if log_format == "json" else logging.Formatter(_FORMAT))
    handler.addFilter(redact)
    return handler


def setup_logging(level: str, secrets: list[str], log_format: str = "text") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = make_handler(log_format, secrets)
    root.addHandler(handler)
    root.setLevel(level)
    # chatty libraries: keep them at WARNING unless we debug
    for name in ("httpx", "httpcore", "aiohttp.access", "whatsmeow", "Whatsmeow", "neonize"):
        logging.getLogger(name).setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
