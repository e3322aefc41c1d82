"""longlived: typed long-lived gRPC server-streaming subscriptions.

The public API is re-exported here; everything else is internal.
"""

from __future__ import annotations

from longlived._proto.longlived import (
    LonglivedBase,
    LonglivedStub,
    Request,
    Response,
    ResponseKind,
)
from longlived.auth import Caller
from longlived.backoff import Backoff
from longlived.cache import Change, ChangeType, WatchCache
from longlived.client import RETRYABLE_STATUSES, ResilientClient
from longlived.errors import (
    ConfigError,
    LogUnavailable,
    LonglivedError,
    PublishRefused,
    ResumeExpired,
    RetriesExhausted,
    StateFull,
    SubscriptionClosed,
    TlsError,
)
from longlived.events import Published
from longlived.hub import EndReason, Event, Hub, Kind, Position, Subscriber
from longlived.payload import PayloadTypeError, TypedEvent, pack, unpack
from longlived.publisher import Publisher
from longlived.server import PACKAGES, SubscriptionManager
from longlived.settings import (
    AuthSettings,
    BackoffSettings,
    HeartbeatSettings,
    KeepaliveSettings,
    LimitSettings,
    MetricsSettings,
    PublishSettings,
    QueueSettings,
    RedisSettings,
    ReplaySettings,
    Settings,
    StateSettings,
    TlsSettings,
    load_settings,
)

__all__ = [
    "PACKAGES",
    "RETRYABLE_STATUSES",
    "AuthSettings",
    "Backoff",
    "BackoffSettings",
    "Caller",
    "Change",
    "ChangeType",
    "ConfigError",
    "EndReason",
    "Event",
    "HeartbeatSettings",
    "Hub",
    "KeepaliveSettings",
    "Kind",
    "LimitSettings",
    "LogUnavailable",
    "LonglivedBase",
    "LonglivedError",
    "LonglivedStub",
    "MetricsSettings",
    "PayloadTypeError",
    "Position",
    "PublishRefused",
    "PublishSettings",
    "Published",
    "Publisher",
    "QueueSettings",
    "RedisSettings",
    "ReplaySettings",
    "Request",
    "ResilientClient",
    "Response",
    "ResponseKind",
    "ResumeExpired",
    "RetriesExhausted",
    "Settings",
    "StateFull",
    "StateSettings",
    "Subscriber",
    "SubscriptionClosed",
    "SubscriptionManager",
    "TlsError",
    "TlsSettings",
    "TypedEvent",
    "WatchCache",
    "load_settings",
    "pack",
    "unpack",
]
