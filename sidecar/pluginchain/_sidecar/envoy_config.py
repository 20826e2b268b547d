"""The Envoy configuration that puts the sidecar in the request path, in one place.

``pluginchain gateway`` runs Envoy with it, ``pluginchain envoy-config`` prints it for users to
adopt, and the tests prove it. It fails closed: if the sidecar cannot be reached, requests get an
error, never a free pass. And every error a client gets is an OpenAI-style JSON error: the replies
Envoy makes itself (upstream down, sidecar down, timeouts, a body over the limit) are rewritten
into ``{"error": {"message", "type", "code"}}`` by the connection manager's ``local_reply_config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from pluginchain._config.defaults import DEFAULTS
from pluginchain._config.models import CHAIN_METADATA_KEY
from pluginchain._sidecar.extproc import SOURCE_ADDRESS_ATTRIBUTE

SIDECAR_CLUSTER = "pluginchain_sidecar"
UPSTREAM_CLUSTER = "llm_upstream"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

CONNECTION_HEADERS_REGEX = "transfer-encoding|connection|keep-alive|proxy-connection|te|upgrade"
"""Header names the sidecar may never set or remove, whole-name match: Envoy's own rules
(``disallow_system``) cover pseudo-headers and ``host`` only, and a ``transfer-encoding`` next to
a ``content-length`` is a request-smuggling primitive. ``content-length`` is not among them: the
sidecar sets it when it replaces a body, and the plugin API refuses it to plugins."""


SIDECAR_DETAILS_PREFIX = "pluginchain_"
"""The sidecar's own answers (ImmediateResponse) carry ``details`` starting with this; they are
already JSON errors and pass through Envoy's local reply rewriting untouched."""


@dataclass(frozen=True)
class LocalReply:
    """One kind of reply Envoy makes itself, and the OpenAI-style error a client gets instead."""

    code: str
    """The error's ``code``: stable, for clients to act on."""
    type: str
    message: str
    """Envoy's command operators work here: ``%RESPONSE_CODE_DETAILS%`` says what Envoy saw."""
    flags: tuple[str, ...] = ()
    """Envoy response flags (UF, UT, ...) that select this reply..."""
    details: str | None = None
    """...or a CEL condition on ``response.code_details``."""


def _details_start(*prefixes: str) -> str:
    return " || ".join(f"response.code_details.startsWith('{prefix}')" for prefix in prefixes)


_ENVOY_SAYS = " (envoy: %RESPONSE_CODE_DETAILS%)"
_NOT_THE_SIDECARS = f"!response.code_details.startsWith('{SIDECAR_DETAILS_PREFIX}')"


def local_replies(max_body_bytes: int) -> tuple[LocalReply, ...]:
    """Envoy's own replies, first match wins; each keeps Envoy's status. A reply that none selects
    (the sidecar's) passes unchanged: there is no top-level ``body_format``."""
    return (
        LocalReply("upstream_timeout", "server_error", "the LLM upstream did not answer within the gateway's route timeout",
                   flags=("UT",)),
        LocalReply("upstream_unavailable", "server_error",
                   "the LLM upstream could not be reached or reset the connection before answering" + _ENVOY_SAYS,
                   flags=("UF", "UH", "UC", "UO", "UR", "URX", "UPE", "NC", "DF", "UMSDR")),
        LocalReply("route_not_found", "not_found_error", "no gateway route for this path", flags=("NR",)),
        LocalReply("gateway_processor_timeout", "server_error", "the gateway's plugin processor did not answer in time",
                   details=_details_start("ext_proc_error_per-message_timeout")),
        # The sidecar refuses a stream beyond its cap with RESOURCE_EXHAUSTED (gRPC status 8).
        LocalReply("gateway_overloaded", "server_error", "the gateway's plugin processor is at its stream limit; retry",
                   details=_details_start("ext_proc_error_gRPC_error_8{")),
        LocalReply("gateway_processor_unavailable", "server_error",
                   "the gateway's plugin processor is unreachable or failed" + _ENVOY_SAYS,
                   details=_details_start("ext_proc_error")),
        LocalReply("header_mutation_refused", "server_error", "the gateway refused a header change of its plugins" + _ENVOY_SAYS,
                   details=_details_start("header_mutation_")),
        LocalReply("body_too_large", "invalid_request_error", f"request body exceeds the gateway limit of {max_body_bytes} bytes",
                   details="response.code_details == 'request_payload_too_large'"),
        LocalReply("response_too_large", "server_error", f"the upstream's response body exceeds the gateway limit of {max_body_bytes} bytes",
                   details="response.code_details == 'response_payload_too_large'"),
        # Anything else Envoy answers itself (431 headers too large, 400 malformed requests, ...).
        LocalReply("gateway_error", "server_error", "the gateway could not serve this request" + _ENVOY_SAYS,
                   details=f"{_NOT_THE_SIDECARS} && response.code >= 500"),
        LocalReply("gateway_error", "invalid_request_error", "the gateway refused this request" + _ENVOY_SAYS,
                   details=_NOT_THE_SIDECARS),
    )


