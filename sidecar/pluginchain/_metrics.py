"""Prometheus metrics of the chain engine, defined once for the process.

The engine binds the labelled children once per compiled plugin, so the hot path only observes.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

PLUGIN_LATENCY = Histogram(
    "pluginchain_plugin_duration_seconds",
    "Time one plugin execution took, in seconds.",
    ["chain", "plugin"],
    buckets=_LATENCY_BUCKETS,
)
PLUGIN_DECISIONS = Counter(
    "pluginchain_plugin_decisions",
    "Plugin executions by outcome: allow, reject, error (fail_closed failure) or fail_open.",
    ["chain", "plugin", "outcome"],
)
CHAIN_LATENCY = Histogram(
    "pluginchain_stage_duration_seconds",
    "Time one stage of a chain took (pre_request or post_request), in seconds.",
    ["chain"],
    buckets=_LATENCY_BUCKETS,
)
