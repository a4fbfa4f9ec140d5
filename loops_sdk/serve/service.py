"""The decision service: a :class:`~loops_sdk.DecisionClient` behind gRPC, for backends in any
language (``loops serve``).

Every RPC is one call into the same DecisionClient an embedded game server would use: the same
compiled scorer and exploration draw (so the same decision for the same event id), the same
decision log, the same shipping to the learner and the same policy sync. The service only
translates messages and errors:

- an unknown decision point, or one whose policy has not arrived, answers with the caller's
  ``default_action`` and a ``reason`` (never an error), exactly like ``decide``;
- bad input (missing field, features that do not fit the spec, an unknown eligible action, an
  oversized batch) is ``INVALID_ARGUMENT`` with the offending field named;
- a call whose deadline has already passed when a worker picks it up is answered
  ``DEADLINE_EXCEEDED`` without deciding, so no decision is logged that nobody received;
- messages above ``max_message_bytes`` are refused by gRPC (``RESOURCE_EXHAUSTED``).

Health checking (``grpc.health.v1``) reports the server ``SERVING`` once started and
``loops.v1.DecisionService`` ``SERVING`` once every watched decision point has a policy;
server reflection lets ``grpcurl`` list and call the service. Security (TLS, tokens) comes from
:class:`~loops_sdk.net.auth.ServerSecurity`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from typing import Any, Callable, NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from .._proto import decision_pb2, decision_pb2_grpc
from ..client import ClientConfig, DecisionClient
from ..decision import REASONS, Reason, parse_event_id
from ..errors import FeatureError, UnknownActionError
from ..policy import Policy
from ..rules import batch_attributes, compile_constraints
from ..scorer import stable_hash
from . import unary_loop
from ..net.auth import DECISION_METHOD_ROLES, ServerSecurity, join_host_port
from ..net.server import abort_invalid, add_health_and_reflection, bind, new_server

__all__ = ["DecisionServer", "DecisionServicer", "SERVICE_NAME"]

logger = logging.getLogger(__name__)

SERVICE_NAME = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
_MiB = 1 << 20
MAX_KIND_LENGTH = 64


class _Invalid(Exception):
    """A request field that cannot be used; becomes INVALID_ARGUMENT naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.description = field, message


def _abort_invalid(context: grpc.ServicerContext, exc: _Invalid) -> NoReturn:
    abort_invalid(context, exc.field, exc.description)   # with a google.rpc.BadRequest


