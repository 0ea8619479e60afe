"""One configuration schema for command-line flags and ``ROOMSHARD_*`` variables.

Each service has a frozen dataclass whose fields are its settings. A field's
environment variable is ``ROOMSHARD_`` + its upper-cased name, its flag is
``--`` + its name with dashes; a flag beats the variable, the variable beats
the default. :func:`load` builds the object once at start-up and it is passed
down explicitly: nothing below the command line reads ``os.environ``.

A missing or invalid setting raises :class:`ConfigError`, whose message is
one line naming the setting; the command line prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from roomshard import linger
from roomshard.wire import protocol
from roomshard.wire.tickets import parse_secrets

ENV_PREFIX = "ROOMSHARD_"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///roomshard.db"


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line for the operator."""


def setting(default: Any = dataclasses.MISSING, *, help: str = "", secret: bool = False,
            flag: bool = True) -> Any:
    """A dataclass field that is also a flag and an environment variable."""
    meta = {"help": help, "secret": secret, "flag": flag}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


T = TypeVar("T")


def _parse(kind: Any, raw: Any, what: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw is None or raw == "":
            return None
        return _parse(args[0], raw, what)
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if origin is tuple:
            return tuple(s.strip() for s in raw.split(",") if s.strip())
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{what}: expected {name}, got {raw!r}") from None
    return raw


def load(cls: type[T], flags: Mapping[str, Any] | None = None,
         env: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from flags (None means unset), then environment, then defaults."""
    flags = flags or {}
    env = env if env is not None else {}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if flags.get(f.name) is not None:
            values[f.name] = _parse(hints[f.name], flags[f.name], flag_name(f.name))
        elif env.get(env_name(f.name)) not in (None, ""):
            values[f.name] = _parse(hints[f.name], env[env_name(f.name)], env_name(f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if f.metadata.get("secret") or not f.metadata.get("flag", True):
                raise ConfigError(f"missing setting: {env_name(f.name)}")
            raise ConfigError(f"missing setting: {flag_name(f.name)} or {env_name(f.name)}")
    try:
        obj = cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return obj


#: ROOMSHARD_HISTORY_RETENTION's default: 30 days.
DEFAULT_HISTORY_RETENTION_S = 30 * 24 * 3600.0


def normalize_database_url(url: str, setting_name: str = "ROOMSHARD_DATABASE_URL") -> str:
    """Plain ``sqlite://`` and ``postgresql://`` mean their async drivers."""
    for plain, async_ in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return async_ + url[len(plain):]
    if url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return url
    raise ConfigError(
        f"{setting_name}: unsupported database URL {url.split(':', 1)[0]!r} "
        "(use sqlite+aiosqlite:// or postgresql+asyncpg://)"
    )


LINGER_SETTINGS = ("close_linger_time", "close_linger_timeout", "close_linger_bytes",
                   "close_linger_max")


def linger_limits(cfg: DirectoryConfig | ShardConfig) -> linger.LingerLimits:
    """The lingering-close bounds of a service's settings."""
    return linger.LingerLimits(time=cfg.close_linger_time, timeout=cfg.close_linger_timeout,
                               bytes=cfg.close_linger_bytes, max=cfg.close_linger_max)


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{env_name(name)}: must be positive")


@dataclass(frozen=True, kw_only=True)
class DirectoryConfig:
    host: str = setting("127.0.0.1", help="address to bind")
    port: int = setting(8080, help="port to bind (0 picks a free one)")
    database_url: str = setting(DEFAULT_DATABASE_URL, help="SQLAlchemy URL")
    database_pool_warm: int = setting(30, help="PostgreSQL connections opened at start (at most the pool's 30, which a connect storm fills anyway): the first storm finds them ready; 0 opens them as needed")
    public_url: str | None = setting(None, help="load balancer address, e.g. wss://chat.example.com")
    route_check: bool = setting(False, help="a shard's new process is 'pending' (no rooms) until GET <its public_base, else the public URL>/iN/room/~probe answers from that very process through the load balancer; off: active at once")
    admin_token: str = setting(help="bearer token of the admin API", secret=True)
    auth: str = setting(help="client auth mode: open or jwt")
    jwt_secret: str | None = setting(None, help="HS256 key of application JWTs", secret=True)
    jwt_public_key: str | None = setting(None, help="RS256/ES256 PEM public key of application JWTs")
    ticket_ttl: int = setting(protocol.DEFAULT_TICKET_TTL_S, help="ticket lifetime, seconds")
    cluster_secret: str = setting(help="signs tickets and cluster calls (comma list rotates)", secret=True)
    down_after: float = setting(protocol.DEFAULT_DOWN_AFTER_S, help="seconds without heartbeat before an instance is down")
    close_linger_time: float = setting(linger.DEFAULT_LINGER_TIME_S, help="longest a closed connection is read and dropped before its socket is reset (lingering close)")
    close_linger_timeout: float = setting(linger.DEFAULT_LINGER_TIMEOUT_S, help="a lingering connection closes after this many seconds without input")
    close_linger_bytes: int = setting(linger.DEFAULT_LINGER_BYTES, help="a lingering connection is reset after dropping this many bytes")
    close_linger_max: int = setting(1_000, help="lingering connections at once; past it a connection closes at once")
    default_capacity: int = setting(1000, help="capacity of a shard that does not state one")
    room_create_rate: float = setting(60.0, help="new rooms one user may create per minute, per directory replica (0: no budget)")
    room_create_rate_per_address: float = setting(0.0, help="new rooms one client address may create per minute (0: no budget; for public open-mode deployments)")
    room_unused_ttl: float = setting(600.0, help="seconds after which a room no member ever joined is removed (0: never)")
    connect_queue_wait: float = setting(2.0, help="a connect that waited longer than this (seconds) for its turn is answered 503 overloaded with Retry-After: the directory sheds load instead of answering late")
    connects_in_flight: int = setting(1_000, help="connects read and not answered yet; past it, a connect is answered 503 overloaded with Retry-After before it is queued (the shards' calls never wait behind more)")
    history_url: str = setting("memory", help="message store the history API reads (the shards' ROOMSHARD_HISTORY_URL) or memory (ask the owning shard)")
    history_retention: float = setting(DEFAULT_HISTORY_RETENTION_S, help="seconds a stored message is kept: the history API returns none older")
    api_keys: str | None = setting(None, help="comma-separated bearer keys of the server API (publish); the admin token works too", secret=True)
    ready_file: str | None = setting(None, help="write {\"url\": ...} here once serving")
    log_level: str = setting("info", help="debug, info, warning, error")

    def __post_init__(self) -> None:
        object.__setattr__(self, "database_url", normalize_database_url(self.database_url))
        if self.history_url != "memory":
            object.__setattr__(self, "history_url", normalize_database_url(self.history_url, "ROOMSHARD_HISTORY_URL"))
        if self.auth not in ("open", "jwt"):
            raise ConfigError(f"ROOMSHARD_AUTH: must be 'open' or 'jwt', got {self.auth!r}")
        if self.auth == "jwt" and not (self.jwt_secret or self.jwt_public_key):
            raise ConfigError("ROOMSHARD_AUTH=jwt needs ROOMSHARD_JWT_SECRET or ROOMSHARD_JWT_PUBLIC_KEY")
        if not parse_secrets(self.cluster_secret):
            raise ConfigError("ROOMSHARD_CLUSTER_SECRET: empty")
        if not self.admin_token.strip():
            raise ConfigError("ROOMSHARD_ADMIN_TOKEN: empty")
        _check_positive(self, "ticket_ttl", "down_after", "default_capacity", "history_retention",
                        "connect_queue_wait", "connects_in_flight", *LINGER_SETTINGS)
        for name in ("room_create_rate", "room_create_rate_per_address", "room_unused_ttl",
                     "database_pool_warm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{env_name(name)}: must be 0 (off) or positive")
        if not 0 <= self.port <= 65535:
            raise ConfigError("ROOMSHARD_PORT: must be 0..65535")

    @property
    def cluster_secrets(self) -> list[str]:
        return parse_secrets(self.cluster_secret)

    @property
    def server_api_keys(self) -> list[str]:
        return parse_secrets(self.api_keys or "")

#: ``--instance auto``: the directory numbers the shard (``POST /v1/internal/instances``).
AUTO_INSTANCE = "auto"


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    instance: str = setting(AUTO_INSTANCE, help="instance id iN, or auto: the directory gives this process a number at start-up (the one a gone process at this address had, else the lowest free), and it leaves the registry when it stops")
    host: str = setting("127.0.0.1", help="address to bind")
    port: int = setting(8081, help="port to bind (0 picks a free one)")
    directory_url: str = setting(help="the directory's internal http(s) URL")
    advertise_url: str | None = setting(None, help="internal URL the directory reaches this shard at")
    public_base: str | None = setting(None, help="public ws(s):// base of this instance's room URLs")
    capacity: int | None = setting(None, help="relative capacity (placement weight)")
    cluster_secret: str = setting(help="signs tickets and cluster calls (comma list rotates)", secret=True)
    history: int = setting(protocol.DEFAULT_HISTORY, help="messages kept per room for resume")
    history_bytes: int = setting(protocol.DEFAULT_HISTORY_BYTES, help="bytes of message history kept per room (oldest leave first)")
    history_bytes_total: int = setting(protocol.DEFAULT_HISTORY_BYTES_TOTAL, help="bytes of message history kept by the whole shard (its oldest leave first)")
    history_url: str = setting("memory", help="message store: a SQLAlchemy URL (sqlite or postgresql; messages are stored before they are acked) or memory")
    store_queue_bytes: int = setting(16 << 20, help="bytes of messages waiting for the store past which sends are refused (unavailable)")
    store_wait: float = setting(5.0, help="seconds a message may wait for the store before new sends are refused (unavailable)")
    history_retention: float = setting(DEFAULT_HISTORY_RETENTION_S, help="seconds a stored message is kept (expired in bounded batches off the hot path)")
    store_linger: float = setting(0.010, help="seconds the store's writer lets a batch gather after a quiet spell (adds at most this to a message's latency)")
    presence_batch: float = setting(0.25, help="seconds a room gathers presence frames under churn: the first after a quiet spell goes at once, the window's others together at its end (0: each at once)")
    presence_batch_max: float = setting(2.0, help="seconds a room's presence window grows to while the churn goes on (each busy window twice the last, from presence_batch)")
    room_linger: float = setting(protocol.DEFAULT_ROOM_LINGER_S, help="seconds a room stays in memory after its last member leaves")
    idempotency_window: float = setting(protocol.DEFAULT_IDEMPOTENCY_WINDOW_S, help="seconds a client message id is remembered")
    max_text: int = setting(protocol.DEFAULT_MAX_TEXT, help="max characters of a message text")
    max_frame: int = setting(protocol.DEFAULT_MAX_FRAME, help="max bytes of an incoming frame")
    rate: float = setting(protocol.DEFAULT_RATE_PER_S, help="messages per second per connection")
    rate_burst: int = setting(protocol.DEFAULT_RATE_BURST, help="burst of messages per connection")
    max_connections: int = setting(100_000, help="connections per shard")
    send_queue_bytes: int = setting(1 << 20, help="outgoing buffer per connection before 4009")
    ping_interval: float = setting(protocol.DEFAULT_PING_INTERVAL_S, help="seconds between pings")
    ping_timeout: float = setting(protocol.DEFAULT_PING_TIMEOUT_S, help="seconds to wait for a pong")
    frame_rate: float = setting(protocol.DEFAULT_FRAME_RATE_PER_S, help="frames per second per connection, control frames included (over: 4008)")
    frame_burst: int = setting(protocol.DEFAULT_FRAME_BURST, help="burst of frames per connection")
    byte_rate: float = setting(protocol.DEFAULT_BYTE_RATE_PER_S, help="bytes per second a connection may send (over: 4008)")
    byte_burst: int = setting(protocol.DEFAULT_BYTE_BURST, help="burst of bytes per connection (at least max_frame)")
    max_fragments: int = setting(protocol.DEFAULT_MAX_FRAGMENTS, help="max frames of one fragmented message (over: 1009)")
    max_connections_per_address: int = setting(protocol.DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, help="WebSockets per client address, 0 = no cap (over: 4008)")
    close_linger_time: float = setting(linger.DEFAULT_LINGER_TIME_S, help="longest a closed connection is read and dropped before its socket is reset (lingering close)")
    close_linger_timeout: float = setting(linger.DEFAULT_LINGER_TIMEOUT_S, help="a lingering connection closes after this many seconds without input")
    close_linger_bytes: int = setting(linger.DEFAULT_LINGER_BYTES, help="a lingering connection is reset after dropping this many bytes")
    close_linger_max: int = setting(10_000, help="lingering connections at once; past it a connection closes at once")
    heartbeat_interval: float = setting(protocol.DEFAULT_HEARTBEAT_INTERVAL_S, help="seconds between heartbeats")
    lease: float = setting(6.0, help="stop serving rooms after this many seconds without a heartbeat ack")
    allowed_origins: tuple[str, ...] = setting((), help="comma list of allowed Origin values (empty: any)")
    permessage_deflate: bool = setting(False, help="offer permessage-deflate")
    shutdown_timeout: float = setting(10.0, help="seconds to drain on SIGTERM before closing")
    ready_file: str | None = setting(None, help="write {\"url\": ...} here once serving")
    log_level: str = setting("info", help="debug, info, warning, error")
    remove_on_stop: bool | None = setting(None, help="on a clean stop, after its rooms moved away, leave the registry (its number and route go); default: on for --instance auto, off otherwise (on for a Kubernetes StatefulSet that scales in)")
    asg_lifecycle_hook: str | None = setting(None, help="name of the Auto Scaling group's termination lifecycle hook: when the group terminates this machine the shard stops as on SIGTERM (rooms move away first), then completes the hook")
    imds_url: str = setting("http://169.254.169.254", help="the EC2 instance metadata service (ROOMSHARD_ASG_LIFECYCLE_HOOK)")
    lifecycle_poll: float = setting(5.0, help="seconds between reads of the machine's lifecycle state (ROOMSHARD_ASG_LIFECYCLE_HOOK)")

    def __post_init__(self) -> None:
        if self.instance != AUTO_INSTANCE and protocol.instance_number(self.instance) is None:
            raise ConfigError(f"--instance: expected i1..i9999 or auto, got {self.instance!r}")
        if not self.directory_url.startswith(("http://", "https://")):
            raise ConfigError("ROOMSHARD_DIRECTORY_URL: must be an http:// or https:// URL")
        if not parse_secrets(self.cluster_secret):
            raise ConfigError("ROOMSHARD_CLUSTER_SECRET: empty")
        if self.history_url != "memory":
            object.__setattr__(self, "history_url", normalize_database_url(self.history_url, "ROOMSHARD_HISTORY_URL"))
        _check_positive(self, "lifecycle_poll", "history", "history_bytes", "history_bytes_total", "store_queue_bytes", "store_wait", "history_retention", "max_text", "max_frame", "rate", "rate_burst",
                        "max_connections", "send_queue_bytes", "ping_interval",
                        "ping_timeout", "heartbeat_interval", "lease", "frame_rate",
                        "frame_burst", "byte_rate", "byte_burst", "max_fragments",
                        *LINGER_SETTINGS)
        if self.max_connections_per_address < 0:
            raise ConfigError("ROOMSHARD_MAX_CONNECTIONS_PER_ADDRESS: must be 0 (off) or positive")
        if self.presence_batch < 0:
            raise ConfigError("ROOMSHARD_PRESENCE_BATCH: must be 0 (each at once) or positive")
        if self.presence_batch_max < self.presence_batch:
            raise ConfigError("ROOMSHARD_PRESENCE_BATCH_MAX: must be at least ROOMSHARD_PRESENCE_BATCH")
        if self.store_linger < 0:
            raise ConfigError("ROOMSHARD_STORE_LINGER: must be 0 (write at once) or positive")
        if self.byte_burst < self.max_frame:
            raise ConfigError("ROOMSHARD_BYTE_BURST: must be at least ROOMSHARD_MAX_FRAME")
        if self.lease <= self.heartbeat_interval:
            raise ConfigError("ROOMSHARD_LEASE: must be longer than the heartbeat interval")
        if not 0 <= self.port <= 65535:
            raise ConfigError("ROOMSHARD_PORT: must be 0..65535")

    @property
    def cluster_secrets(self) -> list[str]:
        return parse_secrets(self.cluster_secret)

def click_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command with one option per flag-able field of ``cls``.

    Options default to None so :func:`load` can tell "unset" from a value and
    fall back to the environment.
    """
    import click

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(cls)):
            if not f.metadata.get("flag", True) or f.metadata.get("secret"):
                continue  # secrets come from the environment, never argv
            fn = click.option(flag_name(f.name), f.name, default=None,
                              help=f"{f.metadata.get('help', '')} [{env_name(f.name)}]")(fn)
        return fn

    return deco
