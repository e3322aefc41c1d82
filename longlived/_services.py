"""The standard services beside ``Longlived``: gRPC health and server reflection (grpclib's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf.descriptor_pool import DescriptorPool
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2

from longlived._proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool

if TYPE_CHECKING:
    from grpclib._typing import IServable

__all__ = ["health_service", "with_reflection"]


def health_service(service: IServable, status: ServiceStatus) -> Health:
    """grpc.health.v1 reporting ``status`` for ``service`` and for the server as a whole."""
    return Health({service: [status], OVERALL: [status]})


def _pool() -> DescriptorPool:
    """The generated descriptors plus health's and reflection's own, for reflection clients."""
    pool = default_google_proto_descriptor_pool
    for module in (health_pb2, reflection_pb2):
        try:
            pool.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def with_reflection(services: list[IServable]) -> list[IServable]:
    """``services`` plus server reflection (v1 and v1alpha) describing all of them."""
    return ServerReflection.extend(services, pool=_pool())
