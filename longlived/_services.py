"""The standard services beside ``Longlived``: gRPC health and server reflection (grpclib's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor_pool import DescriptorPool
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2

from longlived._proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool

if TYPE_CHECKING:
    from longlived._transport import Servable

__all__ = ["health_service", "with_reflection"]


class _Named:
    """Stands for a service name in grpclib's health checks (the original proto's)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __mapping__(self) -> dict[str, None]:
        return {f"/{self.name}/_": None}


def health_service(
    service: Servable, status: ServiceStatus, *, aliases: tuple[str, ...] = ()
) -> Health:
    """grpc.health.v1 reporting ``status`` for ``service``, its ``aliases`` (other names it
    answers under) and the server as a whole."""
    checks: dict[Any, list[ServiceStatus]] = {service: [status], OVERALL: [status]}
    for alias in aliases:
        checks[_Named(alias)] = [status]
    return Health(checks)


def _pool() -> DescriptorPool:
    """The generated descriptors plus health's and reflection's own, for reflection clients."""
    pool = default_google_proto_descriptor_pool
    for module in (health_pb2, reflection_pb2):
        try:
            pool.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def with_reflection(services: list[Servable]) -> list[Servable]:
    """``services`` plus server reflection (v1 and v1alpha) describing all of them."""
    return ServerReflection.extend(services, pool=_pool())
