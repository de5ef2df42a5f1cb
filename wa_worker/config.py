"""Settings from the environment (and an optional ``.env``), validated once at start.

Every variable is documented in README.md, ``.env.example`` and ``easypanel.json``;
``tests/test_packaging.py`` keeps the four in agreement.
"""

from __future__ import annotations

import enum
import re
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

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


class LogFormat(str, enum.Enum):
    TEXT = "text"  # one human line per record
    JSON = "json"  # one JSON object per line, for log shippers (logutil.JsonFormatter)


def check_database_url(url: str) -> str:
    """``url`` if it is a ``postgres://`` / ``postgresql://`` URL naming a host and
    a database; otherwise ValueError (whose text never holds the URL: it may carry a password)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        raise ValueError("must be a postgres:// URL") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgres:// or postgresql:// URL (postgres://user:password@host:5432/dbname)")
    query = dict(parse_qsl(parts.query))
    if not (parts.hostname or query.get("host")):
        raise ValueError("must name a host (postgres://user:password@host:5432/dbname)")
    if not (parts.path.strip("/") or query.get("dbname")):
        raise ValueError("must name a database (postgres://user:password@host:5432/dbname)")
    return url


#: lib/pq parameters libpq refuses ("invalid URI query parameter"): for goneonize's DSN only
GO_ONLY_PARAMS = frozenset({"binary_parameters", "disable_prepared_binary_result"})


def libpq_url(url: str) -> str:
    """DATABASE_URL for libpq (psycopg): without the lib/pq-only parameters the PgBouncer setup
    adds for goneonize (docs/fleet.md)."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in GO_ONLY_PARAMS]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept, quote_via=quote), parts.fragment))


def check_public_url(url: str) -> str:
    """An http(s) base URL without credentials, query or fragment (API_PUBLIC_URL), without its
    trailing slash; ValueError naming what is wrong."""
    text = url.strip()
    try:
        parsed = urlsplit(text)
        host, _port = parsed.hostname, parsed.port
    except ValueError:
        raise ValueError("must be an http(s) URL") from None
    if parsed.scheme not in ("http", "https") or not host or any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("must be an http(s) URL with a host (e.g. http://10.0.0.5:3000)")
    if "@" in text:
        raise ValueError("must not contain user:password@ or any '@' (it is handed to API clients)")
    if parsed.query or parsed.fragment or "?" in text or "#" in text:
        raise ValueError("must not have a query or a fragment (the request's path and query are appended)")
    if len(text) > 512:
        raise ValueError("must be at most 512 characters")
    return text.rstrip("/")


WORKER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DEFAULT_WORKER_ID: list[str] = []


