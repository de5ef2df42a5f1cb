"""Which WhatsApp account a phone number is (issue #12, "Recipients that exist").

A phone-number recipient is checked with WhatsApp once (``Session.lookup_numbers``)
and the message goes to the JID WhatsApp returns. A Brazilian mobile (+55, a
two-digit area code and 8 or 9 digits) is checked in both forms, with and
without the 9th digit: accounts made before the 9th digit existed are still
registered without it. Answers, negative ones too, are cached in the journal for
``NUMBER_CACHE_DAYS``; lookups are rate-limited per instance by a token bucket
(WhatsApp treats many lookups as a ban signal).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from ..backends.base import BackendError, Session
from ..ids import USER_SERVER
from ..storage.journal import Journal
from ..timing import Clock

log = logging.getLogger("wa_worker.numbers")

NUMBER_CACHE_DAYS = 7.0
LOOKUPS_PER_MINUTE = 30


def phone_of(jid: str) -> str | None:
    """The digits of a phone-number JID (``…@s.whatsapp.net``); None for groups, LIDs and the rest."""
    user, _, server = jid.partition("@")
    if server != USER_SERVER or not user.isdigit():
        return None
    return user


def br_forms(phone: str) -> list[str]:
    """The forms to check: ``[phone]``, or for a Brazilian mobile both forms (the given one first)."""
    if not phone.startswith("55"):
        return [phone]
    local = phone[4:]
    if len(phone) == 13 and local.startswith("9"):
        return [phone, phone[:4] + local[1:]]
    if len(phone) == 12 and local[:1] in "6789":  # an 8-digit mobile number: the 9 is prefixed today
        return [phone, phone[:4] + "9" + local]
    return [phone]


class TokenBucket:
    """``rate_per_minute`` tokens a minute, at most ``burst`` saved; time from the clock."""

    def __init__(self, rate_per_minute: float, burst: float, clock: Clock) -> None:
        self.rate_s = rate_per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self._at = clock.monotonic()

    def take(self) -> bool:
        now = self.clock.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate_s)
        self._at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Outcome(enum.Enum):
    FOUND = "found"
    NOT_ON_WHATSAPP = "not_on_whatsapp"
    WAIT = "wait"  # rate-limited, or WhatsApp could not be asked: try again on a later poll


@dataclass(frozen=True, slots=True)
class Resolution:
    outcome: Outcome
    jid: str | None = None


class NumberResolver:
    """Resolves phone JIDs through the journal's cache, then WhatsApp (rate-limited per instance)."""

    def __init__(self, journal: Journal, clock: Clock, *, cache_days: float = NUMBER_CACHE_DAYS,
                 lookups_per_minute: int = LOOKUPS_PER_MINUTE) -> None:
        self.journal = journal
        self.clock = clock
        self.cache_s = cache_days * 86400
        self.lookups_per_minute = lookups_per_minute
        self._buckets: dict[str, TokenBucket] = {}
        self._dry: set[str] = set()  # instances whose bucket ran dry (logged once per dry spell)
        self.lookups = 0
        self.rate_limited = 0
        self.lookup_errors = 0

    def _bucket(self, instance_id: str) -> TokenBucket:
        bucket = self._buckets.get(instance_id)
        if bucket is None:
            rate = max(1, self.lookups_per_minute)
            bucket = self._buckets[instance_id] = TokenBucket(rate, rate, self.clock)
        return bucket

    async def resolve(self, instance_id: str, session: Session, jid: str) -> Resolution:
        """The JID to send to, or why not now. Anything but a phone JID passes unchanged, as does
        every recipient of a backend that cannot look numbers up."""
        phone = phone_of(jid)
        if phone is None or not session.can_lookup_numbers or self.lookups_per_minute <= 0:
            return Resolution(Outcome.FOUND, jid)
        cached = self.journal.cached_number(phone, self.cache_s)
        if cached is not None:
            found = cached[0]
            return Resolution(Outcome.FOUND, found) if found else Resolution(Outcome.NOT_ON_WHATSAPP)
        if not self._bucket(instance_id).take():
            self.rate_limited += 1
            if instance_id not in self._dry:
                self._dry.add(instance_id)
                log.info("%s: more than %d number lookups a minute: messages to new numbers wait (they stay "
                         "queued at the proxy)", instance_id, self.lookups_per_minute)
            return Resolution(Outcome.WAIT)
        self._dry.discard(instance_id)
        forms = br_forms(phone)
        self.lookups += 1
        try:
            answers = await session.lookup_numbers(forms)
        except BackendError as exc:
            self.lookup_errors += 1
            log.warning("%s: could not check a number with WhatsApp (%s): the message waits", instance_id, exc)
            return Resolution(Outcome.WAIT)
        found = next((answers[f] for f in forms if answers.get(f)), None)
        self.journal.cache_number(phone, found)
        if found is None:
            return Resolution(Outcome.NOT_ON_WHATSAPP)
        return Resolution(Outcome.FOUND, found)
