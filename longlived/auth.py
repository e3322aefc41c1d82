"""Who is calling: bearer-token authentication and the default authorization rules.

With ``auth.tokens`` set, every call must carry ``authorization: Bearer <token>``; the token
names the caller. ``SubscriptionManager`` asks ``authenticate`` for the caller and its
``authorize_subscribe`` / ``authorize_unsubscribe`` hooks whether the call may proceed; a
subclass overrides them (for example to check JWTs or map callers to the ids they own).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ANONYMOUS", "Caller", "bearer_token", "match_token"]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated (or anonymous) caller."""

    name: str
    """Who is calling: the name its token maps to, or ``anonymous``."""
    authenticated: bool = True
    """False when authentication is off."""


ANONYMOUS = Caller("anonymous", authenticated=False)
"""The caller when authentication is off."""


def bearer_token(metadata: Mapping[str, str | bytes] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if there is one."""
    if not metadata:
        return None
    value = metadata.get("authorization")
    if not isinstance(value, str):
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def match_token(token: str, tokens: Mapping[str, str]) -> Caller | None:
    """The caller ``token`` names in ``tokens`` (compared in constant time), or None."""
    found = None
    for known, name in tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            found = Caller(name)
    return found
