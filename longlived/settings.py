"""Configuration: one ``Settings`` tree read from CLI flags, env vars, ``.env`` and defaults.

Precedence: CLI flags > ``LONGLIVED_*`` environment variables > ``.env`` > defaults. Nested
fields use ``__`` in env vars (``LONGLIVED_BACKOFF__MAX=30``) and ``.`` in flags
(``--backoff.max 30``). Invalid values raise ``ConfigError`` with one line per problem,
naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

from dotenv import dotenv_values
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from longlived.backoff import Backoff
from longlived.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "AuthSettings",
    "BackoffSettings",
    "HeartbeatSettings",
    "KeepaliveSettings",
    "LimitSettings",
    "MetricsSettings",
    "PublishSettings",
    "QueueSettings",
    "RedisSettings",
    "ReplaySettings",
    "Settings",
    "StateSettings",
    "TlsSettings",
    "format_settings_error",
    "format_validation_error",
    "load_settings",
    "parse_address",
]

ENV_PREFIX = "LONGLIVED_"
ENV_FILE = ".env"


def parse_address(value: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6]:port``) into its parts, or raise ``ValueError``."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected host:port (for example 127.0.0.1:7070), got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif not all(ch.isalnum() or ch in ".-_" for ch in host):
        raise ValueError(f"host {host!r} is not a hostname or IP address")
    return host, port


def _check_address(value: str) -> str:
    parse_address(value)
    return value.strip()


Address = Annotated[str, AfterValidator(_check_address)]

_NONE_WORDS = frozenset({"null", "none"})


def _none_words(model: type[BaseModel], data: object) -> object:
    """``data`` with ``null`` / ``none`` (any case) as None for the fields that may be None:
    env vars and flags are text, and "unset" has to be spelled somehow."""
    if not isinstance(data, dict):
        return data
    fields = model.model_fields
    return {
        name: None
        if isinstance(value, str)
        and value.strip().lower() in _NONE_WORDS
        and name in fields
        and type(None) in get_args(fields[name].annotation)
        else value
        for name, value in data.items()
    }


class _Group(BaseModel):
    """A group of settings (``LONGLIVED_<GROUP>__<NAME>``, ``--<group>.<name>``)."""

    @model_validator(mode="before")
    @classmethod
    def _unset(cls, data: object) -> object:
        return _none_words(cls, data)


class BackoffSettings(_Group):
    """Client reconnect backoff (gRPC connection-backoff defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: float = Field(default=1.0, gt=0, description="delay before the first retry, seconds")
    multiplier: float = Field(
        default=1.6, ge=1, description="growth of the delay per failed attempt"
    )
    jitter: float = Field(
        default=0.2, ge=0, lt=1, description="relative random spread of each delay"
    )
    max: float = Field(default=120.0, gt=0, description="cap on the delay, seconds")
    max_attempts: int = Field(
        default=0, ge=0, description="give up after this many failures in a row (0 = never)"
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> BackoffSettings:
        if self.max < self.initial:
            raise ValueError(f"max ({self.max}) must be >= initial ({self.initial})")
        return self

    def to_backoff(self) -> Backoff:
        """The ``Backoff`` value object these settings describe."""
        return Backoff(
            initial=self.initial, multiplier=self.multiplier, jitter=self.jitter, max=self.max
        )


class QueueSettings(_Group):
    """Per-subscriber outgoing queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="live messages a subscriber may have queued before it counts as too slow",
    )  # fmt: skip
    policy: Literal["disconnect", "drop"] = Field(
        default="disconnect",
        description="a full queue: `disconnect` ends the stream (RESOURCE_EXHAUSTED; the client "
        "resumes from history), `drop` discards the queue and sends RESET",
    )


class ReplaySettings(_Group):
    """The in-memory history that resuming subscribers catch up from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(default=10_000, ge=0, le=10_000_000, description="events kept for resuming")


class StateSettings(_Group):
    """The keyed state: the latest value per key of ``put`` events, for snapshots."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_keys: int = Field(
        default=100_000, ge=0, le=100_000_000,
        description="keys the state may hold in all; a put of a new key beyond it is refused",
    )  # fmt: skip


class HeartbeatSettings(_Group):
    """Heartbeats on idle streams (opt-in per subscription)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: float = Field(
        default=0.0, ge=0, le=3600,
        description="client: ask for a heartbeat after this many idle seconds (0 = none)",
    )  # fmt: skip
    misses: float = Field(
        default=3.0, ge=1, le=100,
        description="client: a stream silent for misses x interval counts as dead",
    )  # fmt: skip
    min_interval: float = Field(
        default=0.05, gt=0, le=3600,
        description="server: shortest heartbeat period it grants a client, seconds",
    )  # fmt: skip


class KeepaliveSettings(_Group):
    """HTTP/2 keepalive pings, on the server and on clients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: float | None = Field(
        default=30.0, gt=0, le=86_400,
        description="send a ping after this many seconds (null = never); a peer that does not "
        "answer within `timeout` is dropped",
    )  # fmt: skip
    timeout: float = Field(
        default=10.0, gt=0, le=3600, description="seconds to wait for a ping's ack"
    )
    permit_without_calls: bool = Field(
        default=True, description="ping even when the connection carries no stream"
    )
    max_pings_without_data: int = Field(
        default=0, ge=0, le=1000,
        description="pings sent in a row without data in between (0 = unlimited)",
    )  # fmt: skip


class TlsSettings(_Group):
    """TLS and mutual TLS. The server uses TLS when `cert` and `key` are set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: Path | None = Field(
        default=None, description="PEM certificate: the server's, or the client's for mutual TLS"
    )
    key: Path | None = Field(default=None, description="PEM private key of `cert`")
    ca: Path | None = Field(
        default=None,
        description="PEM CA bundle: on the server, clients must present a certificate it "
        "signed (mutual TLS); on the client, the server's certificate must chain to it",
    )
    enabled: bool = Field(
        default=False,
        description="client: use TLS (implied by `ca`; system CAs when `ca` is unset)",
    )
    server_name: str | None = Field(
        default=None, description="client: name to verify the server certificate against"
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be set together")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not path.is_file():
                raise ValueError(f"no such file: {path}")
        return self


class AuthSettings(_Group):
    """Bearer-token authentication (on when `tokens` is not empty)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: dict[str, str] = Field(
        default_factory=dict,
        description="server: accepted bearer tokens, each mapped to the caller's name "
        '(JSON, e.g. \'{"s3cret": "alice"}\')',
    )
    token: str | None = Field(default=None, description="client: bearer token to send")
    publishers: list[str] = Field(
        default_factory=list,
        description="server: callers (names from `tokens`) allowed to publish when auth is "
        "on; nobody else may",
    )
    public_methods: list[str] = Field(
        default_factory=lambda: ["/grpc.health.v1.Health/Check"],
        description="server: methods served without a token when auth is on (load balancer "
        "and Kubernetes probes cannot send one); everything else needs one",
    )


class LimitSettings(_Group):
    """Bounds on what clients may ask of the server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_subscribers: int = Field(
        default=100_000, ge=1, le=10_000_000,
        description="open subscriptions at most; more get RESOURCE_EXHAUSTED",
    )  # fmt: skip
    max_message_size: int = Field(
        default=65_536, ge=64, le=64 * 1024 * 1024,
        description="largest request message accepted, bytes; larger get RESOURCE_EXHAUSTED",
    )  # fmt: skip
    max_event_size: int = Field(
        default=1 << 20, ge=64, le=64 * 1024 * 1024,
        description="largest Publish request accepted, bytes; larger get RESOURCE_EXHAUSTED",
    )  # fmt: skip
    admission_timeout: float = Field(
        default=10.0, gt=0, le=3600,
        description="seconds a call gets to present its credentials and its whole request; "
        "later: DEADLINE_EXCEEDED",
    )  # fmt: skip
    max_pending_streams: int = Field(
        default=100, ge=1, le=1_000_000,
        description="streams per connection whose request has not fully arrived; more are "
        "refused (RESOURCE_EXHAUSTED)",
    )  # fmt: skip
    max_metadata_size: int = Field(
        default=16_384, ge=1024, le=1 << 20,
        description="request metadata per call, bytes (HPACK size); more fail that call "
        "(RESOURCE_EXHAUSTED)",
    )  # fmt: skip
    resets_per_second: float = Field(
        default=100.0, gt=0, le=1_000_000,
        description="streams a connection may reset per second, sustained; beyond that and "
        "the burst it gets GOAWAY ENHANCE_YOUR_CALM",
    )  # fmt: skip
    reset_burst: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="stream resets allowed at once on top of the rate",
    )


class PublishSettings(_Group):
    """Publishing from other processes (the Publish RPC, `Publisher`, `longlived publish`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dedup_window: float = Field(
        default=120.0, gt=0, le=86_400,
        description="server: a publish retried with the same idempotency key within this many "
        "seconds is emitted once; publisher: no retry may end later than this after a "
        "publish's first attempt (give it the server's value)",
    )  # fmt: skip
    dedup_max_keys: int = Field(
        default=100_000, ge=1, le=10_000_000,
        description="server: idempotency keys remembered at most (the oldest go first)",
    )  # fmt: skip
    timeout: float = Field(
        default=10.0, gt=0, le=3600,
        description="publisher: how long one publish attempt may take, seconds",
    )  # fmt: skip
    via: Literal["server", "redis"] = Field(
        default="server",
        description="publisher: through a server's Publish RPC, or appended to the shared log "
        "at `redis.url` directly (Redis access is then the only check of who may publish)",
    )


class RedisSettings(_Group):
    """The shared event log on Redis Streams (several replicas; off unless `url` is set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        default=None,
        description="redis:// or rediss:// URL of the shared log (unset = in memory, one process)",
    )
    stream: str = Field(
        default="longlived", min_length=1, max_length=200,
        description="name of the log: its keys are `{name}:events`, `{name}:epoch`, ... (one "
        "Redis Cluster slot)",
    )  # fmt: skip
    maxlen: int = Field(
        default=100_000, ge=1, le=100_000_000,
        description="events the stream keeps (XADD MAXLEN ~): how far back a client can resume",
    )  # fmt: skip

    cluster: bool = Field(
        default=False,
        description="`url` names a node of a Redis Cluster (the log's keys share a slot)",
    )
    timeout: float = Field(
        default=5.0, gt=0, le=3600,
        description="seconds a Redis command may take before the log counts as unavailable "
        "(a frozen or unreachable Redis fails publishes instead of hanging them)",
    )  # fmt: skip
    claim_ttl: int = Field(
        default=86_400, ge=1, le=365 * 86_400,
        description="seconds a subscriber id stays owned by its caller after its last "
        "subscribe (auth on): cover how long its events stay in the stream",
    )  # fmt: skip

    @model_validator(mode="after")
    def _url_scheme(self) -> RedisSettings:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"url must start with redis://, rediss:// or unix://, got {self.url!r}"
            )
        return self


class MetricsSettings(_Group):
    """Prometheus metrics endpoint (off unless `port` is set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int | None = Field(
        default=None, ge=0, le=65535, description="serve /metrics on this port (0 = any free port)"
    )
    host: str = Field(default="127.0.0.1", description="address the metrics endpoint listens on")


class Settings(BaseSettings):
    """Everything longlived reads from its environment.

    Each field maps to the env var ``LONGLIVED_<NAME>`` (nested:
    ``LONGLIVED_<GROUP>__<NAME>``) and the flag ``--<name>`` (nested: ``--<group>.<name>``);
    the documentation's Settings page lists every one with its default and meaning, as
    ``longlived COMMAND --help`` does. ``Settings()`` reads the environment and ``.env``;
    keyword arguments override them. Instances are frozen.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=ENV_FILE,
        extra="ignore",
        validate_default=True,
        frozen=True,
    )

    address: Address = Field(
        default="127.0.0.1:7070",
        description="host:port the server listens on and clients connect to ([::1]:7070 for "
        "IPv6; port 0: any free port, for serve and demo)",
    )
    interval: float = Field(
        default=1.0, gt=0, le=86_400, description="mock generator period, seconds"
    )
    source: Literal["mock", "none"] = Field(
        default="mock",
        description="serve: where events come from: `mock` (the original's generator) or "
        "`none` (only Publish and the app's own calls)",
    )
    count: int = Field(
        default=10, ge=1, le=100_000, description="clients started by `clients`/`demo`"
    )
    stagger: float = Field(
        default=2.0, ge=0, le=3600, description="pause between starting two clients, seconds"
    )
    duration: float | None = Field(
        default=None,
        gt=0,
        description="stop after this many seconds (unset = run until Ctrl-C/SIGTERM)",
    )
    package: Literal["longlived", "protos"] = Field(
        default="longlived",
        description="proto package of the paths the client calls "
        "(`protos`: the original Go server)",
    )
    max_streams_per_connection: int = Field(
        default=1024,
        ge=1,
        le=2**31 - 1,
        description="HTTP/2 MAX_CONCURRENT_STREAMS the server advertises and enforces "
        "(h2's default is 100)",
    )
    connect_timeout: float = Field(
        default=20.0,
        gt=0,
        le=3600,
        description="client: how long one subscribe attempt may take to be answered, seconds",
    )
    drain_timeout: float = Field(
        default=10.0, gt=0, le=3600,
        description="shutdown: how long streams get to end before they are cancelled, seconds",
    )  # fmt: skip
    max_connection_age: float | None = Field(
        default=None, gt=0, le=30 * 86_400,
        description="end streams older than this (±10 %) with UNAVAILABLE so clients "
        "reconnect and load balancers can rebalance, seconds (null = never)",
    )  # fmt: skip
    health: bool = Field(default=True, description="serve grpc.health.v1 (Check and Watch)")
    reflection: bool = Field(default=True, description="serve gRPC server reflection")
    event_loop: Literal["asyncio", "uvloop"] = Field(
        default="asyncio",
        description="the event loop the command runs on: `uvloop` (the `longlived[uvloop]` "
        "extra) may cost less per socket write; an app that runs its own loop chooses it "
        "itself (`uvloop.run`)",
    )
    log_format: Literal["plain", "json"] = Field(
        default="plain", description="CLI log lines: plain text or JSON objects"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="logging level of the CLI"
    )
    topics: list[str] = Field(
        default_factory=list,
        description="client: receive only events published on these topics (empty = all)",
    )
    backoff: BackoffSettings = Field(default_factory=BackoffSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    state: StateSettings = Field(default_factory=StateSettings)
    heartbeat: HeartbeatSettings = Field(default_factory=HeartbeatSettings)
    keepalive: KeepaliveSettings = Field(default_factory=KeepaliveSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)

    @model_validator(mode="before")
    @classmethod
    def _unset(cls, data: object) -> object:
        return _none_words(cls, data)

    @property
    def host(self) -> str:
        """The host part of ``address``."""
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        """The port part of ``address``."""
        return parse_address(self.address)[1]


def _names(loc: Sequence[str]) -> tuple[str, str]:
    """The env var and the flag of the setting at ``loc`` (``["backoff", "max"]``)."""
    return ENV_PREFIX + "__".join(loc).upper(), "--" + ".".join(p.replace("_", "-") for p in loc)


def format_validation_error(error: ValidationError) -> str:
    """One line per invalid value: env var, flag, value, and what is allowed."""
    lines = []
    for item in error.errors(include_url=False):
        env, flag = _names([str(part) for part in item["loc"] if not isinstance(part, int)])
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"invalid {env} (flag {flag}) = {item['input']!r}: {message}")
    return "\n".join(lines)


