"""Serve chosen unary methods of a ``grpc.Server`` from one thread (the decision service's
fast path).

gRPC's Python server hands every call between threads: its polling thread receives the call,
a pool thread waits for the request message, which the polling thread delivers, and the
response goes back the same way. Each hand-off is a futex wake and a GIL transfer; measured
on a two-core VM, a no-op call costs about 160 µs of CPU this way, against 15-30 µs for the
whole Decide handler. :class:`UnaryLoop` serves the methods it is given from a single thread
polling its own completion queue on the same server (same port, TLS, message-size limits and
shutdown): it receives the call, reads the message, runs the handler and sends the answer
without ever waking another Python thread. A no-op call then costs about 80 µs and a Decide
about 130 µs against 210 µs (the rest is gRPC's own reading and writing). Everything else on
the server (health, reflection, streams) keeps gRPC's thread pool.

The loop uses gRPC's Cython layer (``grpc._cython.cygrpc``), which is not a public API.
:func:`supported` checks for every piece it needs, so a gRPC release that changes them makes
servers fall back to the thread pool (with a warning) rather than fail.

Handlers get a :class:`grpc.ServicerContext`; what they observe differs from the pool in two
ways: ``is_active()`` turns False when the deadline passes, not when the client cancels (the
handler runs as soon as the message is read, so there is no window worth watching), and
per-call compression settings raise NotImplementedError.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn, Sequence

import grpc

try:
    from grpc._cython import cygrpc
except ImportError:  # pragma: no cover - every grpcio wheel has it
    cygrpc = None

__all__ = ["UnaryLoop", "UnaryMethod", "service_methods", "supported"]

logger = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, Any]]
# (full method name, invocation metadata) -> None to go on, or (status, details) to refuse.
Authorize = Callable[[str, Metadata], "tuple[grpc.StatusCode, str] | None"]

_NO_FLAGS = 0
_NO_DEADLINE = 1e15           # seconds since the epoch beyond which a deadline means "none"
_REQUESTS_PER_METHOD = 4     # outstanding requests: a burst never waits for a re-request
_CY_NEEDS = ("CompletionQueue", "SendInitialMetadataOperation", "SendMessageOperation",
             "SendStatusFromServerOperation", "ReceiveMessageOperation",
             "ReceiveCloseOnServerOperation", "CompletionType", "StatusCode",
             "peer_identities", "peer_identity_key", "auth_context")
_SERVER_NEEDS = ("register_method", "register_completion_queue", "request_registered_call")


@dataclass(frozen=True)
class UnaryMethod:
    """One unary method: ``behavior(request, context) -> response``."""

    behavior: Callable[[Any, grpc.ServicerContext], Any]
    request_deserializer: Callable[[bytes], Any]
    response_serializer: Callable[[Any], bytes]


def service_methods(servicer: Any, service: Any) -> dict[str, UnaryMethod]:
    """The unary methods of ``service`` (a protobuf ServiceDescriptor), served by the
    same-named methods of ``servicer``."""
    from google.protobuf import message_factory

    out = {}
    for m in service.methods:
        if m.client_streaming or m.server_streaming:
            raise ValueError(f"{service.full_name}.{m.name} streams: the loop serves unary "
                             "methods only")
        request_class = message_factory.GetMessageClass(m.input_type)
        out[f"/{service.full_name}/{m.name}"] = UnaryMethod(
            getattr(servicer, m.name), request_class.FromString,
            lambda response: response.SerializeToString())
    return out


def _core_server(server: grpc.Server) -> Any:
    return getattr(server, "_cy_server", None)


def supported(server: grpc.Server) -> bool:
    """True if this gRPC build offers everything the loop uses, on ``server``."""
    if cygrpc is None or not all(hasattr(cygrpc, name) for name in _CY_NEEDS):
        return False
    core = _core_server(server)
    return core is not None and all(hasattr(core, name) for name in _SERVER_NEEDS)


def _status_code(code: grpc.StatusCode) -> Any:
    return cygrpc.StatusCode(code.value[0])


class _Aborted(Exception):
    """Raised by ``context.abort``: ends the handler with a status."""


class _Context(grpc.ServicerContext):
    """The servicer context of one call served by the loop."""

    def __init__(self, call: Any, metadata: Metadata, deadline: float | None) -> None:
        self._call = call
        self._metadata = metadata
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: Metadata = ()
        self._initial: Metadata | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._cancelled = False

    # -- the call
    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        peer = self._call.peer()
        return peer.decode("utf-8", "replace") if isinstance(peer, bytes) else peer

    def peer_identities(self) -> Sequence[bytes] | None:
        return cygrpc.peer_identities(self._call)

    def peer_identity_key(self) -> str | None:
        key = cygrpc.peer_identity_key(self._call)
        return key.decode("utf-8") if isinstance(key, bytes) else key

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        ctx = cygrpc.auth_context(self._call) or {}
        return {k.decode("utf-8") if isinstance(k, bytes) else k: v for k, v in ctx.items()}

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.time(), 0.0)

    def is_active(self) -> bool:
        return not self._cancelled and (self._deadline is None or time.time() < self._deadline)

    def cancel(self) -> None:
        self._cancelled = True
        self.abort(grpc.StatusCode.CANCELLED, "cancelled by the server")

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._callbacks.append(callback)
        return True

    # -- what is sent back
    def send_initial_metadata(self, initial_metadata: Metadata) -> None:
        if self._initial is not None:
            raise ValueError("initial metadata was already set")
        self._initial = tuple(initial_metadata)

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str | None:
        return self._details

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details
        raise _Aborted(details)

    def abort_with_status(self, status: Any) -> NoReturn:
        self.set_trailing_metadata(status.trailing_metadata)
        self.abort(status.code, status.details)

    def set_compression(self, compression: Any) -> None:
        raise NotImplementedError("per-call compression is not available on the decision "
                                  "service's fast path")

    def disable_next_message_compression(self) -> None:
        raise NotImplementedError("per-call compression is not available on the decision "
                                  "service's fast path")


class _Requested:
    """Tag of an outstanding request for a new call of ``method``."""

    __slots__ = ("method",)

    def __init__(self, method: str) -> None:
        self.method = method


class _Reading:
    """Tag of a call whose request message is being read."""

    __slots__ = ("method", "call", "metadata", "deadline")

    def __init__(self, method: str, call: Any, metadata: Metadata,
                 deadline: float | None) -> None:
        self.method, self.call, self.metadata, self.deadline = method, call, metadata, deadline


class _Finishing:
    """Tag of a call whose answer is being sent."""

    __slots__ = ("call", "callbacks")

    def __init__(self, call: Any, callbacks: list[Callable[[], None]]) -> None:
        self.call, self.callbacks = call, callbacks


class UnaryLoop:
    """Serves ``methods`` (full name ``/pkg.Service/Method`` -> :class:`UnaryMethod`) of
    ``server`` from one thread.

    Call :meth:`attach` before ``server.start()`` (it registers the methods and the loop's
    completion queue with the server), :meth:`start` after it, and :meth:`stop` after
    ``server.stop(...)`` has completed (the server's shutdown finishes or cancels the loop's
    calls; the loop then ends).

    Args:
        authorize: checked on every call before its message is read; returns None to go on
            or ``(status, details)`` to refuse.
    """

    def __init__(self, server: grpc.Server, methods: Mapping[str, UnaryMethod], *,
                 authorize: Authorize | None = None) -> None:
        if not supported(server):
            raise RuntimeError("this gRPC build does not offer what UnaryLoop needs")
        self._core = _core_server(server)
        self._methods = dict(methods)
        self._authorize = authorize
        self._cq: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cq_shut = False
        self.calls = 0          # answered calls (any status)

    def attach(self) -> None:
        """Register the loop's methods and completion queue; before the server starts."""
        self._cq = cygrpc.CompletionQueue()
        self._core.register_completion_queue(self._cq)
        for method in self._methods:
            self._core.register_method(method)

    def start(self) -> None:
        """Start serving; after the server has started."""
        if self._cq is None:
            raise RuntimeError("attach() the loop before the server starts")
        for method in self._methods:
            for _ in range(_REQUESTS_PER_METHOD):
                self._request(method)
        self._thread = threading.Thread(target=self._serve, name="loops-unary-loop",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop once the server has stopped (its calls are finished or cancelled).
        Idempotent."""
        self._stopping = True
        if self._cq is not None and self._thread is not None:
            if not self._cq_shut:
                self._cq_shut = True
                self._cq.shutdown()
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop
    def _request(self, method: str) -> None:
        self._core.request_registered_call(self._cq, self._cq, method, _Requested(method))

    def _serve(self) -> None:
        shutdown = cygrpc.CompletionType.queue_shutdown
        complete = cygrpc.CompletionType.operation_complete
        while True:
            event = self._cq.poll()
            kind = event.completion_type
            if kind == shutdown:
                return
            if kind != complete:
                continue
            tag = event.tag
            try:
                if type(tag) is _Reading:
                    self._on_message(tag, event)
                elif type(tag) is _Requested:
                    self._on_call(tag, event)
                elif type(tag) is _Finishing:
                    self._run_callbacks(tag.callbacks)
            except Exception:  # never let one call end the loop, nor leave its caller waiting
                logger.exception("unary loop: unexpected error")
                call = getattr(tag, "call", None) or getattr(event, "call", None)
                if call is not None and type(tag) is not _Finishing:
                    try:
                        self._finish(call, None, grpc.StatusCode.INTERNAL,
                                     "internal error in the server", (), None, [])
                    except Exception:
                        pass
            event = tag = None   # drop the call before blocking again

    def _on_call(self, tag: _Requested, event: Any) -> None:
        if not event.success:      # the server is shutting down: this request is withdrawn
            return
        if not self._stopping:
            try:
                self._request(tag.method)
            except ValueError:   # the server began shutting down: no new calls, answer this
                self._stopping = True
        call, metadata = event.call, tuple(event.invocation_metadata)
        if self._authorize is not None:
            refused = self._authorize(tag.method, metadata)
            if refused is not None:
                logger.warning("rejected %s from %s: %s", tag.method, call.peer(),
                               refused[0].name)
                self._finish(call, None, refused[0], refused[1], (), None, [])
                return
        deadline = event.call_details.deadline   # no deadline: gRPC's infinite future
        deadline = None if deadline is None or deadline > _NO_DEADLINE else float(deadline)
        call.start_server_batch((cygrpc.ReceiveMessageOperation(_NO_FLAGS),),
                                _Reading(tag.method, call, metadata, deadline))

    def _on_message(self, tag: _Reading, event: Any) -> None:
        call = tag.call
        if not event.success:      # the call ended (cancelled, deadline) before its message
            self._finish(call, None, grpc.StatusCode.CANCELLED,
                         "the call ended before its request arrived", (), None, [])
            return
        message = event.batch_operations[0].message()
        if message is None:        # the client half-closed without sending a message
            self._finish(call, None, grpc.StatusCode.UNIMPLEMENTED,
                         f"{tag.method} requires exactly one request message", (), None, [])
            return
        method = self._methods[tag.method]
        context = _Context(call, tag.metadata, tag.deadline)
        try:
            request = method.request_deserializer(message)
        except Exception:
            logger.exception("cannot deserialize a %s request", tag.method)
            self._finish(call, None, grpc.StatusCode.INTERNAL,
                         "Exception deserializing request!", (), None, [])
            return
        payload = None
        try:
            response = method.behavior(request, context)
            payload = method.response_serializer(response)
        except _Aborted:
            payload = None
        except Exception as exc:
            if context.code() is None or context.code() == grpc.StatusCode.OK:
                logger.exception("%s failed", tag.method)
                context.set_code(grpc.StatusCode.UNKNOWN)
                context.set_details(f"Exception calling application: {exc}")
            payload = None
        code = context.code() or grpc.StatusCode.OK
        if payload is None and code == grpc.StatusCode.OK:   # a handler that returned None
            code = grpc.StatusCode.INTERNAL
            context.set_details("Exception serializing response!")
        self._finish(call, payload, code, context.details() or "",
                     context.trailing_metadata(), context._initial, context._callbacks)

    def _finish(self, call: Any, payload: bytes | None, code: grpc.StatusCode, details: str,
                trailing: Metadata, initial: Metadata | None,
                callbacks: list[Callable[[], None]]) -> None:
        self.calls += 1
        ops = [cygrpc.SendInitialMetadataOperation(initial, _NO_FLAGS)]
        if payload is not None:
            ops.append(cygrpc.SendMessageOperation(payload, _NO_FLAGS))
        ops.append(cygrpc.SendStatusFromServerOperation(
            tuple(trailing), _status_code(code), details.encode("utf-8"), _NO_FLAGS))
        ops.append(cygrpc.ReceiveCloseOnServerOperation(_NO_FLAGS))
        error = call.start_server_batch(ops, _Finishing(call, callbacks))
        if error:   # gRPC refused the batch (the call is gone): nothing will be delivered
            logger.debug("could not answer a call: gRPC call error %s", error)
            self._run_callbacks(callbacks)

    @staticmethod
    def _run_callbacks(callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("a call's termination callback failed")
