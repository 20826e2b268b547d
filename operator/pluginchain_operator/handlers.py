"""kopf handlers: PluginChain and Pod events in, controller calls out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from pluginchain_operator.controller import Controller, Key
from pluginchain_operator.kube import KubeClient
from pluginchain_operator.resources import GROUP, PLURAL, VERSION

logger = logging.getLogger("pluginchain.operator")

FINALIZER = "pluginchain.io/finalizer"


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own credentials, used by the status client too."""
    connection = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if connection is not None:
        memo.controller.kube = KubeClient(connection)
    return connection


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping in the status and our own annotation namespace, not kopf.zalando.org.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="pluginchain.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    # The operator serves one known CRD in the namespaces it is told: no cluster-wide scans of
    # CRDs and namespaces, so its RBAC stays PluginChains, pods and Events.
    settings.scanning.disabled = True
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    controller: Controller = memo.controller
    memo.resync_task = asyncio.get_running_loop().create_task(_resync_forever(controller, memo.resync_interval))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task: asyncio.Task | None = memo.get("resync_task")
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if memo.controller.kube is not None:
        await memo.controller.kube.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile_chain(*, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Validate, compile and push a PluginChain to every sidecar it selects; report per pod."""
    namespace = namespace or ""  # PluginChains are namespaced; kopf's signature allows None
    controller: Controller = memo.controller
    previous = controller.chains.get((namespace, name))
    previously_selected = set(previous.selected) if previous else set()
    record = controller.update_chain(namespace, name, body)
    if record.errors:
        logger.warning("PluginChain %s/%s is invalid; nothing pushed:\n  %s", namespace, name, "\n  ".join(record.errors))
        await controller.write_status(record, body)
        return
    record.selected = set(controller.selected_pods(record))
    affected = record.selected | previously_selected
    await controller.sync_pods(affected)
    status = await controller.write_status(record, body)
    await _write_neighbours(controller, affected, skip=record.key)
    if status["conditions"][0]["reason"] == "PushFailed":
        raise kopf.TemporaryError(status["conditions"][0]["message"], delay=memo.retry_delay)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_chain(*, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """Push every affected sidecar its chain set without this chain.

    Best effort: an unreachable sidecar gets its full set when it is reachable again, so
    deletion is never blocked by it.
    """
    controller: Controller = memo.controller
    record = controller.forget_chain(namespace or "", name)
    if record is None:
        return
    affected = record.selected | set(controller.selected_pods(record))
    await controller.sync_pods(affected)
    await _write_neighbours(controller, affected, skip=record.key)


@kopf.on.event("", "v1", "pods")
async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A selected pod appeared, became ready, moved or restarted: push every chain that selects it."""
    controller: Controller = memo.controller
    key: Key = (body.get("metadata", {}).get("namespace", ""), body.get("metadata", {}).get("name", ""))
    if event.get("type") == "DELETED":
        owners = controller.chains_selecting(key)
        controller.forget_pod(*key)
        for record in owners:
            record.selected.discard(key)
            await controller.write_status(record)
        return
    needs_push = controller.update_pod(body)[1]
    owners = controller.chains_selecting(key)
    if not owners:
        return
    for record in controller.chains.values():
        if record.namespace == key[0]:
            record.selected = set(controller.selected_pods(record))
    if needs_push:
        await controller.sync_pod(key)
    for record in owners:
        await controller.write_status(record)


async def _write_neighbours(controller: Controller, pods: set[Key], skip: Key) -> None:
    """Other PluginChains on the same pods: their per-pod results may have changed too."""
    for record in list(controller.chains.values()):
        if record.key != skip and record.selected & pods:
            await controller.write_status(record)


async def _resync_forever(controller: Controller, interval: float) -> None:
    """Retry failed pushes and re-push sidecars that lost their plan, every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        try:
            pods = {key for record in controller.chains.values() for key in record.selected} | set(controller.sidecars)
            await asyncio.gather(*(controller.verify_pod(key) for key in sorted(pods) if key in controller.pods))
            for record in list(controller.chains.values()):
                await controller.write_status(record)
        except Exception:
            logger.exception("resync failed; trying again in %gs", interval)
