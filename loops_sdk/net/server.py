"""The one gRPC server set-up shared by the decision service and the learner: executor,
message limits, SO_REUSEPORT, the authentication interceptors, health checking, reflection,
and a bind that says what went wrong."""

from __future__ import annotations

from concurrent import futures
from typing import Mapping, NoReturn, Sequence

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from .auth import ServerSecurity

__all__ = ["new_server", "add_health_and_reflection", "bind", "abort_invalid", "REFLECTION_V1"]

# grpcio-reflection serves only v1alpha; v1 (what current grpcurl and other tools ask first)
# has the same messages under another package, so the v1alpha servicer answers both.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def new_server(security: ServerSecurity, method_roles: Mapping[str, str], *, max_workers: int,
               thread_name_prefix: str, max_receive_bytes: int, max_send_bytes: int,
               reuse_port: bool = False,
               interceptors: Sequence[grpc.ServerInterceptor] = ()) -> grpc.Server:
    """A ``grpc.Server`` with a thread pool, message limits and ``security``'s interceptors.

    ``interceptors`` run before the security ones (metrics: a refused call is counted too).

    ``reuse_port``: gRPC turns SO_REUSEPORT on by default on Linux, which lets a second
    server bind the same port and silently split the traffic; only a process pool wants it.
    """
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers,
                                   thread_name_prefix=thread_name_prefix),
        options=[("grpc.max_receive_message_length", int(max_receive_bytes)),
                 ("grpc.max_send_message_length", int(max_send_bytes)),
                 ("grpc.so_reuseport", int(bool(reuse_port)))],
        interceptors=[*interceptors, *security.interceptors(method_roles)])


def add_health_and_reflection(server: grpc.Server, service_name: str) -> health.HealthServicer:
    """Register health checking and server reflection, v1 and v1alpha (both stay open to
    every caller, see :data:`loops_sdk.net.auth.OPEN_SERVICES`); returns the health servicer
    to set."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = (service_name, health.SERVICE_NAME, REFLECTION_V1, reflection.SERVICE_NAME)
    _add_reflection_v1_descriptor()
    reflector = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, server)
    # v1: the same servicer behind the v1 method name (identical messages on the wire).
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            reflector.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))
    return servicer


def _add_reflection_v1_descriptor() -> None:
    """Put ``grpc/reflection/v1/reflection.proto`` in the default descriptor pool (built from
    the v1alpha file, which differs only in its package), so reflection can describe the v1
    service it lists."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fdp)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    fdp.name, fdp.package = name, "grpc.reflection.v1"
    for message in fdp.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in fdp.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    pool.Add(fdp)


def bind(server: grpc.Server, security: ServerSecurity, host: str, port: int, *,
         busy_hint: str = "") -> int:
    """Bind ``host:port`` (0 = any free port) with ``security``'s posture; returns the port.

    Raises:
        SecurityError: the posture refuses the address (see :class:`ServerSecurity`).
        OSError: the address cannot be bound, with ``busy_hint`` appended to the reason.
    """
    try:
        return security.add_port(server, host, port)
    except OSError as exc:
        if not busy_hint:
            raise
        raise OSError(f"{exc} ({busy_hint})") from None


def abort_invalid(context: grpc.ServicerContext, field: str, description: str) -> NoReturn:
    """End the call ``INVALID_ARGUMENT``: the message is ``"<field>: <description>"`` and the
    status details carry a ``google.rpc.BadRequest`` with that field violation, so a client in
    any language can tell which field was wrong without parsing the text."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    context.abort_with_status(rpc_status.to_status(status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"{field}: {description}",
        details=[detail])))
    raise AssertionError("unreachable")  # abort_with_status raises
