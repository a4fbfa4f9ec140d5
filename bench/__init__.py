"""LOOPS benchmarks: ``python -m bench`` (see ``python -m bench --help``).

One module per concern: ``decide`` (single-call latency, batch throughput, shape sweep),
``memory`` (resident memory per loaded policy), ``peers`` (Vowpal Wabbit, MABWiser),
``learner`` (ingest throughput, publish→applied latency) and ``shipping`` (decide() tail
latency while the background shipper runs). Targets are printed next to the figures; nothing
here asserts on time.
"""
