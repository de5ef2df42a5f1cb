"""Settings from the environment (and an optional ``.env``), validated once at start.

Every variable is documented in README.md, ``.env.example`` and ``easypanel.yml``;
``tests/test_packaging.py`` keeps the four in agreement.
"""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field, HttpUrl, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class BackendName(str, enum.Enum):
    NEONIZE = "neonize"
    SIMULATOR = "simulator"


class UnknownSendPolicy(str, enum.Enum):
    """What to do with a send whose outcome a crash made unknown."""

    AT_MOST_ONCE = "at_most_once"  # report delivery_unknown, never risk a duplicate
    AT_LEAST_ONCE = "at_least_once"  # send again, risk a duplicate


class LogLevel(str, enum.Enum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=True,
        frozen=True,
    )

    # --- the Node worker's variables
    EDGE_BASE_URL: HttpUrl
    WORKER_SECRET: SecretStr = Field(min_length=8)
    PORT: int = Field(3000, ge=0, le=65535)  # 0: any free port (tests)
    AUTH_DIR: Path = Path("/data/auth")
    INSTANCE_POLL_MS: int = Field(10_000, ge=100, le=3_600_000)
    MSG_POLL_MS: int = Field(2_000, ge=50, le=3_600_000)
    WA_BACKEND: BackendName = BackendName.NEONIZE
    LOG_LEVEL: LogLevel = LogLevel.INFO

    # --- edge client
    EDGE_TIMEOUT_S: float = Field(10.0, gt=0, le=300)  # total per call: connect, headers and body
    EDGE_MAX_RESPONSE_BYTES: int = Field(16 * 1024 * 1024, ge=1024)

    # --- durable journal
    STATE_DB: Path = Path("/data/state/wa-worker.db")
    INBOUND_TTL_HOURS: float = Field(168, gt=0)
    INBOUND_MAX_ATTEMPTS: int = Field(20, ge=1)
    UNKNOWN_SEND_POLICY: UnknownSendPolicy = UnknownSendPolicy.AT_MOST_ONCE
    READY_MAX_PROXY_SILENCE_S: float = Field(120.0, gt=0)

    # --- scale and cost
    MSG_POLL_MAX_MS: int = Field(60_000, ge=50, le=3_600_000)
    INSTANCE_POLL_MAX_MS: int = Field(60_000, ge=100, le=3_600_000)
    CONNECT_TIMEOUT_S: float = Field(30.0, gt=0, le=600)
    START_CONCURRENCY: int = Field(8, ge=1, le=256)
    BATCH_POLL: bool = True

    # --- media (outbound media_url / media_base64; inbound downloads)
    MEDIA_MAX_BYTES: int = Field(64 * 1024 * 1024, ge=1024)
    MEDIA_ALLOW_PRIVATE: bool = False  # fetch media from private/loopback/link-local addresses (dev only)
    MEDIA_FETCH_TIMEOUT_S: float = Field(120.0, gt=0)  # total per media_url: DNS, connect, redirects, body

    # --- calls (issue #12): every call reaches /inbound; these decide whether it is declined first
    CALL_REJECT: bool = False
    CALL_REJECT_MESSAGE: str = Field("", max_length=4096)  # sent to the caller after a reject; empty: none

    # --- neonize
    WA_BOT_BADGE: bool = False

    # --- simulator backend
    SIMULATOR_AUTO_SCAN_MS: int | None = Field(None, ge=0)
    SIMULATOR_SEND_DELAY_MS: int = Field(0, ge=0)

    @field_validator("EDGE_BASE_URL")
    @classmethod
    def _http_only(cls, v: HttpUrl) -> HttpUrl:
        if v.scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL")
        return v

    @field_validator("WORKER_SECRET")
    @classmethod
    def _header_safe(cls, v: SecretStr) -> SecretStr:
        # it travels in an HTTP header: anything else fails every proxy call
        if not all("!" <= c <= "~" for c in v.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces (it is sent in an HTTP header)")
        return v

    @field_validator("SIMULATOR_AUTO_SCAN_MS", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _caps_above_floors(self) -> "Settings":
        if self.MSG_POLL_MAX_MS < self.MSG_POLL_MS:
            raise ValueError("MSG_POLL_MAX_MS must be >= MSG_POLL_MS")
        if self.INSTANCE_POLL_MAX_MS < self.INSTANCE_POLL_MS:
            raise ValueError("INSTANCE_POLL_MAX_MS must be >= INSTANCE_POLL_MS")
        return self

    @property
    def edge_base_url(self) -> str:
        """The base URL without a trailing slash."""
        return str(self.EDGE_BASE_URL).rstrip("/")

    # the *_MS variables in seconds, the unit the code works in (converted here only)

    @property
    def instance_poll_s(self) -> float:
        return self.INSTANCE_POLL_MS / 1000

    @property
    def instance_poll_max_s(self) -> float:
        return self.INSTANCE_POLL_MAX_MS / 1000

    @property
    def msg_poll_s(self) -> float:
        return self.MSG_POLL_MS / 1000

    @property
    def msg_poll_max_s(self) -> float:
        return self.MSG_POLL_MAX_MS / 1000

    @property
    def inbound_ttl_s(self) -> float:
        return self.INBOUND_TTL_HOURS * 3600

    @property
    def simulator_send_delay_s(self) -> float:
        return self.SIMULATOR_SEND_DELAY_MS / 1000


PLACEHOLDER_SECRET_PREFIX = "change-me"
PLACEHOLDER_URL_PART = "your-project"


def placeholder_warnings(settings: Settings) -> list[str]:
    """Values still as ``.env.example`` ships them: valid, but surely not meant."""
    out = []
    if settings.WORKER_SECRET.get_secret_value().lower().startswith(PLACEHOLDER_SECRET_PREFIX):
        out.append("WORKER_SECRET is still the placeholder of .env.example: set your own "
                   "(openssl rand -hex 32), the same as the proxy's")
    if PLACEHOLDER_URL_PART in settings.edge_base_url.lower():
        out.append(f"EDGE_BASE_URL still contains the placeholder {PLACEHOLDER_URL_PART!r} of .env.example: "
                   "set your proxy's URL")
    return out


class ConfigError(Exception):
    """One clear line naming the variable at fault (no traceback, no secret)."""


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; raise :class:`ConfigError` with one line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing":
            parts.append(f"{loc} is required but not set")
        else:
            # never echo the offending input: it may be the secret
            parts.append(f"{loc}: {msg}")
    return "invalid configuration: " + "; ".join(parts)
