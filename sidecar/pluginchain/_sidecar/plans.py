"""The sidecar's current plan, swapped atomically, and the chain-file watcher that feeds it.

A request takes the plan that is current when its stream starts and keeps it to the end, even
if a reload swaps in another meanwhile. A retired plan is closed (its plugins' connections
released) only once the last request using it has finished. A config that does not validate
never replaces the plan that serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from pluginchain._config.files import load_file
from pluginchain._config.issues import ConfigError
from pluginchain._config.models import ValidatedChain
from pluginchain._config.registry import PluginRegistry
from pluginchain._engine.plan import Plan, compile_plan
from pluginchain._metrics import PLAN_VERSION, RELOADS, EngineMetrics

logger = logging.getLogger("pluginchain.reload")



def serving_plan(chains: Mapping[str, ValidatedChain], registry: PluginRegistry) -> Plan:
    """Compile ``chains`` for this sidecar to serve: with its metrics bound (see ``compile_plan``)."""
    return compile_plan(chains, registry, EngineMetrics())


class PlanHolder:
    """Owns the serving plan; hands it to requests and retires old ones safely."""

    def __init__(self, plan: Plan, version: int = 1):
        self._plan = plan
        self.version = version
        self._users: dict[int, int] = {id(plan): 0}
        self._retired: dict[int, Plan] = {}
        self._closing: set[asyncio.Task] = set()
        PLAN_VERSION.set(version)

    @property
    def plan(self) -> Plan:
        return self._plan

    @contextlib.contextmanager
    def use(self, plan: Plan | None = None) -> Iterator[Plan]:
        """The current plan (or ``plan``, which a request already uses), kept alive (not
        closed) until the block exits."""
        plan = plan or self._plan
        key = id(plan)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield plan
        finally:
            self._users[key] -= 1
            if self._users[key] == 0 and key in self._retired:
                self._close(key)

    def replace(self, plan: Plan, version: int | None = None) -> None:
        """Serve ``plan`` from the next request on; close the old one when it is unused."""
        old = self._plan
        self._plan = plan
        self.version = version if version is not None else self.version + 1
        self._users.setdefault(id(plan), 0)
        PLAN_VERSION.set(self.version)
        self._retired[id(old)] = old
        if self._users.get(id(old), 0) == 0:
            self._close(id(old))

    def _close(self, key: int) -> None:
        plan = self._retired.pop(key)
        self._users.pop(key, None)
        task = asyncio.get_running_loop().create_task(plan.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close the serving plan and wait for retired ones to finish closing."""
        await self._plan.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class ChainFileWatcher:
    """Reloads the chain file when its content changes, or on demand (SIGHUP).

    It polls the file's content hash rather than using inotify: Kubernetes updates a mounted
    ConfigMap by swapping a symlink, which file-change events report unreliably, and a chain file
    is small enough to hash every interval.
    """

    def __init__(self, path: str | Path, registry: PluginRegistry, holder: PlanHolder, interval: float = 1.0):
        self.path = Path(path)
        self.registry = registry
        self.holder = holder
        self.interval = interval
        self._digest = self._read_digest()
        self._lock = asyncio.Lock()

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    async def reload(self, *, force: bool = False) -> bool:
        """Load the file if it changed (or ``force``); return whether a new plan now serves."""
        async with self._lock:
            digest = self._read_digest()
            if digest is None:
                RELOADS.labels("invalid").inc()
                logger.error("chain file %s cannot be read; keeping the serving plan", self.path)
                return False
            if digest == self._digest and not force:
                return False
            self._digest = digest
            try:
                plan = serving_plan(load_file(self.path, self.registry), self.registry)
            except ConfigError as error:
                RELOADS.labels("invalid").inc()
                logger.error("chain file change rejected; keeping plan version %d\n%s", self.holder.version, error.render())
                return False
            self.holder.replace(plan)
            RELOADS.labels("applied").inc()
            logger.info("chain file reloaded: plan version %d, chains %s", self.holder.version, ", ".join(plan.chains))
            return True

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reload()
            except Exception:
                logger.exception("chain file reload failed; keeping the serving plan")