def local_reply_config(max_body_bytes: int) -> dict:
    """``local_reply_config`` of the connection manager: each of :func:`local_replies` as a mapper."""
    mappers = []
    for reply in local_replies(max_body_bytes):
        if reply.flags:
            selector: dict = {"response_flag_filter": {"flags": list(reply.flags)}}
        else:
            selector = {"extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                    "expression": reply.details,
                },
            }}
        error = {"message": reply.message, "type": reply.type, "code": reply.code}
        mappers.append({"filter": selector, "body_format_override": {"json_format": {"error": error}}})
    return {"mappers": mappers}


@dataclass(frozen=True)
class EnvoySettings:
    """Knobs of the generated Envoy configuration."""

    upstream: str = "http://127.0.0.1:8000"
    """The LLM provider's base URL (http or https)."""
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULTS.envoy_port
    admin_host: str = "127.0.0.1"
    """Envoy's admin interface can stop Envoy or fail its health checks: keep it on loopback."""
    admin_port: int = DEFAULTS.envoy_admin_port
    ready_port: int | None = None
    """A listener on ``listen_host`` that answers ``GET /ready`` (200 while Envoy is live, 503
    once its health check fails) and nothing else, for probes that cannot reach loopback (the
    kubelet's). None: no such listener."""
    sidecar_host: str = "127.0.0.1"
    sidecar_port: int = DEFAULTS.ext_proc_port
    routes: tuple[tuple[str, str], ...] = ()
    """(path prefix, chain name) pairs; other paths run the ``default`` chain."""
    max_body_bytes: int = DEFAULTS.max_body_bytes
    """Envoy's buffer limit, equal to the sidecar's body limit: larger bodies get 413."""
    message_timeout: str = DEFAULTS.message_timeout
    """How long Envoy waits for the sidecar's answer to one phase (covers the chain's plugins);
    on a streamed completion, to each chunk's answer, so the stream itself may last longer."""
    upstream_timeout: str = DEFAULTS.upstream_timeout
    """The route timeout: how long an LLM call may take, from the end of the request to the end
    of the response, a streamed completion to its last event included. ``0s`` disables it."""
    upstream_read_buffer_bytes: int = DEFAULTS.upstream_read_buffer_bytes
    """How far Envoy reads ahead of the chain into an upstream's response: bounds the chunks a
    streamed completion reaches the sidecar in."""
    failure_mode_allow: bool = False
    """False: an unreachable sidecar fails requests closed."""
    max_streams: int = DEFAULTS.max_streams
    """The sidecar's ``--max-streams``: Envoy's circuit breaker on the sidecar cluster allows as
    many concurrent streams (its own default, 1024, would refuse load the sidecar can take)."""


_PROTOBUF_DURATION = re.compile(r"[0-9]+(\.[0-9]{1,9})?s")
"""What Envoy reads as a duration (the chart's schema has the same pattern)."""


