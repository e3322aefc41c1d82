"""longlived: typed long-lived gRPC server-streaming subscriptions.

The public API is re-exported here; everything else is internal.
"""

from __future__ import annotations

from longlived._proto.longlived import LonglivedBase, LonglivedStub, Request, Response
from longlived.backoff import Backoff
from longlived.client import RETRYABLE_STATUSES, ResilientClient
from longlived.errors import ConfigError, LonglivedError, RetriesExhausted, SubscriptionClosed
from longlived.hub import EndReason, Hub, Subscriber
from longlived.server import PACKAGES, SubscriptionManager
from longlived.settings import BackoffSettings, QueueSettings, Settings, load_settings

__all__ = [
    "PACKAGES",
    "RETRYABLE_STATUSES",
    "Backoff",
    "BackoffSettings",
    "ConfigError",
    "EndReason",
    "Hub",
    "LonglivedBase",
    "LonglivedError",
    "LonglivedStub",
    "QueueSettings",
    "Request",
    "ResilientClient",
    "Response",
    "RetriesExhausted",
    "Settings",
    "Subscriber",
    "SubscriptionClosed",
    "SubscriptionManager",
    "load_settings",
]
