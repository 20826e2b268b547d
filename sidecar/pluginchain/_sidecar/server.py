"""The sidecar process: ext_proc and health over grpc.aio, Prometheus metrics, and a graceful drain
on SIGTERM. Its plan comes from a chain file it watches (file mode) or from the operator's pushes
to ConfigService on a port of its own (push mode, ``config_port``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import start_http_server

from pluginchain._config.defaults import DEFAULTS
from pluginchain._config.files import load_file
from pluginchain._config.registry import default_registry
from pluginchain._engine.plan import Plan
from pluginchain._sidecar.config_service import SERVICE_NAME as CONFIG_SERVICE
from pluginchain._sidecar.config_service import (
    ActiveConfig,
    ConfigGuard,
    ConfigService,
    StateFile,
    StateFileError,
    TokenFile,
)
from pluginchain._sidecar.extproc import ExternalProcessor, Limits
from pluginchain._sidecar.plans import ChainFileWatcher, PlanHolder, load_chain_file, serving_plan
from pluginchain.v1 import config_pb2_grpc

logger = logging.getLogger("pluginchain.server")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

class PortUnavailable(RuntimeError):
    """A server of the sidecar cannot listen where it was told to: the command exits non-zero with
    this one line, rather than a traceback or (with SO_REUSEPORT) sharing the port with another
    process that serves another config."""


def _bind_grpc(server: grpc.aio.Server, host: str, port: int, what: str, credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"{host}:{port}"
    if port:
        # Probed first: gRPC would also log a multi-line error of its own for a taken port.
        check_port_free(host, port, f"cannot listen on {address} ({what})")
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        raise PortUnavailable(f"cannot listen on {address} ({what}): the port is taken or the address is not this host's") from None


def check_port_free(host: str, port: int, failure: str) -> None:
    """Raise :class:`PortUnavailable` (``failure``: the reason) unless ``host:port`` can be bound."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise PortUnavailable(f"{failure}: {error.strerror}") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as error:
                raise PortUnavailable(f"{failure}: {error.strerror or error}") from None