def render(settings: EnvoySettings) -> dict:
    """The Envoy bootstrap as a dict (dump it as YAML or JSON)."""
    upstream = urlsplit(settings.upstream)
    if upstream.scheme not in ("http", "https") or not upstream.hostname:
        raise ValueError(f"upstream must be an http(s) URL with a host, got {settings.upstream!r}")
    upstream_port = upstream.port or (443 if upstream.scheme == "https" else 80)
    for name, duration in (("message timeout", settings.message_timeout), ("upstream timeout", settings.upstream_timeout)):
        if not _PROTOBUF_DURATION.fullmatch(duration):
            raise ValueError(f"the {name} must be a duration in seconds like 10s or 0.5s, got {duration!r}")

    routes = [_route(prefix, chain, settings) for prefix, chain in settings.routes]
    routes.append(_route("/", None, settings))
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": SIDECAR_CLUSTER}, "timeout": settings.message_timeout},
        "failure_mode_allow": settings.failure_mode_allow,
        "allow_mode_override": True,
        "message_timeout": settings.message_timeout,
        "processing_mode": {
            # The sidecar narrows this per request with mode_override once it knows the chain.
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "request_attributes": [SOURCE_ADDRESS_ATTRIBUTE],
        "mutation_rules": _mutation_rules(),
    }
    connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "generate_request_id": True,
        # Every response carries x-request-id, errors included: the id the sidecar logs with.
        "always_set_request_id_in_response": True,
        "local_reply_config": local_reply_config(settings.max_body_bytes),
        "route_config": {"name": "gateway", "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": EXT_PROC_FILTER, "typed_config": ext_proc}, _router()],
    }
    upstream_cluster = {
        "name": UPSTREAM_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": settings.upstream_read_buffer_bytes,
        "load_assignment": _endpoints(UPSTREAM_CLUSTER, upstream.hostname, upstream_port),
    }
    if upstream.scheme == "https":
        upstream_cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": upstream.hostname,
                # Verify the provider's certificate: API keys travel on this connection.
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": upstream.hostname}}],
                }},
            },
        }
    sidecar_cluster = {
        "name": SIDECAR_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "circuit_breakers": {"thresholds": [{"max_requests": settings.max_streams}]},
        "load_assignment": _endpoints(SIDECAR_CLUSTER, settings.sidecar_host, settings.sidecar_port),
    }
    listeners = [{
        "name": "gateway",
        "address": _socket(settings.listen_host, settings.listen_port),
        # Bind exclusively: a second gateway on this port fails to start instead of sharing it.
        "enable_reuse_port": False,
        "per_connection_buffer_limit_bytes": settings.max_body_bytes,
        "filter_chains": [_http_filter_chain(connection_manager)],
    }]
    if settings.ready_port is not None:
        listeners.append(_ready_listener(settings.listen_host, settings.ready_port))
    return {
        "admin": {"address": _socket(settings.admin_host, settings.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": [sidecar_cluster, upstream_cluster]},
        "layered_runtime": {"layers": [{"name": "pluginchain", "static_layer": RUNTIME}]},
    }


RUNTIME = {
    # Envoy half-closes each ext_proc stream and waits (1 s at most) for the processor to end it,
    # instead of resetting it: grpcio keeps about 120 bytes of native memory for every stream
    # that ends by a reset, so the sidecar's memory grew with every request (bench/soak.py:
    # +11.7 MB per 100k requests for a bare grpcio processor with resets, +0.13 MB without).
    "envoy.reloadable_features.ext_proc_graceful_grpc_close": True,
}
"""Envoy runtime flags the gateway's Envoy runs with."""


def _mutation_rules() -> dict:
    """What the proxy refuses of the sidecar's header mutations, whatever a plugin managed to ask."""
    return {
        # Pseudo-headers (:path, :method, :authority, :scheme, :status) and host.
        "disallow_system": True,
        "disallow_expression": {"regex": CONNECTION_HEADERS_REGEX},
        # x-envoy-* are refused already (allow_envoy is false). A refused mutation fails the
        # request (a 500 from Envoy) instead of letting it pass without the mutation.
        "disallow_is_error": True,
    }


def _router() -> dict:
    # A new dict each time: a shared one would be dumped as a YAML anchor and alias.
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }


def _http_filter_chain(connection_manager: dict) -> dict:
    return {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": connection_manager}]}


def _ready_listener(host: str, port: int) -> dict:
    """Envoy's readiness without its admin interface: the health_check filter answers /ready
    itself (its listeners open only once Envoy is initialised); every other path gets 404."""
    connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ready",
        "route_config": {"name": "ready", "virtual_hosts": [{
            "name": "ready", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}],
        }]},
        "http_filters": [
            {"name": "envoy.filters.http.health_check", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
                "pass_through_mode": False,
                "headers": [{"name": ":path", "string_match": {"exact": "/ready"}}],
            }},
            _router(),
        ],
    }
    return {"name": "ready", "address": _socket(host, port), "enable_reuse_port": False, "filter_chains": [_http_filter_chain(connection_manager)]}


def _route(prefix: str, chain: str | None, settings: EnvoySettings) -> dict:
    upstream = urlsplit(settings.upstream)
    action: dict = {"cluster": UPSTREAM_CLUSTER, "timeout": settings.upstream_timeout}
    if upstream.scheme == "https":
        action["auto_host_rewrite"] = True
    route: dict = {"match": {"prefix": prefix}, "route": action}
    if chain is not None:
        route["typed_per_filter_config"] = {
            EXT_PROC_FILTER: {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "overrides": {"grpc_initial_metadata": [{"key": CHAIN_METADATA_KEY, "value": chain}]},
            }
        }
    return route


def _socket(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _endpoints(cluster: str, host: str, port: int) -> dict:
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}]}
