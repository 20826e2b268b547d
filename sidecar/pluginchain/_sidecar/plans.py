"""The sidecar's current plan, swapped atomically, and the chain-file watcher that feeds it.

A request takes the plan that is current when its stream starts and keeps it to the end, even
if a reload swaps in another meanwhile. A retired plan is closed (its plugins' connections
released) only once the last request using it has finished. A config that does not validate
never replaces the plan that serves, and a chain file is served only as it was read once,
completely, and only once it has settled (see :class:`ChainFileWatcher`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pluginchain._config.defaults import DEFAULTS
from pluginchain._config.files import load_bytes
from pluginchain._config.issues import ConfigError, ConfigIssue
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

    def take(self, plan: Plan | None = None) -> Plan:
        """The current plan (or ``plan``, which a request already uses), kept alive (not closed)
        until as many :meth:`give_back` calls. A pair of calls, not a context manager: this runs
        for every request, and a generator-based context manager costs several times more."""
        plan = plan or self._plan
        key = id(plan)
        self._users[key] = self._users.get(key, 0) + 1
        return plan

    def give_back(self, plan: Plan) -> None:
        """The end of one :meth:`take`: a retired plan nobody uses any more is closed."""
        key = id(plan)
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


@dataclass(frozen=True, slots=True)
class ChainFileReading:
    """One complete read of the chain file: its bytes, their SHA-256, and the file's identity
    (device, inode, size, mtime in ns) taken on the same open file right after the read."""

    data: bytes
    digest: bytes
    identity: tuple[int, int, int, int]

    @classmethod
    def of(cls, path: Path) -> ChainFileReading:
        """Read ``path``; raise OSError if it cannot be read."""
        with open(path, "rb") as file:
            data = file.read()
            status = os.fstat(file.fileno())
        identity = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        return cls(data, hashlib.sha256(data).digest(), identity)


def load_chain_file(path: Path, registry: PluginRegistry) -> tuple[ChainFileReading, dict[str, ValidatedChain]]:
    """Read the chain file once and validate those bytes: what the sidecar starts with, and the
    reading its watcher compares later ones with. Raise :class:`ConfigError`."""
    try:
        reading = ChainFileReading.of(path)
    except OSError as error:
        raise ConfigError([ConfigIssue((), f"cannot read file: {error}")], str(path)) from None
    return reading, load_bytes(reading.data, str(path), registry)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A content the watcher saw that differs from what serves, waiting to settle."""

    digest: bytes
    identity: tuple[int, int, int, int]
    first_read_at: float


class ChainFileWatcher:
    """Reloads the chain file when its content changes and has settled, or on demand (SIGHUP).

    It polls the file's content hash rather than using inotify: Kubernetes updates a mounted
    ConfigMap by swapping a symlink, which file-change events report unreliably, and a chain file
    is small enough to hash every interval.

    What is served is read once, completely: the bytes hashed are the bytes validated and
    compiled. A content is served only once it has **settled**: two reads at least ``settle``
    seconds apart (by ``clock``) returned the same bytes, and the file's device, inode, size and
    mtime were the same at both. So no write happened in the ``settle`` seconds before it is
    served, and a file rewritten in place (truncated, then written in parts) is never served
    half-written, even when a part is a valid chain on its own: each part changes the bytes or
    the mtime and starts the wait again. Comparing the mtime with itself rather than with this
    process's clock keeps the rule right on file systems whose clock differs (NFS, a future
    mtime). ``settle`` 0 serves a change at the first read.

    A settled content that does not validate is logged and counted once and never replaces the
    serving plan. SIGHUP (``reload(force=True)``) rebuilds the plan even when the content is the
    same, and obeys the same rule: an unsettled file is served by a later check once it settled.
    """

    def __init__(
        self,
        path: str | Path,
        registry: PluginRegistry,
        holder: PlanHolder,
        served: ChainFileReading,
        *,
        interval: float = DEFAULTS.reload_interval_seconds,
        settle: float = DEFAULTS.reload_settle_seconds,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``served``: the reading the serving plan was compiled from. ``clock``: monotonic
        seconds, for tests to step instead of sleeping."""
        self.path = Path(path)
        self.registry = registry
        self.holder = holder
        self.interval = interval
        self.settle = settle
        self._clock = clock
        self._served = served.digest
        self._rejected: bytes | None = None
        self._candidate: _Candidate | None = None
        self._rebuild = False
        self._lock = asyncio.Lock()

    @property
    def waiting(self) -> bool:
        """Whether a changed content waits to settle."""
        return self._candidate is not None

    async def reload(self, *, force: bool = False) -> bool:
        """Read the file and serve it if it changed (or ``force``) and has settled; return whether
        a new plan now serves."""
        async with self._lock:
            try:
                reading = ChainFileReading.of(self.path)
            except OSError as error:
                RELOADS.labels("invalid").inc()
                logger.error("chain file %s cannot be read (%s); keeping the serving plan", self.path, error.strerror or error)
                return False
            self._rebuild = self._rebuild or force
            known = reading.digest == self._served or reading.digest == self._rejected
            if known and not self._rebuild:
                self._candidate = None
                return False
            if not self._settled(reading):
                return False
            self._candidate = None
            self._rebuild = False
            try:
                plan = serving_plan(load_bytes(reading.data, str(self.path), self.registry), self.registry)
            except ConfigError as error:
                self._rejected = reading.digest
                RELOADS.labels("invalid").inc()
                logger.error("chain file change rejected; keeping plan version %d\n%s", self.holder.version, error.render())
                return False
            self._served, self._rejected = reading.digest, None
            self.holder.replace(plan)
            RELOADS.labels("applied").inc()
            logger.info("chain file reloaded: plan version %d, chains %s", self.holder.version, ", ".join(plan.chains))
            return True

    def _settled(self, reading: ChainFileReading) -> bool:
        if self.settle <= 0:
            return True
        now = self._clock()
        candidate = self._candidate
        if candidate is None or (candidate.digest, candidate.identity) != (reading.digest, reading.identity):
            if candidate is None:
                logger.info("chain file %s changed; serving it once it stays the same for %gs", self.path, self.settle)
            self._candidate = _Candidate(reading.digest, reading.identity, now)
            return False
        return now - candidate.first_read_at >= self.settle

    def next_check_in(self) -> float:
        """Seconds until the next check: ``interval``, or sooner when a change settles sooner."""
        candidate = self._candidate
        if candidate is None:
            return self.interval
        return max(0.0, min(self.interval, candidate.first_read_at + self.settle - self._clock()))

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.next_check_in())
            try:
                await self.reload()
            except Exception:
                logger.exception("chain file reload failed; keeping the serving plan")
