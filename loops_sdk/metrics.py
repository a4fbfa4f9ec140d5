"""Prometheus metrics for the decision service, the learner and an embedded client
(``pip install "loops-sdk[metrics]"``: ``prometheus-client``).

Almost everything is read at scrape time from counters the SDK keeps anyway (custom
collectors over ``DecisionClient.stats()``, the learner's store and gate counts), so serving
metrics adds no work to ``decide``. The only per-call work is the RPC histogram of a server
started with a metrics port (one counter and one histogram update per call).

An embedded client exports its counters into the host's own registry in one line::

    from prometheus_client import REGISTRY
    from loops_sdk.metrics import ClientCollector
    REGISTRY.register(ClientCollector(client))

Names follow Prometheus conventions: ``loops_<component>_<what>_<unit>``, counters end in
``_total``, durations are seconds, and labels are low-cardinality (decision point, policy,
RPC method and status code, gate verdict, worker index).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
import urllib.request
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily, Metric)
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:   # pragma: no cover - the extra is installed in tests
    raise ImportError("loops_sdk.metrics needs prometheus-client: pip install "
                      "\"loops-sdk[metrics]\"") from exc

import grpc

__all__ = ["ClientCollector", "LearnerCollector", "RpcMetrics", "WorkerScraper", "Durations",
           "MetricsEndpoint", "new_registry", "DURATION_BUCKETS", "RPC_BUCKETS"]

# Training and gate rounds take milliseconds to minutes; RPCs microseconds to seconds.
DURATION_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 120.0, float("inf"))
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
               float("inf"))
_RPC_BOUNDS = RPC_BUCKETS[:-1]


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


# --------------------------------------------------------------------------- the client
class ClientCollector(Collector):
    """The counters of a :class:`~loops_sdk.DecisionClient` (``client.stats()``), read at
    every scrape. Register it into any registry: ``REGISTRY.register(ClientCollector(c))``.

    Args:
        client: anything with a ``stats()`` like ``DecisionClient.stats()``.
    """

    def __init__(self, client: Any) -> None:
        self._client = client

    def describe(self) -> list[Metric]:
        return []   # names come from the first collect(); no stats() call at registration

    def collect(self) -> Iterator[Metric]:
        s: Mapping[str, Any] = self._client.stats()
        points: Mapping[str, Mapping[str, int]] = s.get("points", {})
        per_point = (
            ("loops_client_decisions_total", "decisions made", "decisions"),
            ("loops_client_holdout_decisions_total", "decisions that were held out",
             "holdout"),
            ("loops_client_records_dropped_total", "decision records dropped because the "
             "buffer of unsent rows was full", "dropped"),
            ("loops_client_capped_decisions_total", "decisions a frequency or budget cap "
             "changed", "capped"),
            ("loops_client_cap_evictions_total", "players forgotten by a full cap table",
             "cap_evictions"))
        for name, doc, key in per_point:
            m = _counter(name, doc, ["decision_point"])
            for point, ps in points.items():
                m.add_metric([point], float(ps.get(key, 0)))
            yield m
        m = _gauge("loops_client_policy_version", "policy version served", ["decision_point"])
        for point, version in s.get("policy_versions", {}).items():
            m.add_metric([point], float(version))
        yield m
        m = _gauge("loops_client_pending_records", "records waiting to be sent")
        m.add_metric([], float(s.get("pending", 0)))
        yield m
        m = _counter("loops_client_outcomes_total", "rewards and observations recorded")
        m.add_metric([], float(s.get("outcomes", 0)))
        yield m
        totals = (
            ("loops_client_records_sent_total", "records sent to the learner",
             "records_shipped"),
            ("loops_client_records_acked_total", "records the learner acknowledged",
             "records_acked"),
            ("loops_client_records_spooled_total", "records written to the disk spool",
             "records_spooled"),
            ("loops_client_records_dead_lettered_total", "records the learner refused, kept "
             "on disk", "records_dead_lettered"),
            ("loops_client_records_dropped_spool_total", "records dropped by a full spool",
             "records_dropped_spool"),
            ("loops_client_retries_total", "batch sends retried", "retries"),
            ("loops_client_policy_updates_total", "policy versions installed",
             "policy_updates"),
            ("loops_client_policy_updates_failed_total", "policy versions that could not be "
             "installed", "policy_updates_failed"),
            ("loops_client_background_errors_total", "unexpected errors the shipper and "
             "watcher threads logged and survived", None))
        for name, doc, key in totals:
            if key is None:
                value = s.get("shipper_errors", 0) + s.get("watcher_errors", 0)
            elif key in s:
                value = s[key]
            else:
                continue     # no learner: nothing is shipped, no series
            m = _counter(name, doc)
            m.add_metric([], float(value))
            yield m
        for name, doc, key in (
                ("loops_client_spool_records", "undelivered records in the spool",
                 "spool_records"),
                ("loops_client_spool_bytes", "undelivered bytes in the spool", "spool_bytes"),
                ("loops_client_learner_connected", "1 when the policy watch is connected",
                 "learner_connected")):
            if key in s:
                m = _gauge(name, doc)
                m.add_metric([], float(s[key]))
                yield m


# --------------------------------------------------------------------------- the learner
class LearnerCollector(Collector):
    """The learner's figures at scrape time: records received/stored/duplicate/rejected,
    rows waiting to join, join lag, gate verdicts, the version served per policy.

    Args:
        learner: a :class:`~loops_sdk.learner.Learner`.
    """

    def __init__(self, learner: Any) -> None:
        self._learner = learner

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        lr = self._learner
        ingest = dict(lr.ingest_counts)
        for key, doc in (("batches_received", "feedback batches received"),
                         ("records_received", "records received in feedback batches"),
                         ("batches_duplicate", "batches received again (already stored)"),
                         ("records_duplicate", "records in batches received again"),
                         ("batches_rejected", "batches refused (INVALID_ARGUMENT)"),
                         ("records_rejected", "records in refused batches")):
            m = _counter(f"loops_learner_{key}_total", doc + " since the learner started")
            m.add_metric([], float(ingest.get(key, 0)))
            yield m
        counters = lr.store.counters()
        m = _counter("loops_learner_records_stored_total", "records in the event store, by "
                     "kind (kept across restarts)", ["kind"])
        for kind in ("decisions", "outcomes"):
            m.add_metric([kind], float(counters.get(kind, 0)))
        yield m
        m = _counter("loops_learner_rows_joined_total", "decisions joined with their reward "
                     "(kept across restarts)", ["policy"])
        pending = lr.store.pending_by_policy()
        current = lr.store.current_policies()
        names = sorted({r.name for r in current} | set(pending))
        for name in names:
            m.add_metric([name], float(counters.get(f"joined:{name}", 0)))
        yield m
        m = _gauge("loops_learner_rows_pending", "decisions waiting for their reward window",
                   ["policy"])
        for name in names:
            m.add_metric([name], float(pending.get(name, 0)))
        yield m
        m = _gauge("loops_learner_join_lag_seconds", "time from a decision to its training "
                   "row, last join round", ["policy"])
        for name in names:
            m.add_metric([name], float(lr.trainer.info(name).get("row_lag_ms", 0.0)) / 1000)
        yield m
        m = _gauge("loops_learner_policy_version", "policy version served", ["policy"])
        for row in current:
            m.add_metric([row.name], float(row.version))
        yield m
        m = _counter("loops_learner_gate_verdicts_total", "candidates judged by the promotion "
                     "gate since the learner started, by verdict", ["verdict"])
        for verdict, n in sorted(dict(lr.gate_counts).items()):
            m.add_metric([verdict], float(n))
        yield m
        m = _counter("loops_learner_train_failures_total", "retraining rounds that raised",
                     ["policy"])
        for name, n in sorted(dict(lr.train_failures).items()):
            m.add_metric([name], float(n))
        yield m


# --------------------------------------------------------------------------- RPCs
class RpcMetrics(Collector):
    """RPC counts and latencies by method and status code, for one server (registered into
    ``registry``): ``loops_rpc_handled_total`` and the histogram ``loops_rpc_duration_seconds``.

    ``interceptor()`` instruments everything gRPC's thread pool serves (put it first, so
    calls the security interceptors refuse are counted too); ``wrap()`` instruments a
    handler served elsewhere (the decision service's single-thread loop). A call costs one
    short lock and a bisect; the series are built at scrape time.
    """

    def __init__(self, registry: CollectorRegistry, methods: Iterable[str] = ()) -> None:
        self._known = set(methods)
        self._lock = threading.Lock()
        # (method, code name) -> [sum of seconds, count per bucket..., count above the last]
        self._stats: dict[tuple[str, str], list[float]] = {}
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {key: list(row) for key, row in self._stats.items()}
        handled = _counter("loops_rpc_handled", "RPCs answered, by method and status code",
                           ["method", "code"])
        seconds = HistogramMetricFamily("loops_rpc_duration_seconds", "time to answer an RPC, "
                                        "by method and status code", labels=["method", "code"])
        for key, row in sorted(snapshot.items()):
            counts = list(itertools.accumulate(row[1:]))
            buckets = [(floatToGoString(b), c) for b, c in zip(_RPC_BOUNDS, counts)]
            buckets.append(("+Inf", counts[-1]))
            handled.add_metric(list(key), counts[-1])
            seconds.add_metric(list(key), buckets, sum_value=row[0])
        yield handled
        yield seconds

    def method_label(self, full_method: str) -> str:
        """``/pkg.Service/Method`` as ``pkg.Service/Method``; any method the server does
        not serve is ``other`` (a caller must not be able to create series)."""
        return full_method[1:] if full_method in self._known else "other"

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        slot = bisect.bisect_left(_RPC_BOUNDS, seconds) + 1   # "le": value <= bound
        key = (method, code.name)
        with self._lock:
            row = self._stats.get(key)
            if row is None:
                row = self._stats[key] = [0.0] * (len(_RPC_BOUNDS) + 2)
            row[0] += seconds
            row[slot] += 1

    def wrap(self, full_method: str, behavior: Callable[[Any, Any], Any]
             ) -> Callable[[Any, Any], Any]:
        """A unary handler that records its method, status code and duration."""
        self._known.add(full_method)
        method = self.method_label(full_method)
        observe, clock = self.observe, time.perf_counter

        def handle(request: Any, context: Any) -> Any:
            start = clock()
            try:
                response = behavior(request, context)
            except BaseException:
                observe(method, _code(context, grpc.StatusCode.UNKNOWN), clock() - start)
                raise
            observe(method, _code(context, grpc.StatusCode.OK), clock() - start)
            return response

        return handle

    def wrap_stream(self, full_method: str, behavior: Callable[[Any, Any], Iterator[Any]]
                    ) -> Callable[[Any, Any], Iterator[Any]]:
        """A response-streaming handler, recorded when its stream ends."""
        method = self.method_label(full_method)
        observe, clock = self.observe, time.perf_counter

        def handle(request: Any, context: Any) -> Iterator[Any]:
            start = clock()
            try:
                yield from behavior(request, context)
            except BaseException:
                observe(method, _code(context, grpc.StatusCode.UNKNOWN), clock() - start)
                raise
            # A stream the caller cancelled ends like a finished one: say which it was.
            ended = grpc.StatusCode.OK if context.is_active() else grpc.StatusCode.CANCELLED
            observe(method, _code(context, ended), clock() - start)

        return handle

    def interceptor(self) -> grpc.ServerInterceptor:
        return _RpcInterceptor(self)


def _code(context: Any, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return default


class _RpcInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any],
                          handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None:      # unimplemented: gRPC answers it; count it under "other"
            self._metrics.observe("other", grpc.StatusCode.UNIMPLEMENTED, 0.0)
            return None
        m = self._metrics
        m._known.add(full)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=m.wrap(full, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=m.wrap_stream(full, handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=m.wrap(full, handler.stream_unary))
        return handler._replace(stream_stream=m.wrap_stream(full, handler.stream_stream))


# --------------------------------------------------------------------------- process pools
class WorkerScraper(Collector):
    """One endpoint for a process pool: at each scrape, reads every worker's own endpoint
    (loopback) and re-exports its series with a ``worker`` label, so each worker's counters
    stay visible and can be summed in the query (``sum without (worker) (...)``).

    Args:
        endpoints: returns ``{worker index: metrics port}`` of the workers running now.
        host: where the workers' endpoints listen.
    """

    def __init__(self, endpoints: Callable[[], Mapping[int, int]], host: str = "127.0.0.1",
                 timeout: float = 2.0) -> None:
        self._endpoints, self._host, self._timeout = endpoints, host, timeout

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        up = _gauge("loops_serve_worker_up", "1 when the worker's metrics could be read",
                    ["worker"])
        for index, port in sorted(self._endpoints().items()):
            url = f"http://{_host_for_url(self._host)}:{port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=self._timeout) as resp:
                    text = resp.read().decode("utf-8")
            except OSError:
                up.add_metric([str(index)], 0.0)
                continue
            up.add_metric([str(index)], 1.0)
            for family in text_string_to_metric_families(text):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation,
                                                       family.type, family.unit)
                for sample in family.samples:
                    out.add_sample(sample.name, {**sample.labels, "worker": str(index)},
                                   sample.value, sample.timestamp, sample.exemplar)
        yield up
        yield from merged.values()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------- the endpoint
class MetricsEndpoint:
    """An HTTP server answering ``GET /metrics`` with Prometheus text from ``registry``.

    Attributes:
        registry: the registry served (add collectors to it).
        host, port: where it listens (``port`` is the bound one, also for 0).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.registry = registry
        self._server, self._thread = prometheus_client.start_http_server(
            port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{_host_for_url(self.host)}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def new_registry(collectors: Iterable[Collector] = (), *,
                 process: bool = True) -> CollectorRegistry:
    """A registry holding ``collectors`` and, with ``process``, the standard ``process_*``
    figures (CPU, memory, open files); serve it with :class:`MetricsEndpoint`."""
    registry = CollectorRegistry()
    if process:
        prometheus_client.ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


class Durations:
    """The learner's train and gate durations: two histograms by policy, fed through
    ``Learner.on_duration(step, policy, seconds)``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._by_step = {
            step: Histogram(f"loops_learner_{step}_duration_seconds", doc, ["policy"],
                            registry=registry, buckets=DURATION_BUCKETS)
            for step, doc in (("train", "time to train one candidate"),
                              ("gate", "time for the promotion gate to judge one candidate"))}

    def __call__(self, step: str, policy: str, seconds: float) -> None:
        self._by_step[step].labels(policy).observe(seconds)
