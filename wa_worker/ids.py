"""Identifiers that cross trust boundaries: instance ids and WhatsApp JIDs."""

from __future__ import annotations

import re

INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")

USER_SERVER = "s.whatsapp.net"
GROUP_SERVER = "g.us"
LID_SERVER = "lid"
PASSTHROUGH_SERVERS = (USER_SERVER, GROUP_SERVER, LID_SERVER)

_PHONE_CHARS_RE = re.compile(r"^\+?[0-9][0-9 \-().]*$")
# Legacy group ids look like "<creator-phone>-<unix-ts>", modern ones are long digit strings.
_LEGACY_GROUP_RE = re.compile(r"^[0-9]{5,20}-[0-9]{6,12}$")
_JID_USER_RE = re.compile(r"^[0-9A-Za-z.:_-]{1,64}$")


class InvalidRecipient(ValueError):
    """The ``to`` of a queued message cannot be turned into a JID."""


def is_valid_instance_id(value: object) -> bool:
    """True for ids safe to use as a folder name under AUTH_DIR."""
    return isinstance(value, str) and INSTANCE_ID_RE.fullmatch(value) is not None


def normalize_recipient(to: str) -> str:
    """Turn a proxy ``to`` field into a JID.

    * ``+55 (11) 99999-0000`` → ``5511999990000@s.whatsapp.net``
    * ``…@s.whatsapp.net``, ``…@g.us``, ``…@lid`` pass through (user part checked)
    * ``120363012345678901-1600000000`` (legacy group id) → ``…@g.us``
    * ``…@c.us`` (whatsapp-web.js style) → ``…@s.whatsapp.net``
    """
    if not isinstance(to, str):
        raise InvalidRecipient("recipient is not a string")
    value = to.strip()
    if not value:
        raise InvalidRecipient("recipient is empty")
    if "@" in value:
        user, _, server = value.rpartition("@")
        server = server.lower()
        if server == "c.us":
            server = USER_SERVER
        if server not in PASSTHROUGH_SERVERS:
            raise InvalidRecipient(f"unsupported JID server {server!r}")
        if not _JID_USER_RE.fullmatch(user):
            raise InvalidRecipient("malformed JID user part")
        if server == USER_SERVER:
            digits = user.split(":", 1)[0].split(".", 1)[0]
            if not digits.isdigit() or not 5 <= len(digits) <= 20:
                raise InvalidRecipient("phone JID must be 5-20 digits")
        return f"{user}@{server}"
    if _LEGACY_GROUP_RE.fullmatch(value):
        return f"{value}@{GROUP_SERVER}"
    if _PHONE_CHARS_RE.fullmatch(value):
        digits = re.sub(r"\D", "", value)
        if not 5 <= len(digits) <= 20:
            raise InvalidRecipient(f"phone number must have 5-20 digits, got {len(digits)}")
        return f"{digits}@{USER_SERVER}"
    raise InvalidRecipient("recipient is neither a phone number nor a JID")


def is_group_jid(jid: str) -> bool:
    return jid.endswith("@" + GROUP_SERVER)
