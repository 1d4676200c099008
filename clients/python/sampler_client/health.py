"""grpc.health.v1's Check without the grpcio-health-checking package (the SDK needs only
grpcio, protobuf and numpy): its two messages, built in a private descriptor pool so they
never clash with the package's own where both are loaded.

`HealthCheckRequest(service=...)` -> `HealthCheckResponse.status` (`SERVING` = 1; 0 unknown,
2 not serving, 3 service unknown).
"""
from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

#: The full name of the service and the path of its Check method.
HEALTH_SERVICE = "grpc.health.v1.Health"
CHECK_PATH = f"/{HEALTH_SERVICE}/Check"
#: HealthCheckResponse.ServingStatus.SERVING
SERVING = 1


def _messages() -> tuple[type, type]:
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="sampler_client/grpc_health_v1.proto",
                                              package="grpc.health.v1", syntax="proto3")
    file.message_type.add(name="HealthCheckRequest").field.add(
        name="service", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    # ServingStatus travels as a varint: an int32 reads it alike, without the enum.
    file.message_type.add(name="HealthCheckResponse").field.add(
        name="status", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.health.v1.{n}"))
                 for n in ("HealthCheckRequest", "HealthCheckResponse"))


HealthCheckRequest, HealthCheckResponse = _messages()


def check_method(channel: Any) -> Any:
    """Health.Check on a grpc or grpc.aio channel (called like a stub's method)."""
    return channel.unary_unary(CHECK_PATH,
                               request_serializer=HealthCheckRequest.SerializeToString,
                               response_deserializer=HealthCheckResponse.FromString)
