"""The standard services beside ``Longlived``: gRPC health and server reflection (grpclib's)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import betterproto2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor
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
    """Stands for a service name in grpclib's health checks and reflection's list (the
    original proto's)."""

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


def _add(pool: DescriptorPool, file: FileDescriptor) -> None:
    """``file`` and what it imports into ``pool`` (files it has already are kept)."""
    for dependency in file.dependencies:
        _add(pool, dependency)
    try:
        pool.FindFileByName(file.name)
    except KeyError:
        pool.AddSerializedFile(file.serialized_pb)


def _pool(types: Iterable[type[betterproto2.Message]]) -> DescriptorPool:
    """The generated descriptors plus health's and reflection's own, and the files of the
    app's ``types``, for reflection clients."""
    pool = default_google_proto_descriptor_pool
    for module in (health_pb2, reflection_pb2):
        _add(pool, module.DESCRIPTOR)
    for message_type in types:
        descriptor = getattr(message_type, "DESCRIPTOR", None)
        if not isinstance(descriptor, Descriptor):
            raise TypeError(
                f"{message_type.__name__} has no protobuf descriptor: generate it with "
                "python -m longlived.codegen (google_protobuf_descriptors)"
            )
        _add(pool, descriptor.file)
    return pool


def _describe_alias(pool: DescriptorPool, service: Servable, alias: str) -> None:
    """Add to ``pool`` the service ``alias`` (``protos.Longlived``) with the methods
    ``service`` answers under that name, on the messages of ``service``'s own file."""
    package, _, name = alias.rpartition(".")
    file_name = f"{alias}.proto"
    try:
        pool.FindFileByName(file_name)
        return
    except KeyError:
        pass
    paths = [path for path in service.__mapping__() if path.startswith(f"/{alias}/")]
    own = pool.FindServiceByName(next(iter(service.__mapping__())).split("/")[1])
    file = descriptor_pb2.FileDescriptorProto(
        name=file_name, package=package, dependency=[own.file.name], syntax="proto3"
    )
    described = file.service.add(name=name)
    for path in paths:
        method = own.methods_by_name[path.rpartition("/")[2]]
        described.method.add(
            name=method.name,
            input_type=f".{method.input_type.full_name}",
            output_type=f".{method.output_type.full_name}",
            server_streaming=method.server_streaming,
        )
    pool.AddSerializedFile(file.SerializeToString())


def with_reflection(
    services: list[Servable],
    types: Iterable[type[betterproto2.Message]] = (),
    *,
    aliases: tuple[str, ...] = (),
) -> list[Servable]:
    """``services`` plus server reflection (v1 and v1alpha) describing all of them, the
    ``aliases`` of the first (other names it answers under) and the app's payload ``types``
    (so tools can decode payloads by their type URL)."""
    pool = _pool(types)
    for alias in aliases:
        _describe_alias(pool, services[0], alias)
    # grpclib lists each servable's first path's service: a _Named lists an alias
    listed: list[Any] = [*services, *(_Named(alias) for alias in aliases)]
    reflection = ServerReflection.extend(listed, pool=pool)[len(listed) :]
    return [*services, *reflection]
