"""What the operator knows and does, independent of how kopf calls it.

It keeps the valid chains (each PluginChain's last good compiled chain), the gateway pods, and
what each sidecar last applied. A sidecar always receives every chain that selects it in one
Apply; pushes to one sidecar are serialised so versions arrive in order; a status is written
only when it changes.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from pluginchain._config.defaults import DEFAULTS
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.wire import chain_to_wire
from pluginchain.v1 import config_pb2
from pluginchain_operator.kube import KubeClient
from pluginchain_operator.pushing import PushCredentials, PushError, active_version, apply
from pluginchain_operator.resources import (
    CONFIG_PORT_ANNOTATION,
    DEFAULT_CONFIG_PORT,
    LabelSelector,
    check_spec,
)

logger = logging.getLogger("pluginchain.operator")

Key = tuple[str, str]  # (namespace, name)


@dataclass
class PodTarget:
    """A gateway pod as the operator sees it."""

    namespace: str
    name: str
    labels: dict[str, str]
    ip: str | None
    port: int
    running: bool
    restarts: int

    @property
    def reachable(self) -> bool:
        return self.running and bool(self.ip)

    @property
    def target(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class ChainRecord:
    """One PluginChain: its selector, its last good chain, and the errors of its current spec."""

    namespace: str
    name: str
    created: str
    chain: str = "default"
    selector: LabelSelector | None = None
    message: config_pb2.Chain | None = None
    """The last spec that validated, compiled to the wire form; None until one did."""
    digest: str = ""
    plugin_count: int = 0
    generation: int | None = None
    errors: list[str] = field(default_factory=list)
    selected: set[Key] = field(default_factory=set)
    """Pods selected at the last sync, so a pod the selector no longer matches loses the chain."""

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def source(self) -> str:
        return f"PluginChain {self.namespace}/{self.name}"


@dataclass
class SidecarState:
    """What one sidecar last acknowledged, and how its last push went."""

    applied: dict[str, str] = field(default_factory=dict)
    """Chain name -> digest of the chain message it runs."""
    version: int = 0
    error: str | None = None
    conflicts: dict[Key, str] = field(default_factory=dict)
    """PluginChains that lost a chain-name conflict on this pod, with the reason."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Controller:
    def __init__(
        self,
        registry: PluginRegistry,
        credentials: PushCredentials,
        push_timeout: float = DEFAULTS.push_timeout_seconds,
        push_attempts: int = 2,
    ):
        self.registry = registry
        self.credentials = credentials
        self.push_timeout = push_timeout
        self.push_attempts = push_attempts
        self.pods: dict[Key, PodTarget] = {}
        self.chains: dict[Key, ChainRecord] = {}
        self.sidecars: dict[Key, SidecarState] = {}
        self.kube: KubeClient | None = None
        self._written: dict[Key, dict[str, Any]] = {}
        self._last_version = 0

    # --- PluginChains -------------------------------------------------------------------------

    def update_chain(self, namespace: str, name: str, body: Mapping[str, Any]) -> ChainRecord:
        """Validate a PluginChain's spec; keep its last good chain when the new one is invalid."""
        meta = body.get("metadata", {})
        record = self.chains.get((namespace, name)) or ChainRecord(namespace, name, meta.get("creationTimestamp", ""))
        record.generation = meta.get("generation")
        spec = body.get("spec") or {}
        issues, checked = check_spec(spec, self.registry)
        record.errors = [str(issue) for issue in issues]
        if checked is not None:
            validated = checked.chain
            record.chain = checked.spec.chain
            record.selector = checked.spec.selector
            record.message = chain_to_wire(validated, record.source)
            record.digest = hashlib.sha256(record.message.SerializeToString(deterministic=True)).hexdigest()
            record.plugin_count = sum(1 for p in validated.plugins if p.entry.enabled)
        self.chains[record.key] = record
        return record

    def forget_chain(self, namespace: str, name: str) -> ChainRecord | None:
        self._written.pop((namespace, name), None)
        return self.chains.pop((namespace, name), None)

    def selected_pods(self, record: ChainRecord) -> list[Key]:
        if record.selector is None:
            return []
        return sorted(
            key for key, pod in self.pods.items()
            if pod.namespace == record.namespace and record.selector.matches(pod.labels)
        )

    # --- Pods ---------------------------------------------------------------------------------

    def update_pod(self, body: Mapping[str, Any]) -> tuple[PodTarget, bool]:
        """Record a pod; return it and whether its sidecar needs a (re)push."""
        meta = body.get("metadata", {})
        status = body.get("status") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        annotations = meta.get("annotations") or {}
        try:
            port = int(annotations.get(CONFIG_PORT_ANNOTATION, DEFAULT_CONFIG_PORT))
        except ValueError:
            logger.warning("pod %s/%s: annotation %s is not a port number; using %d", *key, CONFIG_PORT_ANNOTATION, DEFAULT_CONFIG_PORT)
            port = DEFAULT_CONFIG_PORT
        pod = PodTarget(
            namespace=key[0],
            name=key[1],
            labels=dict(meta.get("labels") or {}),
            ip=status.get("podIP"),
            port=port,
            running=status.get("phase") == "Running" and not meta.get("deletionTimestamp"),
            restarts=sum(c.get("restartCount", 0) for c in status.get("containerStatuses") or []),
        )
        before = self.pods.get(key)
        self.pods[key] = pod
        changed = before is None or (before.reachable, before.ip, before.port, before.labels, before.restarts) != (
            pod.reachable, pod.ip, pod.port, pod.labels, pod.restarts)
        if changed and before is not None and (before.ip, before.restarts) != (pod.ip, pod.restarts):
            # A new address or a restarted container: what it applied before is not known to hold.
            self.sidecars.pop(key, None)
        return pod, changed and pod.reachable

    def forget_pod(self, namespace: str, name: str) -> None:
        self.pods.pop((namespace, name), None)
        self.sidecars.pop((namespace, name), None)

    def chains_selecting(self, pod_key: Key) -> list[ChainRecord]:
        pod = self.pods.get(pod_key)
        return [
            record for record in self.chains.values()
            if (pod is not None and record.namespace == pod.namespace and record.selector is not None
                and record.selector.matches(pod.labels)) or pod_key in record.selected
        ]

    # --- Pushing ------------------------------------------------------------------------------

    def desired(self, pod_key: Key) -> tuple[list[ChainRecord], dict[Key, str]]:
        """The chains this pod's sidecar must run, and the PluginChains that lost a name conflict."""
        pod = self.pods.get(pod_key)
        if pod is None:
            return [], {}
        candidates = sorted(
            (r for r in self.chains.values()
             if r.message is not None and r.namespace == pod.namespace and r.selector is not None and r.selector.matches(pod.labels)),
            key=lambda r: (r.created, r.name),
        )
        winners: dict[str, ChainRecord] = {}
        conflicts: dict[Key, str] = {}
        for record in candidates:
            holder = winners.get(record.chain)
            if holder is None:
                winners[record.chain] = record
            else:
                conflicts[record.key] = f"chain {record.chain!r} on this pod comes from the older {holder.source}"
        return sorted(winners.values(), key=lambda r: r.chain), conflicts

    def _next_version(self) -> int:
        # Microseconds since the epoch, strictly increasing: a restarted operator still pushes
        # newer versions than the ones sidecars kept in their state files.
        self._last_version = max(self._last_version + 1, time.time_ns() // 1000)
        return self._last_version

    async def sync_pod(self, pod_key: Key, *, force: bool = False, version: int | None = None) -> SidecarState:
        """Push the pod's full chain set unless it already runs it; record the outcome.

        Pods synced together get one ``version``, so a PluginChain's status shows one version
        when all its sidecars run it.
        """
        state = self.sidecars.setdefault(pod_key, SidecarState())
        async with state.lock:
            pod = self.pods.get(pod_key)
            winners, conflicts = self.desired(pod_key)
            state.conflicts = conflicts
            wanted = {r.chain: r.digest for r in winners}
            if pod is None or not pod.reachable:
                state.error = "pod is not running or has no IP yet"
                return state
            if not force and state.error is None and state.applied == wanted and state.version:
                return state
            # Under the pod's lock: never older than what this sidecar already acknowledged.
            version = max(version or self._next_version(), state.version + 1)
            chain_set = config_pb2.ChainSet(version=version, chains=[r.message for r in winners if r.message is not None])
            last_error = None
            for attempt in range(self.push_attempts):
                try:
                    reply = await apply(pod.target, chain_set, self.credentials, self.push_timeout)
                except PushError as error:
                    last_error = str(error)
                    if attempt + 1 < self.push_attempts:
                        await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                state.applied, state.version, state.error = wanted, reply.active_version, None
                logger.info("pushed %d chain(s) to %s/%s as version %d", len(winners), *pod_key, reply.active_version)
                return state
            state.error = last_error
            logger.warning("push to %s/%s failed: %s", *pod_key, last_error)
            return state

    async def sync_pods(self, pod_keys: Iterable[Key], *, force: bool = False) -> None:
        keys = sorted(set(pod_keys))
        version = self._next_version()
        await asyncio.gather(*(self.sync_pod(key, force=force, version=version) for key in keys))

    async def verify_pod(self, pod_key: Key) -> None:
        """Re-push when the sidecar runs something else than it acknowledged (e.g. it restarted empty)."""
        pod = self.pods.get(pod_key)
        state = self.sidecars.get(pod_key)
        if pod is None or not pod.reachable:
            return
        if state is None or state.error is not None:
            await self.sync_pod(pod_key)
            return
        try:
            version = await active_version(pod.target, self.credentials, self.push_timeout)
        except PushError as error:
            state.error = str(error)
            return
        if version != state.version:
            logger.info("sidecar %s/%s runs version %d, expected %d: re-pushing", *pod_key, version, state.version)
            await self.sync_pod(pod_key, force=True)

    # --- Status -------------------------------------------------------------------------------

    def status_of(self, record: ChainRecord) -> dict[str, Any]:
        pods = []
        applied = 0
        selected = self.selected_pods(record)
        for pod_key in selected:
            pod = self.pods[pod_key]
            state = self.sidecars.get(pod_key)
            entry: dict[str, Any] = {"name": pod.name, "ip": pod.ip}
            if state is not None and record.key in state.conflicts:
                entry.update(result="Failed", message=state.conflicts[record.key])
            elif record.message is None:
                entry.update(result="Pending", message="no valid spec yet")
            elif state is not None and state.applied.get(record.chain) == record.digest and state.error is None:
                entry.update(result="Applied", version=state.version)
                applied += 1
            elif state is not None and state.error:
                entry.update(result="Failed", message=state.error)
            else:
                entry.update(result="Pending", message="push in progress")
            pods.append(entry)
        if record.errors:
            ready, reason = "False", "InvalidSpec"
            message = f"{len(record.errors)} error(s); the previous valid spec keeps running: " + "; ".join(record.errors)
        elif not selected:
            ready, reason, message = "False", "NoMatchingPods", "the selector matches no gateway pod in this namespace"
        elif applied == len(selected):
            ready, reason, message = "True", "Applied", f"applied on all {applied} sidecar(s)"
        else:
            failed = [p["name"] for p in pods if p["result"] != "Applied"]
            ready, reason, message = "False", "PushFailed", f"not applied on {len(failed)} of {len(selected)} sidecar(s): {', '.join(failed)}"
        versions = [p["version"] for p in pods if "version" in p]
        status: dict[str, Any] = {
            "chain": record.chain,
            "pluginCount": record.plugin_count,
            "sidecars": f"{applied}/{len(selected)}",
            "version": max(versions) if versions else None,
            "pods": pods,
            "errors": record.errors or None,
            "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": message}],
        }
        if record.generation is not None:
            status["observedGeneration"] = record.generation
        return status

    async def write_status(self, record: ChainRecord, body: kopf.Body | None = None) -> dict[str, Any]:
        """Patch the PluginChain's status if it changed; post an Event when it turned unready."""
        status = self.status_of(record)
        previous = self._written.get(record.key)
        if previous == status:
            return status
        condition = dict(status["conditions"][0])
        old_condition = (previous or {}).get("conditions", [{}])[0]
        if old_condition.get("status") == condition["status"] and old_condition.get("reason") == condition["reason"]:
            condition["lastTransitionTime"] = old_condition.get("lastTransitionTime")
        else:
            condition["lastTransitionTime"] = _now()
        patched = {**status, "conditions": [condition]}
        if self.kube is not None:
            await self.kube.patch_status(record.namespace, record.name, patched)
        self._written[record.key] = status
        if body is not None and condition["status"] == "False" and condition["reason"] in ("PushFailed", "InvalidSpec"):
            kopf.warn(body, reason=condition["reason"], message=condition["message"][:1000])
        return status


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