def default_worker_id() -> str:
    """``<hostname>-<8 random hex>``: the same for the whole process (the hostname cleaned to the
    WORKER_ID alphabet and cut to fit)."""
    if not _DEFAULT_WORKER_ID:
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:110].lstrip("_.-") or "worker"
        _DEFAULT_WORKER_ID.append(f"{host}-{secrets.token_hex(4)}")
    return _DEFAULT_WORKER_ID[0]


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

    # --- a fleet (issue #13): leases through the proxy's optional POST /leases (docs/proxy-contract.md)
    WORKER_ID: str | None = None  # empty: <hostname>-<8 random hex>, chosen once, remembered in the journal
    MAX_INSTANCES: int = Field(500, ge=1, le=100_000)  # the capacity this worker asks leases for

    # --- media (outbound media_url / media_base64; inbound downloads)
    MEDIA_MAX_BYTES: int = Field(64 * 1024 * 1024, ge=1024)
    MEDIA_ALLOW_PRIVATE: bool = False  # fetch media from private/loopback/link-local addresses (dev only)
    MEDIA_FETCH_TIMEOUT_S: float = Field(120.0, gt=0)  # total per media_url: DNS, connect, redirects, body

    # --- account safety (issue #12): per-instance send pacing and number lookups; 0 = no cap
    SEND_MIN_GAP_MS: int = Field(0, ge=0, le=3_600_000)
    SEND_JITTER_MS: int = Field(0, ge=0, le=3_600_000)
    SEND_MAX_PER_MINUTE: int = Field(0, ge=0)
    SEND_MAX_PER_DAY: int = Field(0, ge=0)
    TYPING_INDICATOR: bool = False
    NUMBER_CACHE_DAYS: float = Field(7.0, gt=0, le=365)
    NUMBER_LOOKUPS_PER_MINUTE: int = Field(30, ge=0)  # 0: numbers are not checked

    # --- calls (issue #12): every call reaches /inbound; these decide whether it is declined first
    CALL_REJECT: bool = False
    CALL_REJECT_MESSAGE: str = Field("", max_length=4096)  # sent to the caller after a reject; empty: none

    # --- direct API and live events (issue #15): the /api routes exist only with API_TOKEN
    API_TOKEN: SecretStr | None = None  # one token, or several separated by commas (rotation)
    API_RATE_PER_MINUTE: int = Field(600, ge=1, le=1_000_000)  # per token; bursts of a sixth of it
    API_SEND_WAIT_S: float = Field(10.0, ge=0, le=60)  # a send answers its outcome within this, else 202
    # with leases: where API clients reach THIS worker (sent in POST /leases; other workers redirect there)
    API_PUBLIC_URL: str | None = None

    # --- neonize
    WA_BOT_BADGE: bool = False
    # sessions in PostgreSQL instead of AUTH_DIR (docs/fleet.md); empty: files, as always
    DATABASE_URL: SecretStr | None = None
    DATABASE_IDLE_TIMEOUT_S: float = Field(60.0, ge=0, le=86_400)  # 0: leave idle connections open
    # with DATABASE_URL: the journal there too (shared by the fleet); false: STATE_DB, a file of this worker's
    JOURNAL_IN_DATABASE: bool = True

    # --- simulator backend
    SIMULATOR_AUTO_SCAN_MS: int | None = Field(None, ge=0)
    SIMULATOR_SEND_DELAY_MS: int = Field(0, ge=0)

    # --- observability (docs/metrics.md)
    LOG_FORMAT: LogFormat = LogFormat.TEXT
    METRICS_PORT: int | None = Field(None, ge=0, le=65535)  # /metrics without auth on this port; empty: off
    METRICS_HOST: str = "127.0.0.1"  # where METRICS_PORT listens (0.0.0.0 only behind a private network)

    @field_validator("LOG_FORMAT", mode="before")
    @classmethod
    def _lower_format(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("METRICS_PORT", mode="before")
    @classmethod
    def _metrics_port_empty(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("EDGE_BASE_URL")
    @classmethod
    def _http_only(cls, v: HttpUrl) -> HttpUrl:
        if v.scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL")
        return v

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _level_any_case(cls, v: object) -> object:
        return v.strip().upper() if isinstance(v, str) else v

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

    @field_validator("WORKER_ID", mode="before")
    @classmethod
    def _worker_id_empty(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("WORKER_ID")
    @classmethod
    def _worker_id_valid(cls, v: str | None) -> str | None:
        if v is not None and not WORKER_ID_RE.fullmatch(v.strip()):
            raise ValueError("must be 1-128 characters: letters, digits, '_', '.', '-' (starting with a letter "
                             "or digit)")
        return None if v is None else v.strip()

    @property
    def worker_id(self) -> str:
        """WORKER_ID, or ``<hostname>-<8 random hex>`` chosen once per process."""
        return self.WORKER_ID or default_worker_id()

    @field_validator("DATABASE_URL", mode="before")
    @classmethod
    def _database_url_empty(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("DATABASE_URL")
    @classmethod
    def _database_url_valid(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            check_database_url(v.get_secret_value().strip())
        return v

    @property
    def database_url(self) -> str | None:
        """DATABASE_URL in clear (None: sessions stay in AUTH_DIR)."""
        return self.DATABASE_URL.get_secret_value().strip() if self.DATABASE_URL is not None else None

    @field_validator("API_TOKEN", mode="before")
    @classmethod
    def _api_token_empty(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("API_TOKEN")
    @classmethod
    def _api_tokens_valid(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        for token in v.get_secret_value().split(","):
            token = token.strip()
            if len(token) < 16 or not all("!" <= c <= "~" for c in token):
                raise ValueError("each token (comma-separated) must be at least 16 printable ASCII characters "
                                 "without spaces")
        return v

    @field_validator("API_PUBLIC_URL", mode="before")
    @classmethod
    def _api_public_url_empty(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("API_PUBLIC_URL")
    @classmethod
    def _api_public_url_valid(cls, v: str | None) -> str | None:
        return None if v is None else check_public_url(v)

    @property
    def api_tokens(self) -> tuple[str, ...]:
        """The API tokens (empty: no direct API)."""
        if self.API_TOKEN is None:
            return ()
        return tuple(t.strip() for t in self.API_TOKEN.get_secret_value().split(",") if t.strip())

    @model_validator(mode="after")
    def _api_token_not_worker_secret(self) -> "Settings":
        if self.WORKER_SECRET.get_secret_value() in self.api_tokens:
            raise ValueError("API_TOKEN must differ from WORKER_SECRET (the proxy's secret is not a client "
                             "credential)")
        return self

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


def _message(loc: str, err: Any) -> str:
    """pydantic's wording, said for a variable (never the offending input: it may be the secret)."""
    kind = err.get("type")
    ctx = err.get("ctx") or {}
    if kind in ("too_short", "string_too_short") and "min_length" in ctx:
        return f"must be at least {ctx['min_length']} characters"
    msg = str(err.get("msg", "invalid"))
    if loc == "EDGE_BASE_URL" and kind in ("url_parsing", "url_scheme"):
        msg += " (add http:// or https:// in front, e.g. https://your-project.supabase.co/functions/v1/worker-proxy)"
    return msg


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        if err.get("type") == "missing":
            parts.append(f"{loc} is required but not set")
        else:
            parts.append(f"{loc}: {_message(loc, err)}")
    return "invalid configuration: " + "; ".join(parts)


# one line per variable for ``wa-worker --help`` (README's configuration table says more)
DESCRIPTIONS: dict[str, str] = {
    "EDGE_BASE_URL": "base URL of the edge proxy, http(s) (required)",
    "WORKER_SECRET": "bearer secret shared with the proxy, min. 8 printable ASCII characters (required)",
    "PORT": "the worker's HTTP server port (binds 0.0.0.0)",
    "AUTH_DIR": "one private folder per instance: AUTH_DIR/<instanceId>/",
    "INSTANCE_POLL_MS": "discovery interval (GET /disconnected-instances)",
    "INSTANCE_POLL_MAX_MS": "discovery interval cap while nothing changes",
    "MSG_POLL_MS": "queue poll interval per connected instance",
    "MSG_POLL_MAX_MS": "queue poll interval cap while the instance is idle",
    "WA_BACKEND": "neonize (real WhatsApp) or simulator",
    "LOG_LEVEL": "DEBUG, INFO, WARNING or ERROR (any case)",
    "EDGE_TIMEOUT_S": "total time allowed for each proxy call",
    "EDGE_MAX_RESPONSE_BYTES": "largest proxy response read",
    "STATE_DB": "the worker's journal (SQLite, WAL)",
    "INBOUND_TTL_HOURS": "undelivered inbound older than this goes to the dead-letter table",
    "INBOUND_MAX_ATTEMPTS": "server errors on one inbound message before it is dead-lettered",
    "UNKNOWN_SEND_POLICY": "a send interrupted by a crash: at_most_once or at_least_once",
    "READY_MAX_PROXY_SILENCE_S": "/ready fails when the proxy has not answered for this long",
    "CONNECT_TIMEOUT_S": "a connection showing neither QR nor success in this time is retried",
    "START_CONCURRENCY": "instances connecting at once",
    "BATCH_POLL": "probe once whether the proxy serves every queue in one call",
    "WORKER_ID": "this worker's name in a fleet (X-Worker-Id, POST /leases); empty: chosen once, kept in STATE_DB",
    "MAX_INSTANCES": "with leases: the most instances this worker asks to hold",
    "MEDIA_MAX_BYTES": "largest media file sent or received",
    "MEDIA_ALLOW_PRIVATE": "let media_url point at private/loopback addresses (dev only)",
    "MEDIA_FETCH_TIMEOUT_S": "total time to fetch one media_url",
    "SEND_MIN_GAP_MS": "least time between two sends of one instance (0: none)",
    "SEND_JITTER_MS": "random extra wait added to each gap",
    "SEND_MAX_PER_MINUTE": "sends per instance per minute (0: no cap)",
    "SEND_MAX_PER_DAY": "sends per instance per day (0: no cap)",
    "TYPING_INDICATOR": "show 'typing…' before a text, for a time from its length",
    "NUMBER_CACHE_DAYS": "how long a phone number's WhatsApp lookup is remembered",
    "NUMBER_LOOKUPS_PER_MINUTE": "number lookups per instance per minute (0: numbers are not checked)",
    "LOG_FORMAT": "text or json (one JSON object per line)",
    "METRICS_PORT": "serve /metrics without auth on this port (empty: off)",
    "METRICS_HOST": "where METRICS_PORT listens",
    "CALL_REJECT": "decline every incoming call (each still reaches /inbound as type call)",
    "CALL_REJECT_MESSAGE": "text sent to the caller after a declined call (empty: none)",
    "API_TOKEN": "enables the direct API (/api): its bearer token(s), comma-separated, min. 16 characters each",
    "API_RATE_PER_MINUTE": "direct API requests per token per minute (429 beyond)",
    "API_PUBLIC_URL": "with leases and API_TOKEN: the base URL API clients reach this worker at (others redirect "
                      "there)",
    "API_SEND_WAIT_S": "how long POST /api/instances/{id}/messages waits for the outcome before answering 202",
    "WA_BOT_BADGE": "let neonize mark 1:1 messages with WhatsApp's AI badge",
    "DATABASE_URL": "WhatsApp sessions (the simulator's too) in this PostgreSQL database instead of AUTH_DIR",
    "DATABASE_IDLE_TIMEOUT_S": "with DATABASE_URL: the server closes a session connection idle this long (0: never)",
    "JOURNAL_IN_DATABASE": "with DATABASE_URL: keep the journal there too, shared by the fleet (false: STATE_DB)",
    "SIMULATOR_AUTO_SCAN_MS": "simulator only: the simulated phone scans each QR after this delay",
    "SIMULATOR_SEND_DELAY_MS": "simulator only: each simulated send takes this long",
}


def variables_help() -> str:
    """Every variable with its default and one line, for ``wa-worker --help``."""
    lines = []
    for name, field in Settings.model_fields.items():
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            value = value.value if isinstance(value, enum.Enum) else value
            default = "(empty)" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"  {name:<26} {default:<26} {DESCRIPTIONS.get(name, field.description or '')}")
    return "\n".join(lines)