@dataclass(frozen=True)
class SidecarSettings:
    """How ``pluginchain serve`` runs. Invalid combinations raise ValueError naming the flags."""

    config: Path | None = None
    """The chain file. File mode: required, watched, and reloaded on change or SIGHUP. Push mode:
    optional, never watched; the starting plan when the state file holds none."""
    plugin_modules: tuple[str, ...] = ()
    """Modules to import custom plugins from, besides the entry points."""
    host: str = DEFAULTS.ext_proc_host
    """Address for ext_proc; Envoy runs in the same pod, so loopback is the safe default."""
    port: int = DEFAULTS.ext_proc_port
    """ext_proc gRPC port; 0 picks a free one."""
    metrics_host: str = DEFAULTS.metrics_host
    metrics_port: int | None = DEFAULTS.metrics_port
    """Prometheus /metrics port; None disables it, 0 picks a free one."""
    limits: Limits = field(default_factory=Limits)
    max_streams: int = DEFAULTS.max_streams
    """Concurrent ext_proc streams served; one more is refused with RESOURCE_EXHAUSTED."""
    grace: float = DEFAULTS.grace_seconds
    """Seconds in-flight streams get to finish after SIGTERM."""
    reload_interval: float = DEFAULTS.reload_interval_seconds
    """Seconds between checks of the chain file."""
    reload_settle: float = DEFAULTS.reload_settle_seconds
    """Seconds a changed chain file must stay the same before it is served (see
    ``ChainFileWatcher``); 0 serves a change at the first check that sees it."""
    config_host: str = DEFAULTS.config_host
    """Address for ConfigService; the operator reaches it from outside the pod."""
    config_port: int | None = None
    """ConfigService gRPC port (the contract's default is 50052); None: file mode, no
    ConfigService; 0 picks a free one. Setting it turns on push mode."""
    token_file: Path | None = None
    """File holding the bearer token every push must carry (a mounted Secret); re-read when it
    changes. Required in push mode: the control plane never runs unauthenticated."""
    tls_cert: Path | None = None
    """PEM certificate chain ConfigService presents; with ``tls_key``, turns on TLS."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, ConfigService requires a client certificate it signed (mTLS)."""
    state_file: Path | None = None
    """Where push mode keeps the last applied chain set, to resume it after a restart. None:
    a restarted sidecar waits for the operator with the ``config`` plan or none."""

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"--max-streams must be at least 1, got {self.max_streams}")
        if self.config_port is None:
            pushed_only = {
                "--token-file": self.token_file, "--tls-cert": self.tls_cert, "--tls-key": self.tls_key,
                "--tls-client-ca": self.tls_client_ca, "--state-file": self.state_file,
            }
            given = [flag for flag, value in pushed_only.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with --config-port (push mode)")
            if self.config is None:
                raise ValueError("--config is required unless --config-port is given (push mode)")
            return
        if self.token_file is None:
            raise ValueError("--config-port needs --token-file: ConfigService never accepts unauthenticated pushes")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if self.state_file is not None and not self.state_file.parent.is_dir():
            raise ValueError(f"--state-file {self.state_file}: directory {self.state_file.parent} does not exist")

    @property
    def push_mode(self) -> bool:
        return self.config_port is not None


class Sidecar:
    """A running sidecar; ``start`` it, then ``drain`` it."""

    def __init__(self, settings: SidecarSettings, *, clock: Callable[[], float] = time.monotonic):
        """``clock``: monotonic seconds, which space the log lines of refused streams."""
        self.settings = settings
        self._clock = clock
        self.registry = default_registry(settings.plugin_modules)
        self.watcher: ChainFileWatcher | None = None
        self.config_service: ConfigService | None = None
        self._server_credentials = _server_credentials(settings) if settings.push_mode else None
        if settings.push_mode:
            state_file = StateFile(settings.state_file) if settings.state_file is not None else None
            plan, active = self._starting_plan(state_file)
            self.plans = PlanHolder(plan, version=active.version)
            self.config_service = ConfigService(self.plans, self.registry, active, state_file, self._mark_ready)
            assert settings.token_file is not None  # SidecarSettings refuses push mode without one
            self._token = TokenFile(settings.token_file)
        else:
            assert settings.config is not None
            # A bad file at start-up is fatal: there is no good plan to keep serving. At start-up
            # the file is taken as it is: whoever starts the sidecar has written it.
            reading, chains = load_chain_file(settings.config, self.registry)
            self.plans = PlanHolder(serving_plan(chains, self.registry))
            self.watcher = ChainFileWatcher(
                settings.config, self.registry, self.plans, reading,
                interval=settings.reload_interval, settle=settings.reload_settle,
            )
        self.health = HealthServicer()
        self.config_health = HealthServicer()
        self.port = 0
        self.config_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._processor: ExternalProcessor | None = None
        self._config_server: grpc.aio.Server | None = None
        self._metrics_server: WSGIServer | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[bool]] = set()
        self._drained = False

    def _starting_plan(self, state_file: StateFile | None) -> tuple[Plan, ActiveConfig]:
        """Push mode's first plan: the state file's, else the chain file's, else none (every
        request gets 500 until the operator pushes: fail closed, never an unfiltered gateway)."""
        settings = self.settings
        fallback = f"the chain file {settings.config}" if settings.config else "no chains until the operator pushes"
        if state_file is not None:
            try:
                restored = state_file.restore(self.registry)
            except StateFileError as error:
                # Not fatal: refusing to start would crash-loop the pod, while starting lets the
                # operator push again. The file stays for inspection until a push replaces it.
                logger.error("%s; ignoring it and starting with %s", error, fallback)
            else:
                if restored is not None:
                    logger.info("resuming version %d from state file %s", restored.chain_set.version, state_file.path)
                    return restored.plan, restored.active()
                logger.info("no state file at %s yet; starting with %s", state_file.path, fallback)
        if settings.config is not None:
            # A bad chain file is fatal here as in file mode: there is no good plan to serve.
            chains = load_file(settings.config, self.registry)
            return serving_plan(chains, self.registry), ActiveConfig.from_file(chains, settings.config)
        logger.warning("serving no chains: every request gets 500 until the operator pushes a chain set")
        return Plan({}), ActiveConfig.empty()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stop_servers(0)
            raise

    async def _start(self) -> None:
        limits = self.settings.limits
        options = [
            ("grpc.max_receive_message_length", limits.grpc_message_bytes),
            ("grpc.max_send_message_length", limits.grpc_message_bytes),
            # No SO_REUSEPORT (gRPC's default): a second sidecar on the port must fail to start
            # rather than take a share of Envoy's streams while serving another plan.
            ("grpc.so_reuseport", 0),
            # No grpc.max_concurrent_streams: it caps streams per HTTP/2 connection, and Envoy
            # carries them all on one or a few, so the streams beyond it would wait unseen in
            # Envoy instead of being refused. The cap is ExternalProcessor's ``max_streams``,
            # which refuses at once and leaves the health service out of the count.
        ]
        server = grpc.aio.server(options=options)
        self._server = server
        self._processor = ExternalProcessor(self.plans, limits, self.settings.max_streams, self._clock)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(self._processor, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = _bind_grpc(server, self.settings.host, self.settings.port, "ext_proc, --sidecar-port")
        await server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        configured = self.config_service is None or self.config_service.active.origin != "empty"
        if not configured:
            # Before ConfigService opens: a first push, whenever it lands, marks ready after this.
            for health in (self.health, self.config_health):
                await health.set(EXT_PROC_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config_service is not None:
            await self._start_config_server()
        if configured:
            await self._mark_ready()
        if self.settings.metrics_port is not None:
            try:
                self._metrics_server, _ = start_http_server(self.settings.metrics_port, self.settings.metrics_host)
            except OSError as error:
                address = f"{self.settings.metrics_host}:{self.settings.metrics_port}"
                raise PortUnavailable(f"cannot serve metrics on {address} (--metrics-port): {error.strerror or error}") from None
            self.metrics_port = self._metrics_server.server_port
        if self.watcher is not None:
            self._watch_task = asyncio.get_running_loop().create_task(self.watcher.run())
        logger.info(
            "sidecar serving ext_proc on %s:%d, %s, metrics on %s, chains: %s",
            self.settings.host, self.port, self._plan_source(), self.metrics_port or "off",
            ", ".join(self.plans.plan.chains) or "none",
        )

    async def _start_config_server(self) -> None:
        assert self.config_service is not None and self.settings.config_port is not None
        server = grpc.aio.server(interceptors=[ConfigGuard(self._token)], options=[("grpc.so_reuseport", 0)])
        self._config_server = server
        config_pb2_grpc.add_ConfigServiceServicer_to_server(self.config_service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.config_health, server)
        self.config_port = _bind_grpc(
            server, self.settings.config_host, self.settings.config_port, "ConfigService, --config-port", self._server_credentials,
        )
        await server.start()
        for service in ("", CONFIG_SERVICE):
            await self.config_health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def _mark_ready(self) -> None:
        """ext_proc's health service turns SERVING once there is a configuration to serve: at
        once in file mode, in push mode from the state file, the chain file or the first push.
        Until then a readiness probe keeps the pod out of the Service (as Istio's proxies wait
        for their first xDS push), while the empty health service "" stays SERVING for liveness.
        The config port reports it too, for probes that cannot reach ext_proc on loopback."""
        for health in (self.health, self.config_health):
            await health.set(EXT_PROC_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def _plan_source(self) -> str:
        if self.config_service is None:
            return f"watching {self.settings.config}"
        security = "plaintext"
        if self.settings.tls_client_ca is not None:
            security = "mTLS"
        elif self.settings.tls_cert is not None:
            security = "TLS"
        active = self.config_service.active
        return (
            f"ConfigService on {self.settings.config_host}:{self.config_port} ({security}, bearer token), "
            f"version {active.version} from {active.origin}"
        )

    async def reload(self) -> bool:
        """Re-read the chain file now and rebuild the plan even if it is unchanged (SIGHUP). A
        file that has not settled is served by the watcher's next checks once it has; push mode
        has no file to re-read."""
        if self.watcher is None:
            logger.info("reload ignored: in push mode the plan comes from ConfigService only")
            return False
        return await self.watcher.reload(force=True)

    def request_reload(self) -> None:
        """Reload from a signal handler: run it as a task and keep a reference until it ends."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Report NOT_SERVING, let in-flight streams finish (up to ``grace``), then stop."""
        if self._drained:
            return
        self._drained = True
        await self.health.enter_graceful_shutdown()
        await self.config_health.enter_graceful_shutdown()
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        await self._stop_servers(self.settings.grace)
        if self._processor is not None:
            await self._processor.aclose()  # finish hooks of the last requests (e.g. charging tokens)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.plans.aclose()
        logger.info("sidecar stopped")

    async def _stop_servers(self, grace: float) -> None:
        # Together: a push in progress finishes (it is quick) while ext_proc streams drain.
        servers = [s for s in (self._config_server, self._server) if s is not None]
        await asyncio.gather(*(server.stop(grace) for server in servers))


def _server_credentials(settings: SidecarSettings) -> grpc.ServerCredentials | None:
    """ConfigService's TLS credentials. The files are read at start-up, so a wrong path fails
    before serving, and again before each TLS handshake, so a rotated certificate (cert-manager
    renewing a mounted Secret) is served without a restart."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = _TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(files.read()),
        # gRPC keeps the configuration it has when the fetcher returns None; the stubs forget that.
        files.fetch_if_changed,  # type: ignore[arg-type]
        require_client_authentication=settings.tls_client_ca is not None,
    )


class _TlsFiles:
    """The certificate, key and client CA files, and the contents last handed to gRPC."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None):
        self._paths = {"--tls-cert": cert, "--tls-key": key, "--tls-client-ca": client_ca}
        self._serving: dict[str, bytes | None] = {}

    def read(self) -> dict[str, bytes | None]:
        contents = {}
        for flag, path in self._paths.items():
            try:
                contents[flag] = path.read_bytes() if path is not None else None
            except OSError as error:
                raise ValueError(f"{flag} {path}: {error.strerror or error}") from None
        return contents

    def configuration(self, contents: dict[str, bytes | None]) -> grpc.ServerCertificateConfiguration:
        self._serving = contents
        key, cert = contents["--tls-key"], contents["--tls-cert"]
        assert key is not None and cert is not None  # both paths are required; read() read them
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=contents["--tls-client-ca"])

    def fetch_if_changed(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, called before each handshake: a new configuration when the files
        changed, None to keep the one it has (also when a file cannot be read mid-rotation)."""
        try:
            contents = self.read()
        except ValueError as error:
            logger.error("ConfigService TLS: %s; keeping the certificate in use", error)
            return None
        if contents == self._serving:
            return None
        logger.info("ConfigService TLS: certificate files changed; serving them from this handshake on")
        return self.configuration(contents)


@contextlib.contextmanager
def signal_handlers(sidecar: Sidecar) -> Iterator[asyncio.Event]:
    """SIGTERM and SIGINT set the yielded event; SIGHUP reloads the chain file."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, sidecar.request_reload)
    try:
        yield stop
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def tune_garbage_collection_for_serving() -> None:
    """Call once a serving process has started up. What start-up built (modules, the plan) is
    collected once and frozen out of the collector's sight, so that no later full collection
    walks it again.

    The generation-0 threshold is left at CPython's default on purpose. grpc.aio leaves a small
    reference cycle behind every RPC (the closure of its method-handler lookup: about 6 objects),
    so the cyclic collector has the same amount of garbage to free per request whatever the
    threshold; the threshold only decides how much of it is freed in one pause. Measured under
    the body chain at 1,162 requests/s (bench/open_loop.py, 50 % load): a threshold of 10,000
    spent the same collector time as the default 700 (about 75 ms per 10 s either way) but in
    4.4 ms pauses every 0.6 s instead of 0.27 ms ones, and those pauses added about 6 ms to the
    p99 (bench/README.md, "Where the tail goes")."""
    gc.collect()
    gc.freeze()


async def run_until_signalled(sidecar: Sidecar) -> None:
    """Serve until SIGTERM or SIGINT, then drain. For a process that does nothing else."""
    with signal_handlers(sidecar) as stop:
        await sidecar.start()
        tune_garbage_collection_for_serving()
        try:
            await stop.wait()
            logger.info("signal received: draining")
        finally:
            await sidecar.drain()