def _invalid_aborts(handler: Callable[[Any, Any, grpc.ServicerContext], Any]
                    ) -> Callable[[Any, Any, grpc.ServicerContext], Any]:
    """A servicer method whose :class:`_Invalid` becomes INVALID_ARGUMENT naming its field."""
    @functools.wraps(handler)
    def handle(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except _Invalid as exc:
            _abort_invalid(context, exc)

    return handle


# --------------------------------------------------------------------------- unparsable requests
# A request gRPC cannot parse (most often a proto3 string field holding bytes that are not
# UTF-8, which the protobuf runtime refuses) would be answered INTERNAL "Exception
# deserializing request!" by either serving path. The service reads requests with its own
# deserializer instead: on failure it finds the offending field in the raw bytes and hands
# the handler a stand-in that is answered INVALID_ARGUMENT naming that field.
class _Unreadable:
    """Stands in for a request that did not parse; answered INVALID_ARGUMENT."""

    __slots__ = ("error",)

    def __init__(self, error: _Invalid) -> None:
        self.error = error


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(data: bytes):
    """(field number, payload) of the length-delimited fields of a serialized message;
    other wire types are skipped. Raises ValueError on bytes that are not a message."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise ValueError("truncated field")
            yield number, data[i:i + size]
            i += size
        else:                          # groups: never in these messages
            raise ValueError(f"wire type {wire}")
    if i != len(data):
        raise ValueError("truncated field")


def _not_utf8(descriptor: Any, data: bytes, where: str = "") -> str | None:
    """The path (``user``, ``rows[2].categories['country']``, ...) of the first string in
    ``data`` (a serialized ``descriptor`` message) that is not valid UTF-8, or None."""
    string, msg = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE
    seen: dict[int, int] = {}
    for number, payload in _fields(data):
        field = descriptor.fields_by_number.get(number)
        if field is None or field.type not in (string, msg):
            continue
        index = seen[number] = seen.get(number, -1) + 1
        repeated = field.is_repeated
        path = f"{where}{field.name}[{index}]" if repeated else f"{where}{field.name}"
        if field.type == string:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_number[2]
            entry = dict(_fields(payload))     # map keys here are strings: 1 key, 2 value
            try:
                key = entry.get(1, b"").decode("utf-8")
            except UnicodeDecodeError:
                return f"{where}{field.name} (a key)"
            path = f"{where}{field.name}[{key!r}]"
            if value_field.type == string:
                try:
                    entry.get(2, b"").decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif value_field.type == msg:
                found = _not_utf8(value_field.message_type, entry.get(2, b""), path + ".")
                if found:
                    return found
        else:
            found = _not_utf8(field.message_type, payload, path + ".")
            if found:
                return found
    return None


def _reader(request_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: a message that does not parse becomes an
    :class:`_Unreadable` naming the field at fault."""
    parse, descriptor = request_class.FromString, request_class.DESCRIPTOR

    def read(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            try:
                field = _not_utf8(descriptor, data)
            except (ValueError, UnicodeDecodeError):
                field = None
            if field is not None:
                return _Unreadable(_Invalid(field, "is not valid UTF-8 (string fields must "
                                                   "be UTF-8 text)"))
            return _Unreadable(_Invalid("request", f"is not a valid {descriptor.full_name} "
                                                   f"message ({exc})"))

    return read


def _guarded(behavior: Callable[[Any, grpc.ServicerContext], Any]
             ) -> Callable[[Any, grpc.ServicerContext], Any]:
    @functools.wraps(behavior)
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if type(request) is _Unreadable:
            _abort_invalid(context, request.error)
        return behavior(request, context)

    return handle


def _service_methods(servicer: "DecisionServicer") -> dict[str, unary_loop.UnaryMethod]:
    """The DecisionService methods, by full name, as both serving paths run them: read with
    :func:`_reader`, so an unparsable request is INVALID_ARGUMENT on either."""
    service = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"]
    return {f"/{service.full_name}/{m.name}": unary_loop.UnaryMethod(
                _guarded(getattr(servicer, m.name)),
                _reader(getattr(decision_pb2, m.input_type.name)),
                _serialize)
            for m in service.methods}


def _serialize(response: Any) -> bytes:
    return response.SerializeToString()


def _check_deadline(context: grpc.ServicerContext) -> None:
    # A call can wait in the server's queue past its deadline; deciding then would log a
    # decision the caller never receives.
    remaining = context.time_remaining()
    if (remaining is not None and remaining <= 0) or not context.is_active():
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                      "deadline expired before the call was started; nothing was decided")


def _user(req: Any) -> str | None:
    """A request's (or row's) user key as decide() takes it: ``user`` has presence, so unset
    is no user and ``""`` is the empty key, held out or not exactly as in the SDK."""
    return req.user if req.HasField("user") else None


@functools.lru_cache(maxsize=64)
def _categorical(policy: Policy) -> frozenset[str]:
    return frozenset(f.name for f in policy.features if f.kind == "categorical")


def _category_number(value: float) -> int | float:
    # The wire has one number type: 3 from a backend arrives as 3.0, which the encoder would
    # hash as "3.0" where the SDK, given 3, hashes "3". A whole number is taken as the integer
    # it almost always was; any other keeps its float text ("2.5", "nan"), as in the SDK.
    return int(value) if value.is_integer() else value


def _features(req: Any, where: str, categorical: frozenset[str] = frozenset()) -> Any:
    """The features of a request (or row) as decide() takes them: a name -> number/str dict
    from ``features`` and ``categories``, or the ``vector`` as an array. Numbers given for
    the ``categorical`` features are hashed as the SDK hashes the same number."""
    if len(req.vector):
        if len(req.features) or len(req.categories):
            raise _Invalid(f"{where}vector", "give either vector or features/categories, "
                                             "not both")
        return np.array(req.vector, dtype=np.float64)
    out: dict[str, float | str] = dict(req.features)
    if out:
        for name in categorical:          # a policy has few categorical features
            value = out.get(name)
            if value is not None:
                out[name] = _category_number(value)
    if len(req.categories):
        for name in req.categories:
            if name in out:
                raise _Invalid(f"{where}categories[{name!r}]", "is also given in features")
        out.update(req.categories)
    return out


_ATTRIBUTE_KINDS = ("text", "number", "integer", "flag")


def _attributes(values: Any) -> dict[str, Any] | None:
    """A request's ``attributes`` map as decide() takes it (types kept: str, float, int,
    bool); a value with nothing set is left out (not supplied)."""
    if not len(values):
        return None
    out = {}
    for name, v in values.items():
        kind = v.WhichOneof("value")
        if kind is not None:
            out[name] = getattr(v, kind)
    return out


def _attribute_columns(columns: Any, n: int) -> dict[str, Any] | None:
    """A DecideBatch ``attributes`` map as decide_batch() takes it: name -> one value for
    every row, or a column of ``n``."""
    if not len(columns):
        return None
    out: dict[str, Any] = {}
    for name, col in columns.items():
        filled = [(k, getattr(col, k + "s")) for k in _ATTRIBUTE_KINDS]
        filled = [(k, vals) for k, vals in filled if len(vals)]
        where = f"attributes[{name!r}]"
        if len(filled) != 1:
            raise _Invalid(where, "set exactly one of texts, numbers, integers, flags")
        kind, vals = filled[0]
        if len(vals) == 1:
            out[name] = vals[0]
        elif len(vals) == n:
            dtype = {"text": None, "number": np.float64, "integer": np.int64,
                     "flag": np.bool_}[kind]
            out[name] = np.array(vals, dtype=dtype) if dtype else np.array(list(vals))
        else:
            raise _Invalid(where, f"{len(vals)} values for {n} rows (give one, or one per row)")
    return out


def _request_field(exc: FeatureError | UnknownActionError, baseline_field: str,
                   default: str) -> str:
    """The request field an SDK error is about, from the field the error carries."""
    field = exc.field
    if field == "baseline":
        return baseline_field
    return field if field in ("attributes", "eligible") else default


def _input_error(exc: FeatureError, where: str, features_field: str,
                 baseline_field: str = "baseline") -> _Invalid:
    return _Invalid(f"{where}{_request_field(exc, baseline_field, features_field)}", str(exc))


def _action_error(exc: UnknownActionError, where: str, baseline_field: str) -> _Invalid:
    return _Invalid(f"{where}{_request_field(exc, baseline_field, 'eligible')}", str(exc))


@functools.lru_cache(maxsize=64)
def _constraints(policy: Policy) -> Any:
    return compile_constraints(policy, stable_hash)


def _kind(kind: str, default: str) -> str:
    if len(kind) > MAX_KIND_LENGTH:
        raise _Invalid("kind", f"at most {MAX_KIND_LENGTH} characters")
    return kind or default


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise _Invalid("value", f"must be finite, got {value}")
    return value


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    """The RPC handlers; every decision is made by ``client``.

    Args:
        client: the DecisionClient that decides, logs and ships.
        max_batch_rows: DecideBatch requests with more rows are INVALID_ARGUMENT.
    """

    def __init__(self, client: DecisionClient, *, max_batch_rows: int = 10_000) -> None:
        self._client = client
        self._max_rows = int(max_batch_rows)

    # ------------------------------------------------------------------ decide
    def Decide(self, request: decision_pb2.DecideRequest,
               context: grpc.ServicerContext) -> decision_pb2.DecideResponse:
        _check_deadline(context)
        try:
            if not request.decision_point:
                raise _Invalid("decision_point", "is required")
            d = self._decide_one(request.decision_point, request, request.default_action or None,
                                 request.deferred, "")
        except _Invalid as exc:
            _abort_invalid(context, exc)
        return decision_pb2.DecideResponse(
            action=d.action or "", probability=d.probability, event_id=d.event_id or "",
            policy_name=d.policy_name, policy_version=d.policy_version, holdout=d.holdout,
            reason=d.reason, policy_action=d.policy_action or "",
            policy_probability=d.policy_probability if d.apprentice else 0.0, rules=d.rules)

    def _decide_one(self, name: str, req: Any, default: str | None, deferred: bool,
                    where: str, x: Any = None) -> Any:
        if x is None:
            x = self._input(name, req, where)
        try:
            return self._client.decide(name, x, _user(req), list(req.eligible) or None,
                                       default=default, deferred=deferred,
                                       attributes=_attributes(req.attributes),
                                       baseline=req.baseline or None)
        except UnknownActionError as exc:
            raise _action_error(exc, where, "baseline") from None
        except FeatureError as exc:
            raise _input_error(exc, where, "vector" if len(req.vector) else "features") from None

    def _input(self, name: str, req: Any, where: str) -> Any:
        """A request's (or row's) features as decide() takes them, read against the current
        policy of ``name`` (which features are categorical)."""
        policy = self._client.policy(name)
        if policy is None:
            return _features(req, where)
        x = _features(req, where, _categorical(policy))
        if len(req.categories):
            self._check_categories(policy, req.categories, where)
        return x

    def _row_input(self, name: str, row: Any, where: str) -> Any:
        """A row's model-input vector, checked the way decide() checks it, so a bad row is
        refused before anything is decided. Dict rows are encoded here by the scorer's own
        encoder, once: decide() then takes the vector."""
        x = self._input(name, row, where)
        policy = self._client.policy(name)
        if policy is None:
            return x                      # every row gets the default: nothing to check
        try:
            # The scorer's own check of one row, the one decide() runs (shape, type,
            # finiteness, scores in range), so that no row is decided when a later one is
            # refused and every row is accepted or refused exactly as decide() would.
            vec = policy.compiled().check_row(x)
        except FeatureError as exc:
            raise _Invalid(f"{where}{'vector' if len(row.vector) else 'features'}",
                           str(exc)) from None
        unknown = [a for a in row.eligible if a not in policy.action_ids]
        if unknown:
            raise _Invalid(f"{where}eligible", f"{unknown[0]!r} is not an action of policy "
                                               f"{name!r} (actions: {list(policy.action_ids)})")
        if row.baseline and row.baseline not in policy.action_ids:
            raise _Invalid(f"{where}baseline", f"{row.baseline!r} is not an action of policy "
                                               f"{name!r} (actions: {list(policy.action_ids)})")
        cc = _constraints(policy)
        if cc is not None and len(row.attributes):
            try:   # the scorers' own conversion, on one row
                batch_attributes(cc, _attributes(row.attributes), 1, stable_hash)
            except FeatureError as exc:
                raise _Invalid(f"{where}attributes", str(exc)) from None
        return vec

    @staticmethod
    def _check_categories(policy: Policy, categories: Any, where: str) -> None:
        # A string for a numeric feature is the caller's mistake in `categories`: say so there
        # (the scorer's own error could not tell the two maps apart).
        numeric = {f.name for f in policy.features if f.kind == "numeric"}
        for key in categories:
            if key in numeric:
                raise _Invalid(f"{where}categories[{key!r}]",
                               f"feature {key!r} of policy {policy.name!r} is numeric: give it "
                               "in features")

    # ------------------------------------------------------------------ batch
    def DecideBatch(self, request: decision_pb2.DecideBatchRequest,
                    context: grpc.ServicerContext) -> decision_pb2.DecideBatchResponse:
        _check_deadline(context)
        try:
            if not request.decision_point:
                raise _Invalid("decision_point", "is required")
            if len(request.matrix):
                return self._batch_matrix(request)
            return self._batch_rows(request)
        except _Invalid as exc:
            _abort_invalid(context, exc)

    def _check_rows(self, n: int, field: str) -> None:
        if n > self._max_rows:
            raise _Invalid(field, f"{n} rows, over the limit of {self._max_rows}")

    def _batch_rows(self, request: decision_pb2.DecideBatchRequest
                    ) -> decision_pb2.DecideBatchResponse:
        if request.columns or len(request.users) or len(request.eligible) or \
                len(request.attributes) or len(request.baselines) or len(request.has_user):
            raise _Invalid("rows", "columns, users, has_user, eligible, attributes and "
                                   "baselines go with matrix; rows carry their own")
        self._check_rows(len(request.rows), "rows")
        name, default = request.decision_point, request.default_action or None
        # Validate every row before deciding any: a batch refused halfway would leave logged
        # decisions that nobody was shown.
        inputs = [self._row_input(name, row, f"rows[{i}].") for i, row in enumerate(request.rows)]
        policy = self._client.policy(name)
        apprentice = policy is not None and policy.mode == "apprentice"
        with_rules = policy is not None and bool(policy.rules or policy.caps)
        out = decision_pb2.DecideBatchResponse(policy_name=name)
        for i, (row, x) in enumerate(zip(request.rows, inputs)):
            d = self._decide_one(name, row, default, request.deferred, f"rows[{i}].", x)
            out.actions.append(d.action or "")
            out.probabilities.append(d.probability)
            out.event_ids.append(d.event_id or "")
            out.holdouts.append(d.holdout)
            out.reasons.append(d.reason)
            out.policy_version = d.policy_version or out.policy_version
            if apprentice:
                out.policy_actions.append(d.policy_action or "")
                out.policy_probabilities.append(d.policy_probability if d.apprentice else 0.0)
            if with_rules:
                out.rules.append(d.rules)
        return out

    def _batch_matrix(self, request: decision_pb2.DecideBatchRequest
                      ) -> decision_pb2.DecideBatchResponse:
        if len(request.rows):
            raise _Invalid("rows", "give either rows or matrix, not both")
        cols, size = request.columns, len(request.matrix)
        if cols == 0:
            raise _Invalid("columns", "is required with matrix (the policy's input count)")
        if size % cols:
            raise _Invalid("matrix", f"{size} values is not a whole number of rows of "
                                     f"{cols} columns")
        n = size // cols
        self._check_rows(n, "matrix")
        if len(request.users) not in (0, n):
            raise _Invalid("users", f"{len(request.users)} users for {n} rows (give one per "
                                    "row or none)")
        if len(request.has_user) not in (0, len(request.users)):
            raise _Invalid("has_user", f"{len(request.has_user)} flags for "
                                       f"{len(request.users)} users (give one per user or none)")
        name = request.decision_point
        policy = self._client.policy(name)
        if policy is None:
            return self._batch_default(request, n)
        if cols != policy.n_inputs:
            raise _Invalid("columns", f"policy {name!r} has {policy.n_inputs} inputs, got "
                                      f"{cols}")
        mask = None
        if len(request.eligible):
            index = {a: i for i, a in enumerate(policy.action_ids)}
            mask = np.zeros(policy.n_actions, np.bool_)
            for a in request.eligible:
                if a not in index:
                    raise _Invalid("eligible", f"{a!r} is not an action of policy {name!r} "
                                               f"(actions: {list(policy.action_ids)})")
                mask[index[a]] = True
        users = None
        if len(request.users):
            users = list(request.users)
            if len(request.has_user):
                if not all(request.has_user):
                    users = [u if has else None for u, has in zip(users, request.has_user)]
            elif "" in users:
                users = [u or None for u in users]
        baselines = list(request.baselines)
        if len(baselines) not in (0, 1, n):
            raise _Invalid("baselines", f"{len(baselines)} baselines for {n} rows (give none, "
                                        "one, or one per row)")
        baseline = None if not baselines else baselines[0] if len(baselines) == 1 else baselines
        attributes = _attribute_columns(request.attributes, n)
        x = np.array(request.matrix, dtype=np.float64).reshape(n, cols)
        try:
            b = self._client.decide_batch(name, x, users, mask, deferred=request.deferred,
                                          attributes=attributes, baseline=baseline)
        except FeatureError as exc:
            raise _input_error(exc, "", "matrix", "baselines") from None
        except UnknownActionError as exc:
            raise _action_error(exc, "", "baselines") from None
        except KeyError:   # no policy any more (cannot happen today: policies are never removed)
            return self._batch_default(request, n)
        ids = b.action_ids
        # 32 hex digits per event id, formatted in one pass over the big-endian (hi, lo) bytes.
        hexed = np.stack([b.event_hi, b.event_lo], axis=1).astype(">u8").tobytes().hex()
        codes = b.reason_codes
        if n and not codes.any():
            reasons = [Reason.POLICY] * n
        else:
            reasons = [REASONS[c] for c in codes.tolist()]
        out = decision_pb2.DecideBatchResponse(
            actions=[ids[a] for a in b.actions.tolist()],
            probabilities=b.probabilities.tolist(),
            event_ids=[hexed[i:i + 32] for i in range(0, 32 * n, 32)],
            holdouts=b.holdout.tolist(), reasons=reasons, policy_name=name,
            policy_version=b.policy_version)
        if b.policy_actions is not None:
            out.policy_actions.extend([ids[a] if a >= 0 else "" for a in
                                       b.policy_actions.tolist()])
            out.policy_probabilities.extend(b.policy_probabilities.tolist())
        if b.rules is not None:
            out.rules.extend(b.rules.tolist())
        return out

    def _batch_default(self, request: decision_pb2.DecideBatchRequest, n: int
                       ) -> decision_pb2.DecideBatchResponse:
        """No policy for the point: every row gets the caller's default, like decide()."""
        d = self._client.decide(request.decision_point, {}, None, None,
                                default=request.default_action or None)
        return decision_pb2.DecideBatchResponse(
            actions=[d.action or ""] * n, probabilities=[1.0] * n, event_ids=[""] * n,
            holdouts=[False] * n, reasons=[d.reason] * n, policy_name=request.decision_point,
            policy_version=0)

    # ------------------------------------------------------------------ outcomes
    @_invalid_aborts
    def Reward(self, request: decision_pb2.RewardRequest,
               context: grpc.ServicerContext) -> decision_pb2.RewardResponse:
        event_id = self._event_id(request.event_id)
        self._client.reward(event_id, _finite(request.value), _kind(request.kind, "reward"))
        return decision_pb2.RewardResponse()

    @_invalid_aborts
    def Observe(self, request: decision_pb2.ObserveRequest,
                context: grpc.ServicerContext) -> decision_pb2.ObserveResponse:
        if not request.HasField("user"):
            raise _Invalid("user", "is required")
        self._client.observe(request.user, _finite(request.value), _kind(request.kind, "observe"))
        return decision_pb2.ObserveResponse()

    @_invalid_aborts
    def Activate(self, request: decision_pb2.ActivateRequest,
                 context: grpc.ServicerContext) -> decision_pb2.ActivateResponse:
        self._client.activate(self._event_id(request.event_id))
        return decision_pb2.ActivateResponse()

    @staticmethod
    def _event_id(event_id: str) -> str:
        if not event_id:
            raise _Invalid("event_id", "is required")
        if len(event_id) != 32:
            raise _Invalid("event_id", f"{event_id!r} is not 32 hex digits")
        try:
            parse_event_id(event_id)   # the client's own check: int(s, 16) would take "0x..."
        except ValueError:
            raise _Invalid("event_id", f"{event_id!r} is not 32 hex digits") from None
        return event_id


def _counted_refusals(authorize: Any, rpc: Any) -> Any:
    """``authorize`` that also counts the calls it refuses (by method and code)."""
    if authorize is None:
        return None

    def check(method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        refused = authorize(method, metadata)
        if refused is not None:
            rpc.observe(rpc.method_label(method), refused[0], 0.0)
        return refused

    return check


class DecisionServer:
    """Runs the gRPC decision service around a :class:`DecisionClient`.

    Example::

        cfg = ClientConfig(learner="127.0.0.1:7070", policy_name="bonus",
                           fallback_policy="bonus.policy")
        with DecisionServer(cfg, port=7071) as server:
            server.wait()

    Args:
        client: a DecisionClient (the server uses it and leaves it open on stop) or a
            :class:`ClientConfig` (the server builds the client and closes it on stop,
            flushing what it logged to the learner).
        host, port: where to listen (port 0 = ephemeral; read :attr:`port` after start).
        security: TLS and tokens; the default serves plaintext on loopback only.
        max_workers: gRPC's server threads, for health checks and reflection (and for the
            decision methods when ``unary_loop`` is off). Handlers take microseconds and hold
            the GIL, so a few threads serve best (more only contend); calls beyond them
            queue. An open reflection stream holds one thread while it lasts.
        max_batch_rows: largest DecideBatch (rows or matrix rows).
        max_message_bytes: largest request or response message.
        reuse_port: share ``port`` with other processes that also set it (``SO_REUSEPORT``:
            the kernel spreads new connections over them); see
            :class:`~loops_sdk.serve.pool.DecisionServerPool`. Off by default, so a second
            server on a port in use fails to bind instead of silently sharing it.
        unary_loop: serve the DecisionService methods from one thread on gRPC's completion
            queue (:mod:`loops_sdk.serve.unary_loop`: about 60% of the CPU per call, so lower
            latency under load); health and reflection keep the thread pool. False serves
            everything from the pool, as does a gRPC build without what the loop needs.
        metrics_port: serve Prometheus metrics at ``http://metrics_host:PORT/metrics``
            (0 = any free port, read :attr:`metrics_port` after start; None = none; needs
            the ``metrics`` extra): the client's counters and RPCs by method and code.
        metrics_host: where the metrics endpoint listens (loopback by default).
    """

    def __init__(self, client: DecisionClient | ClientConfig, host: str = "127.0.0.1",
                 port: int = 0, *, security: ServerSecurity | None = None, max_workers: int = 4,
                 max_batch_rows: int = 10_000, max_message_bytes: int = 4 * _MiB,
                 reuse_port: bool = False, unary_loop: bool = True,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
        if max_workers < 1 or max_batch_rows < 1 or max_message_bytes < 1024:
            raise ValueError("max_workers and max_batch_rows must be >= 1, max_message_bytes "
                             ">= 1024")
        self.security = security if security is not None else ServerSecurity()
        self.security.check_bind(host)
        self._owns_client = isinstance(client, ClientConfig)
        self.client = DecisionClient(client) if isinstance(client, ClientConfig) else client
        self.host = host
        self.port = 0
        self._requested_port = port
        self._max_workers = max_workers
        self._max_batch_rows = max_batch_rows
        self._max_message_bytes = max_message_bytes
        self._reuse_port = bool(reuse_port)
        self._want_loop = bool(unary_loop)
        self._loop: unary_loop.UnaryLoop | None = None
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._stop = threading.Event()
        self._metrics_request = (metrics_host, metrics_port)
        self._metrics: Any = None
        self.metrics_port = 0

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def start(self) -> "DecisionServer":
        """Bind and serve; returns self."""
        limit = self._max_message_bytes
        rpc = registry = None
        if self._metrics_request[1] is not None:
            from ..metrics import ClientCollector, RpcMetrics, new_registry
            registry = new_registry([ClientCollector(self.client)])
            rpc = RpcMetrics(registry)
        server = new_server(self.security, DECISION_METHOD_ROLES, max_workers=self._max_workers,
                            thread_name_prefix="loops-decide-rpc", max_receive_bytes=limit,
                            max_send_bytes=limit, reuse_port=self._reuse_port,
                            interceptors=[rpc.interceptor()] if rpc is not None else [])
        methods = _service_methods(DecisionServicer(self.client,
                                                    max_batch_rows=self._max_batch_rows))
        self._loop = self._unary_loop(server, methods, rpc)
        if self._loop is not None:
            self._loop.attach()
        else:
            handlers = {name.rsplit("/", 1)[1]: grpc.unary_unary_rpc_method_handler(
                m.behavior, request_deserializer=m.request_deserializer,
                response_serializer=m.response_serializer) for name, m in methods.items()}
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
            if hasattr(server, "add_registered_method_handlers"):   # newer gRPC: faster lookup
                server.add_registered_method_handlers(SERVICE_NAME, handlers)
        self._health = add_health_and_reflection(server, SERVICE_NAME)
        try:
            self.port = bind(server, self.security, self.host, self._requested_port)
        except BaseException:
            self._close_client()
            raise
        if registry is not None:
            from ..metrics import MetricsEndpoint
            try:
                self._metrics = MetricsEndpoint(registry, *self._metrics_request)
            except OSError as exc:   # the gRPC port is bound but not serving: release it
                server.stop(None)
                self._close_client()
                raise OSError(f"metrics endpoint {self._metrics_request[0]}:"
                              f"{self._metrics_request[1]}: {exc}") from None
            self.metrics_port = self._metrics.port
        server.start()
        self._server = server
        if self._loop is not None:
            self._loop.start()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        threading.Thread(target=self._report_ready, name="loops-decide-health",
                         daemon=True).start()
        logger.info("decision service listening on %s (%s; decision points %s)", self.address,
                    self.security.describe(),
                    list(self.client.config.watched_names) or list(self.client.policies))
        return self

    def _unary_loop(self, server: grpc.Server, methods: dict[str, unary_loop.UnaryMethod],
                    rpc: Any = None) -> unary_loop.UnaryLoop | None:
        if not self._want_loop:
            return None
        if not unary_loop.supported(server):
            logger.warning("this gRPC build lacks what the decision service's single-thread "
                           "loop needs: serving from gRPC's thread pool (more CPU per call)")
            return None
        authorize = self.security.authorizer(DECISION_METHOD_ROLES)
        if rpc is not None:   # the loop is outside gRPC's interceptors: count its calls here
            methods = {name: dataclasses.replace(m, behavior=rpc.wrap(name, m.behavior))
                       for name, m in methods.items()}
            authorize = _counted_refusals(authorize, rpc)
        return unary_loop.UnaryLoop(server, methods, authorize=authorize)

    @property
    def serving_loop(self) -> bool:
        """True when the DecisionService methods are served by the single-thread loop."""
        return self._loop is not None

    def _report_ready(self) -> None:
        # The service is SERVING for load balancers once every watched point has a policy.
        while not self._stop.is_set():
            if self.client.wait_for_initialization(0.25):
                if not self._stop.is_set() and self._health is not None:
                    self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
                return

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds), then close the client if the
        server built it (which flushes its records to the learner). Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._loop is not None:
            self._loop.stop()
        if self._metrics is not None:
            self._metrics.close()
        self._close_client()
        logger.info("decision service stopped")

    close = stop

    def _close_client(self) -> None:
        if self._owns_client:
            self.client.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` is called; True if it was."""
        return self._stop.wait(timeout)

    def __enter__(self) -> "DecisionServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"DecisionServer({self.address}, {self.client!r})"
