"""TLS and mutual TLS contexts built from ``TlsSettings``.

The server uses TLS when a certificate and key are configured; with a CA as well it requires
clients to present a certificate signed by it (mutual TLS). The client uses TLS when a CA is
configured or ``tls.enabled`` is set, and presents its own certificate when one is set.
Both sides negotiate HTTP/2 through ALPN, as gRPC requires.
"""

from __future__ import annotations

import ssl

from longlived.settings import TlsSettings

__all__ = ["client_context", "server_context"]


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The server's TLS context, or None when no certificate is configured."""
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The client's TLS context, or None for plaintext."""
    if tls.ca is None and not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2"])
    return context
