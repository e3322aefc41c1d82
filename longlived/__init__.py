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
from longlived.backoff import Backoff
from longlived.client import RETRYABLE_STATUSES, ResilientClient
from longlived.errors import (
    ConfigError,
    LonglivedError,
    ResumeExpired,
    RetriesExhausted,
    SubscriptionClosed,
)
from longlived.hub import EndReason, Event, Hub, Kind, Position, Subscriber
from longlived.server import PACKAGES, SubscriptionManager
from longlived.settings import (
    BackoffSettings,
    HeartbeatSettings,
    QueueSettings,
    ReplaySettings,
    Settings,
    load_settings,
)

__all__ = [
    "PACKAGES",
    "RETRYABLE_STATUSES",
    "Backoff",
    "BackoffSettings",
    "ConfigError",
    "EndReason",
    "Event",
    "HeartbeatSettings",
    "Hub",
    "Kind",
    "LonglivedBase",
    "LonglivedError",
    "LonglivedStub",
    "Position",
    "QueueSettings",
    "ReplaySettings",
    "Request",
    "ResilientClient",
    "Response",
    "ResponseKind",
    "ResumeExpired",
    "RetriesExhausted",
    "Settings",
    "Subscriber",
    "SubscriptionClosed",
    "SubscriptionManager",
    "load_settings",
]