def _expected_json(loc: Sequence[str]) -> str | None:
    """What JSON the setting at ``loc`` takes, or None if it is not read as JSON."""
    model: type[BaseModel] = Settings
    for depth, name in enumerate(loc):
        field = model.model_fields.get(name)
        if field is None:
            return None
        kind = get_origin(field.annotation) or field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if depth == len(loc) - 1:
                return f"an object of {kind.__name__} fields"
            model = kind
        elif kind is dict:
            return 'an object such as {"name": "value"}'
        elif kind is list:
            return 'a list such as ["a", "b"]'
    return None


def format_settings_error(error: SettingsError, environ: Mapping[str, str] | None = None) -> str:
    """A value that is not the JSON its setting needs (a list, an object), as one line naming
    the env var (or flag), the value and the expected format."""
    text = str(error)
    if flag := re.fullmatch(r"Parsing error encountered for ([\w.]+): (.*)", text, re.DOTALL):
        loc = flag.group(1).split(".")
        wanted = _expected_json(loc) or "a valid value"
        return f"invalid flag {_names(loc)[1]}: {flag.group(2)}; expected JSON, {wanted}"
    source = re.fullmatch(r'error parsing value for field "(\w+)" from source "(\w+)"', text)
    if source is None:
        return text
    values: Mapping[str, str | None]
    if source.group(2) == "DotEnvSettingsSource":
        values = dotenv_values(ENV_FILE)
    else:
        values = os.environ if environ is None else environ
    return _bad_json(values, source.group(1)) or text


def _bad_json(values: Mapping[str, str | None], field: str) -> str | None:
    """The complaint about the first of ``values`` (env vars) that sets ``field`` or one of
    its settings and is not JSON although its setting needs JSON."""
    for name, value in values.items():
        if value is None or not name.upper().startswith(ENV_PREFIX):
            continue
        loc = name[len(ENV_PREFIX) :].lower().split("__")
        expected = _expected_json(loc)
        if loc[0] != field or expected is None:
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            env, flag = _names(loc)
            return f"invalid {env} (flag {flag}) = {value!r}: expected JSON, {expected} ({exc})"
    return None


def load_settings(**overrides: object) -> Settings:
    """Build ``Settings`` from env and ``.env`` (plus ``overrides``), raising ``ConfigError``."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]  # keys checked by pydantic
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except SettingsError as exc:
        raise ConfigError(format_settings_error(exc)) from None
