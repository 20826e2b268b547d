"""Every Prometheus metric pluginchain exports, declared once for the process.

Declaring a labelled metric creates no series; series appear when a serving sidecar binds
labels. The engine takes an observer instead of importing this module (:class:`EngineMetrics`
is the one the sidecar passes), so compiling a plan in the operator or the CLI creates none.
Labelled children are bound once per compiled plugin or chain, so the hot path only observes.

Every label set is bounded: chain names come from the serving plan, plugin ids from its config,
and the values that come from outside the config (the model a response names, the error code a
plugin or an external validator chose) go through a :class:`BoundedLabel`: the first 64 distinct
values as they come, every later one ``other``. The README's Metrics section lists them all.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OTHER = "other"
"""The label value of everything past a :class:`BoundedLabel`'s limit."""


class BoundedLabel:
    """The values one label takes from outside the config: the first ``limit`` distinct ones as
    they come (none longer than ``max_length``), every later one :data:`OTHER`, so no input can
    grow a metric without end. ``missing`` stands for no value (None or empty)."""

    __slots__ = ("limit", "max_length", "missing", "_seen")

    def __init__(self, limit: int, *, missing: str, max_length: int = 64):
        self.limit = limit
        self.max_length = max_length
        self.missing = missing
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return self.missing
        if value in self._seen:
            return value
        if len(value) > self.max_length or len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


ERROR_CODES = BoundedLabel(64, missing="none")
"""The ``code`` label: the error code a client got (a plugin's reject code such as
``content_filtered``, ``plugin_failed``, ``body_too_large``...); ``none`` when it got no error."""
MODELS = BoundedLabel(64, missing="unknown")
"""The ``model`` label: the model a response names."""

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- The engine ---------------------------------------------------------------------------------

PLUGIN_LATENCY = Histogram(
    "pluginchain_plugin_duration_seconds",
    "Time one plugin execution took, in seconds.",
    ["chain", "plugin"],
    buckets=_LATENCY_BUCKETS,
)
PLUGIN_DECISIONS = Counter(
    "pluginchain_plugin_decisions",
    "Plugin executions by outcome: allow (went on, body and stream text unchanged), redacted (went on with "
    "the body, a stream's text or event changed), reject, error (raised), timeout, cancelled (stopped unfinished: "
    "a parallel member rejected or failed closed, or the request went away); code is the error code the "
    "client got from it (the reject's code, plugin_failed, plugin_timeout) or none.",
    ["chain", "plugin", "outcome", "code"],
)
CHAIN_LATENCY = Histogram(
    "pluginchain_stage_duration_seconds",
    "Time one stage of a chain took, in seconds, by stage: pre_request, post_request, post_request_event "
    "(the per-event plugins on one event of a streamed response) or error.",
    ["chain", "stage"],
    buckets=_LATENCY_BUCKETS,
)

# --- The sidecar --------------------------------------------------------------------------------

REQUESTS = Counter(
    "pluginchain_requests",
    "HTTP requests seen by the sidecar, by chain, outcome (allow, reject, error, cancelled), the "
    "status class the client got (2xx..5xx; none when no response passed the sidecar) and the error "
    "code it got (content_filtered, plugin_failed, body_too_large...; none without an error).",
    ["chain", "outcome", "status_class", "code"],
)
TOKENS = Histogram(
    "gen_ai_client_token_usage",
    "Tokens one response used, as it reported them, by chain, model and type (input, output); "
    "OpenTelemetry's gen_ai.client.token.usage. Counted where the chain reads responses.",
    ["chain", "model", "type"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Time from a request reaching the sidecar to the first text of its streamed completion leaving "
    "for the client, by chain; OpenTelemetry's gen_ai.server.time_to_first_token.",
    ["chain"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
UPSTREAM_LATENCY = Histogram(
    "pluginchain_upstream_response_seconds",
    "Time from the request going on upstream to the upstream's response headers, by chain "
    "(for chains that see responses).",
    ["chain"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
RELOADS = Counter("pluginchain_config_reloads", "Chain-file changes by result: applied or invalid.", ["result"])
PLAN_VERSION = Gauge("pluginchain_config_version", "Version of the plan that serves new requests.")
PUSHES = Counter(
    "pluginchain_config_pushes",
    "ConfigService Apply calls by result: applied, unchanged, invalid, stale, unauthenticated, failed.",
    ["result"],
)

# --- Built-in plugins ---------------------------------------------------------------------------

RATE_LIMITER_BACKEND_ERRORS = Counter(
    "pluginchain_rate_limiter_backend_errors",
    "Limiter decisions the backend (Redis) could not make (rate_limiter, token_limiter), by what happened: "
    "allow or deny (what on_backend_error decided), unsettled (a token charge after the response failed).",
    ["chain", "plugin", "decision"],
)


class EngineMetrics:
    """The engine's observer in a serving sidecar: its plugin and stage metrics, bound per label set.
    Chain names and plugin ids come from the compiled plan; codes are bounded by :data:`ERROR_CODES`."""

    def plugin_latency(self, chain: str, plugin: str) -> Histogram:
        return PLUGIN_LATENCY.labels(chain, plugin)

    def plugin_outcome(self, chain: str, plugin: str, outcome: str, code: str | None) -> Counter:
        return PLUGIN_DECISIONS.labels(chain, plugin, outcome, ERROR_CODES(code))

    def stage_latency(self, chain: str, stage: str) -> Histogram:
        return CHAIN_LATENCY.labels(chain, stage)


# --- The audit log ------------------------------------------------------------------------------

AUDIT_RECORDS = Counter(
    "pluginchain_audit_records",
    "audit_log records by sink (stdout, file, http) and result: written, dropped (the sink's queue was "
    "full, or still held records when the plan closed) or failed (a write error, or a batch the HTTP "
    "endpoint did not take).",
    ["chain", "plugin", "sink", "result"],
)
