from __future__ import annotations

import longlived


def test_exported_names() -> None:
    assert longlived.__all__ == [
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
    for name in longlived.__all__:
        assert getattr(longlived, name) is not None


def test_wire_messages_are_the_originals() -> None:
    """Field 1 of each message, byte for byte as the original proto encodes it."""
    assert bytes(longlived.Request(id=7)) == b"\x08\x07"
    assert bytes(longlived.Response(data="hi")) == b"\x0a\x02hi"
    assert longlived.Request.FromString(b"\x08\x07").id == 7
