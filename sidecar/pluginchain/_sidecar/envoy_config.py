"""The Envoy configuration that puts the sidecar in the request path, in one place.

``pluginchain gateway`` runs Envoy with it, ``pluginchain envoy-config`` prints it for users to
adopt, and the tests prove it. It fails closed: if the sidecar cannot be reached, requests get an
error, never a free pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from pluginchain._config.defaults import DEFAULTS
from pluginchain._sidecar.extproc import CHAIN_METADATA_KEY, SOURCE_ADDRESS_ATTRIBUTE

SIDECAR_CLUSTER = "pluginchain_sidecar"
UPSTREAM_CLUSTER = "llm_upstream"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

CONNECTION_HEADERS_REGEX = "transfer-encoding|connection|keep-alive|proxy-connection|te|upgrade"
"""Header names the sidecar may never set or remove, whole-name match: Envoy's own rules
(``disallow_system``) cover pseudo-headers and ``host`` only, and a ``transfer-encoding`` next to
a ``content-length`` is a request-smuggling primitive. ``content-length`` is not among them: the
sidecar sets it when it replaces a body, and the plugin API refuses it to plugins."""



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
    """How long an LLM call may take, a streamed completion to its last event included."""
    upstream_read_buffer_bytes: int = DEFAULTS.upstream_read_buffer_bytes
    """How far Envoy reads ahead of the chain into an upstream's response: bounds the chunks a
    streamed completion reaches the sidecar in."""
    failure_mode_allow: bool = False
    """False: an unreachable sidecar fails requests closed."""


def render(settings: EnvoySettings) -> dict:
    """The Envoy bootstrap as a dict (dump it as YAML or JSON)."""
    upstream = urlsplit(settings.upstream)
    if upstream.scheme not in ("http", "https") or not upstream.hostname:
        raise ValueError(f"upstream must be an http(s) URL with a host, got {settings.upstream!r}")
    upstream_port = upstream.port or (443 if upstream.scheme == "https" else 80)

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
        "load_assignment": _endpoints(SIDECAR_CLUSTER, settings.sidecar_host, settings.sidecar_port),
    }
    listeners = [{
        "name": "gateway",
        "address": _socket(settings.listen_host, settings.listen_port),
        "per_connection_buffer_limit_bytes": settings.max_body_bytes,
        "filter_chains": [_http_filter_chain(connection_manager)],
    }]
    if settings.ready_port is not None:
        listeners.append(_ready_listener(settings.listen_host, settings.ready_port))
    return {
        "admin": {"address": _socket(settings.admin_host, settings.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": [sidecar_cluster, upstream_cluster]},
    }


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
    return {"name": "ready", "address": _socket(host, port), "filter_chains": [_http_filter_chain(connection_manager)]}


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
