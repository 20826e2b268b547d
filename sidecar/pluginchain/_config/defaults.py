"""Every default port, limit and interval, in one place (kopf's ``configuration.py`` style).

The CLI's flags, the sidecar's and operator's settings and the generated Envoy configuration read
their defaults from :data:`DEFAULTS`, so a default changes in one line and the help texts follow.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    # --- The sidecar ----------------------------------------------------------------------------

    ext_proc_host: str = "127.0.0.1"
    """Address ext_proc listens on. Envoy runs in the same pod, so loopback is the safe default."""
    ext_proc_port: int = 50051
    """ext_proc gRPC port (DESIGN.md's contract)."""
    config_host: str = "0.0.0.0"
    """Address ConfigService listens on; the operator reaches it from outside the pod."""
    config_port: int = 50052
    """ConfigService gRPC port (DESIGN.md's contract); also the operator's default for pods
    without the ``pluginchain.io/config-port`` annotation."""
    metrics_host: str = "0.0.0.0"
    """Address Prometheus' ``/metrics`` listens on."""
    metrics_port: int = 9090
    """Prometheus ``/metrics`` HTTP port (DESIGN.md's contract)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request or response body the chain accepts, in bytes (4 MiB); larger gets 413.
    Envoy's buffer limit is set to the same value."""
    max_streams: int = 4096
    """Concurrent ext_proc streams (HTTP requests in the chain) one sidecar serves; one more is
    refused at once with RESOURCE_EXHAUSTED (the client gets Envoy's 500), never queued. A stream
    that waits on a slow upstream costs the sidecar about 20 KB, so 4096 of them stay under
    100 MB, while a stream that runs plugins shares one Python thread: a pod at its cap is
    overloaded either way, and refusing bounds its memory instead of letting it grow until the
    pod is killed."""
    grace_seconds: float = 10.0
    """Seconds in-flight requests get to finish after SIGTERM."""
    reload_interval_seconds: float = 1.0
    """Seconds between two checks of the chain file for changes."""
    reload_settle_seconds: float = 1.0
    """Seconds a changed chain file must stay the same before it is served: read twice at least
    this far apart, same bytes, same size and mtime. A file caught half-written is never served."""

    # --- The local gateway's Envoy --------------------------------------------------------------

    envoy_port: int = 8080
    """Envoy's listener for client traffic."""
    envoy_admin_port: int = 9901
    """Envoy's admin interface, always on loopback: it can stop Envoy."""
    message_timeout: str = "10s"
    """How long Envoy waits for the sidecar's answer to one phase (covers the chain's plugins)."""
    upstream_timeout: str = "300s"
    """How long an LLM call may take, a streamed completion to its last event included."""
    upstream_read_buffer_bytes: int = 64 * 1024
    """How much of an upstream's response Envoy reads ahead of the chain (64 KiB). A streamed
    completion reaches the sidecar in chunks of at most about this size even when the upstream
    is faster than the chain, so the sidecar's memory stays flat; a buffered body may still grow
    to the body limit."""

    # --- The operator ---------------------------------------------------------------------------

    push_timeout_seconds: float = 3.0
    """Seconds one push to one sidecar may take."""
    retry_delay_seconds: float = 5.0
    """Seconds before a PluginChain whose pushes failed is reconciled again."""
    resync_interval_seconds: float = 10.0
    """Seconds between checks that every sidecar still runs what it acknowledged."""


DEFAULTS = Defaults()
