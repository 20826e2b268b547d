"""The sidecar process: ext_proc and health over grpc.aio, Prometheus metrics, chain-file reloads,
and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import start_http_server

from pluginchain.engine import compile_plan
from pluginchain.extproc import ExternalProcessor, Limits
from pluginchain.plans import ChainFileWatcher, PlanHolder
from pluginchain.registry import default_registry
from pluginchain.schema import load_file

logger = logging.getLogger("pluginchain.server")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


@dataclass(frozen=True)
class SidecarSettings:
    """How ``pluginchain serve`` runs."""

    config: Path
    """The chain file; watched, and reloaded on change or SIGHUP."""
    plugin_modules: tuple[str, ...] = ()
    """Modules to import custom plugins from, besides the entry points."""
    host: str = "127.0.0.1"
    """Address for ext_proc; Envoy runs in the same pod, so loopback is the safe default."""
    port: int = 50051
    """ext_proc gRPC port; 0 picks a free one."""
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9090
    """Prometheus /metrics port; None disables it, 0 picks a free one."""
    limits: Limits = field(default_factory=Limits)
    grace: float = 10.0
    """Seconds in-flight streams get to finish after SIGTERM."""
    reload_interval: float = 1.0
    """Seconds between checks of the chain file."""


class Sidecar:
    """A running sidecar; ``start`` it, then ``drain`` it."""

    def __init__(self, settings: SidecarSettings):
        self.settings = settings
        self.registry = default_registry(settings.plugin_modules)
        # A bad file at start-up is fatal: there is no good plan to keep serving.
        self.plans = PlanHolder(compile_plan(load_file(settings.config, self.registry), self.registry))
        self.watcher = ChainFileWatcher(settings.config, self.registry, self.plans, settings.reload_interval)
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server = None
        self._watch_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._drained = False

    async def start(self) -> None:
        limits = self.settings.limits
        options = [
            ("grpc.max_receive_message_length", limits.grpc_message_bytes),
            ("grpc.max_send_message_length", limits.grpc_message_bytes),
        ]
        server = grpc.aio.server(options=options)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(self.plans, limits), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        await server.start()
        self._server = server
        for service in ("", EXT_PROC_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.metrics_port is not None:
            self._metrics_server, _ = start_http_server(self.settings.metrics_port, self.settings.metrics_host)
            self.metrics_port = self._metrics_server.server_port
        self._watch_task = asyncio.get_running_loop().create_task(self.watcher.run())
        logger.info(
            "sidecar serving ext_proc on %s:%d, metrics on %s, chains: %s",
            self.settings.host, self.port, self.metrics_port or "off", ", ".join(self.plans.plan.chains),
        )

    async def reload(self) -> bool:
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
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(self.settings.grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.plans.aclose()
        logger.info("sidecar stopped")


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


async def run_until_signalled(sidecar: Sidecar) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    with signal_handlers(sidecar) as stop:
        await sidecar.start()
        try:
            await stop.wait()
            logger.info("signal received: draining")
        finally:
            await sidecar.drain()
