"""The decision service on ``grpc.aio``, for bench/service.py to compare with the single-thread
unary loop and gRPC's thread pool (issue 13): the same servicer, request reader and
serializer as ``loops serve`` (``loops_sdk.serve.service``), the same message limits, a
DecisionClient that logs every decision and ships it to the learner. The handlers run inline
on the event loop (they take microseconds and hold the GIL: a thread hand-off would only add
cost). Plaintext on loopback, no tokens: a measuring stand-in, not a second server.

``python bench/service_aio.py --learner HOST:PORT --policy-name bonus [--port 0]
[--spool-dir DIR]`` prints ``aio decision service listening on HOST:PORT`` once it serves,
and stops on SIGTERM/SIGINT. Run as a file (not ``-m bench...``) so it imports the same
``loops_sdk`` as its parent, installed or not.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from loops_sdk.client import ClientConfig, DecisionClient
from loops_sdk.serve.service import SERVICE_NAME, DecisionServicer, _service_methods

_MiB = 1 << 20


class _Abort(Exception):
    """``abort`` inside a synchronous handler: the wrapper awaits the real one."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, tuple(trailing)


class _SyncContext:
    """What the servicer uses of a ``grpc.ServicerContext``, over an aio context (whose
    ``abort`` is a coroutine and cannot end a synchronous handler by itself)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: grpc.aio.ServicerContext) -> None:
        self._ctx = ctx

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Abort(code, details)

    def abort_with_status(self, status: Any) -> NoReturn:   # errors with google.rpc details
        raise _Abort(status.code, status.details, status.trailing_metadata)

    def time_remaining(self) -> float | None:
        return self._ctx.time_remaining()

    def is_active(self) -> bool:
        return not self._ctx.cancelled()

    def invocation_metadata(self) -> Any:
        return self._ctx.invocation_metadata()

    def peer(self) -> str:
        return self._ctx.peer()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._ctx.set_code(code)

    def set_details(self, details: str) -> None:
        self._ctx.set_details(details)


def _aio_handler(behavior: Any) -> Any:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return behavior(request, _SyncContext(context))
        except _Abort as exc:
            await context.abort(exc.code, exc.details, exc.trailing)

    return handle


async def serve(args: argparse.Namespace) -> None:
    client = DecisionClient(ClientConfig(learner=args.learner,
                                         policy_names=tuple(args.policy_name),
                                         spool_dir=args.spool_dir))
    limit = int(args.max_message_mb * _MiB)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit),
                                      ("grpc.so_reuseport", 0)])
    methods = _service_methods(DecisionServicer(client, max_batch_rows=args.max_batch_rows))
    handlers = {name.rsplit("/", 1)[1]: grpc.unary_unary_rpc_method_handler(
        _aio_handler(m.behavior), request_deserializer=m.request_deserializer,
        response_serializer=m.response_serializer) for name, m in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"aio decision service listening on {args.host}:{port}", flush=True)
    deadline = time.monotonic() + 60
    while not client.wait_for_initialization(0) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)     # SERVING once the policy has arrived, as loops serve
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await stop.wait()
    await server.stop(2.0)
    client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--learner", required=True)
    ap.add_argument("--policy-name", action="append", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--spool-dir")
    ap.add_argument("--max-batch-rows", type=int, default=10_000)
    ap.add_argument("--max-message-mb", type=float, default=4.0)
    ap.add_argument("--log-level", default="WARNING")   # accepted like `loops serve`'s
    asyncio.run(serve(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
