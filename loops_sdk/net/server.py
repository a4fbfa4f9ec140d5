"""The one gRPC server set-up shared by the decision service and the learner: executor,
message limits, SO_REUSEPORT, the authentication interceptors, health checking, reflection,
and a bind that says what went wrong."""

from __future__ import annotations

from concurrent import futures
from typing import Mapping

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import ServerSecurity

__all__ = ["new_server", "add_health_and_reflection", "bind"]


def new_server(security: ServerSecurity, method_roles: Mapping[str, str], *, max_workers: int,
               thread_name_prefix: str, max_receive_bytes: int, max_send_bytes: int,
               reuse_port: bool = False) -> grpc.Server:
    """A ``grpc.Server`` with a thread pool, message limits and ``security``'s interceptors.

    ``reuse_port``: gRPC turns SO_REUSEPORT on by default on Linux, which lets a second
    server bind the same port and silently split the traffic; only a process pool wants it.
    """
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers,
                                   thread_name_prefix=thread_name_prefix),
        options=[("grpc.max_receive_message_length", int(max_receive_bytes)),
                 ("grpc.max_send_message_length", int(max_send_bytes)),
                 ("grpc.so_reuseport", int(bool(reuse_port)))],
        interceptors=security.interceptors(method_roles))


def add_health_and_reflection(server: grpc.Server, service_name: str) -> health.HealthServicer:
    """Register health checking and server reflection (both stay open to every caller, see
    :data:`loops_sdk.net.auth.OPEN_SERVICES`); returns the health servicer to set."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    return servicer


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
