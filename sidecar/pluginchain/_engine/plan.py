"""Compiles validated chains into execution plans and runs them: the spec's semantics, made exact.

Compiling happens once per config (sorting, grouping, building plugin instances, asking each
what it needs, binding the observer's metrics); a request only walks the prebuilt groups:

- a stage's plugins are grouped by priority, ascending, and groups run one after another;
- in a group, sequential members run one by one in declaration order, then the parallel members
  run concurrently on one snapshot, and their changes are applied in declaration order after the
  group, whatever order they finished in;
- a reject stops the chain: running members are cancelled, later groups never run;
- a plugin that raises or exceeds its ``timeout`` has failed: ``fail_closed`` answers the client
  with an error, ``fail_open`` drops that plugin's changes and goes on; either way the failure is
  logged, counted and handed to the ``error`` stage, which may replace the error response.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pluginchain._api.plugin import (
    Exchange,
    Failure,
    InstanceSettings,
    Needs,
    Plugin,
    PluginContext,
    PluginData,
    Reject,
    Stage,
    preferred_stream_mode,
)
from pluginchain._api.stream import StreamMode
from pluginchain._config.issues import ConfigError, ConfigIssue
from pluginchain._config.models import ValidatedChain
from pluginchain._config.registry import PluginRegistry

logger = logging.getLogger("pluginchain.engine")


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class Observer(Protocol):
    """What the engine reports while it runs. The serving sidecar passes its Prometheus metrics
    (``pluginchain._metrics.EngineMetrics``); compiling anywhere else observes nothing, so
    checking a chain never creates metric series."""

    def plugin_latency(self, chain: str, plugin: str) -> Histogram: ...

    def plugin_outcome(self, chain: str, plugin: str, outcome: str) -> Counter: ...

    def stage_latency(self, chain: str) -> Histogram: ...


class _Ignored:
    """A counter and histogram that keep nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


class NotObserved:
    """The observer of plans that do not serve: every metric is :class:`_Ignored`."""

    _IGNORED = _Ignored()

    def plugin_latency(self, chain: str, plugin: str) -> Histogram:
        return self._IGNORED

    def plugin_outcome(self, chain: str, plugin: str, outcome: str) -> Counter:
        return self._IGNORED

    def stage_latency(self, chain: str) -> Histogram:
        return self._IGNORED


@dataclass(frozen=True, slots=True)
class Phases:
    """The Envoy processing phases a chain needs; the sidecar asks Envoy for these only."""

    request_headers: bool
    request_body: bool
    response_headers: bool
    response_body: bool

    def names(self) -> list[str]:
        return [name for name in ("request_headers", "request_body", "response_headers", "response_body") if getattr(self, name)]


@dataclass(frozen=True, slots=True)
class Group:
    """Plugins of one priority in one stage."""

    priority: int
    sequential: tuple[Plugin, ...]
    parallel: tuple[Plugin, ...]


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """How the post_request plugins treat a streamed response (see ``pluginchain._api.stream``)."""

    on_headers: tuple[Group, ...]
    """Members that read no response body: they run once, on the response headers."""
    per_event: tuple[Group, ...]
    """EVENTS-mode members: they run on each event."""
    at_end: tuple[Group, ...]
    """WHOLE-mode members: they run once, on the whole stream, before any of it is sent."""
    holdback: int
    """Characters of each channel the strictest EVENTS-mode member keeps back."""
    limit_bytes: int | None
    """The smallest stream limit of a WHOLE-mode member (None: the sidecar's body limit)."""


@dataclass(slots=True)
class StageResult:
    """How a stage ended: ``rejection`` is the response to send instead of going on, if any."""

    rejection: Reject | None
    failures: list[Failure]


class _Member:
    """A plugin instance with what it needs and its metric children, settled once, at compile time."""

    __slots__ = ("plugin", "suspends", "latency", "outcomes")

    def __init__(self, plugin: Plugin, needs: Needs, chain: str, observer: Observer):
        self.plugin = plugin
        self.suspends = needs.suspends
        self.latency = observer.plugin_latency(chain, plugin.id)
        self.outcomes = {
            outcome: observer.plugin_outcome(chain, plugin.id, outcome)
            for outcome in ("allow", "reject", "error", "fail_open")
        }


class CompiledChain:
    """One chain's execution plan: groups per stage and the phases it needs."""

    def __init__(self, name: str, plugins: Sequence[tuple[Plugin, Needs]], observer: Observer | None = None):
        observer = observer or NotObserved()
        self.name = name
        self.plugins = tuple(plugin for plugin, _ in plugins)
        self._members = {plugin.id: _Member(plugin, needs, name, observer) for plugin, needs in plugins}
        self.stages: dict[Stage, tuple[Group, ...]] = {
            stage: _group(p for p in self.plugins if p.stage is stage) for stage in Stage
        }
        self.needs_usage = any(needs.usage for _, needs in plugins)
        """Whether a member needs the response's token usage: the response is read for it, and a
        stream is asked to report it (which needs the request body)."""
        self.finishers = tuple(plugin for plugin, needs in plugins if needs.finish)
        """Members whose ``finish`` runs once the exchange is over."""
        request_body = self.needs_usage or any(needs.request_body for _, needs in plugins)
        response_body = self.needs_usage or any(needs.response_body for _, needs in plugins)
        response_headers = any(needs.response_headers for _, needs in plugins)
        has_post = bool(self.stages[Stage.POST_REQUEST])
        self.phases = Phases(
            request_headers=bool(self.stages[Stage.PRE_REQUEST]) or request_body,
            request_body=request_body,
            # The error stage also runs on upstream 5xx, which only the response headers show.
            response_headers=has_post or bool(self.stages[Stage.ERROR]) or response_body or response_headers,
            response_body=response_body,
        )
        post = [(plugin, needs) for plugin, needs in plugins if plugin.stage is Stage.POST_REQUEST]
        per_event = [(p, n) for p, n in post if n.response_body and n.stream is StreamMode.EVENTS]
        at_end = [(p, n) for p, n in post if n.response_body and n.stream is StreamMode.WHOLE]
        limits = [n.stream_limit_bytes for _, n in at_end if n.stream_limit_bytes is not None]
        self.stream = StreamPlan(
            on_headers=_group(p for p, n in post if not n.response_body),
            per_event=_group(p for p, _ in per_event),
            at_end=_group(p for p, _ in at_end),
            holdback=max((n.holdback for _, n in per_event), default=0),
            limit_bytes=min(limits, default=None),
        )
        self._chain_latency = observer.stage_latency(name)

    def __repr__(self) -> str:
        return f"CompiledChain({self.name!r}, plugins={[p.id for p in self.plugins]})"

    async def run_stage(self, stage: Stage, exchange: Exchange, groups: tuple[Group, ...] | None = None) -> StageResult:
        """Run ``pre_request`` or ``post_request`` on ``exchange``, applying changes to it.

        ``groups``: only these of the stage's groups (a part of ``self.stream``), else all.
        """
        if stage is Stage.ERROR:
            raise ValueError("run the error stage with run_error_stage()")
        failures: list[Failure] = []
        rejection = None
        started = time.perf_counter()
        try:
            for group in self.stages[stage] if groups is None else groups:
                rejection = await self._run_group(group, stage, exchange, failures)
                if rejection is not None:
                    break
        finally:
            self._chain_latency.observe(time.perf_counter() - started)
        for failure in failures:
            response = None if failure.fail_open else rejection
            replacement = await self.run_error_stage(exchange, failure, response)
            if replacement is not None:
                rejection = replacement
        return StageResult(rejection, failures)

    async def finish(self, exchange: Exchange) -> None:
        """Run the members' ``finish`` hooks once the exchange is over, each under its timeout.
        Failures are logged and counted; the client has its answer already."""
        for plugin in self.finishers:
            member = self._members[plugin.id]
            ctx = _context(self.name, exchange, plugin)
            try:
                async with asyncio.timeout(plugin.settings.timeout):
                    await plugin.finish(ctx, PluginData(plugin.stage, exchange))
            except Exception as error:
                member.outcomes["error"].inc()
                logger.warning(
                    "plugin %s failed to finish: %s: %s", plugin.id, type(error).__name__, error,
                    extra={"chain": self.name, "request_id": exchange.request_id, "plugin": plugin.id},
                )

    async def run_error_stage(self, exchange: Exchange, failure: Failure, response: Reject | None = None) -> Reject | None:
        """Let the error stage see ``failure``; return its replacement for the client response.

        ``response`` is the error response about to be sent (None when the request goes on after
        a fail_open failure, in which case a replacement is ignored). Failures inside the error
        stage are logged and counted but never recurse.
        """
        for group in self.stages[Stage.ERROR]:
            for plugin in group.sequential + group.parallel:
                data = PluginData(Stage.ERROR, exchange, failure)
                outcome = await self._execute(self._members[plugin.id], data, exchange)
                if isinstance(outcome, Reject):
                    return outcome if response is not None or failure.kind == "upstream" else None
                if isinstance(outcome, Failure):
                    continue
                data.apply()
        return None

    async def _run_group(self, group: Group, stage: Stage, exchange: Exchange, failures: list[Failure]) -> Reject | None:
        for plugin in group.sequential:
            rejection = await self._run_one(plugin, stage, exchange, failures)
            if rejection is not None:
                return rejection
        if len(group.parallel) == 1:
            return await self._run_one(group.parallel[0], stage, exchange, failures)
        if not group.parallel:
            return None
        if not any(self._members[plugin.id].suspends for plugin in group.parallel):
            return self._run_inline(group.parallel, stage, exchange, failures)
        views = [PluginData(stage, exchange) for _ in group.parallel]
        tasks = [
            asyncio.ensure_future(self._execute(self._members[plugin.id], view, exchange))
            for plugin, view in zip(group.parallel, views, strict=True)
        ]
        pending = set(tasks)
        stop: Reject | None = None
        try:
            while pending and stop is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # Several may finish in one wake-up: decide in declaration order.
                for task in tasks:
                    if task in done and stop is None:
                        stop = self._settle(task.result(), failures)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if stop is not None:
            return stop
        for task, view in zip(tasks, views, strict=True):
            if task.result() is None:
                view.apply()
        return None

    def _run_inline(self, members: tuple[Plugin, ...], stage: Stage, exchange: Exchange, failures: list[Failure]) -> Reject | None:
        """Parallel members that never suspend: the same snapshot semantics, no tasks.

        Run concurrently they would all finish in one loop turn and be settled in declaration
        order; running them one by one in that order on the snapshot gives the same result.
        """
        views = [PluginData(stage, exchange) for _ in members]
        outcomes = []
        for plugin, view in zip(members, views, strict=True):
            outcome = self._execute_inline(self._members[plugin.id], view, exchange)
            stop = self._settle(outcome, failures)
            if stop is not None:
                return stop
            outcomes.append(outcome)
        for outcome, view in zip(outcomes, views, strict=True):
            if outcome is None:
                view.apply()
        return None

    async def _run_one(self, plugin: Plugin, stage: Stage, exchange: Exchange, failures: list[Failure]) -> Reject | None:
        view = PluginData(stage, exchange)
        outcome = await self._execute(self._members[plugin.id], view, exchange)
        if outcome is None:
            view.apply()
            return None
        return self._settle(outcome, failures)

    @staticmethod
    def _settle(outcome: Reject | Failure | None, failures: list[Failure]) -> Reject | None:
        """Turn a member's outcome into the group's stop response, if it stops the chain."""
        if outcome is None or isinstance(outcome, Reject):
            return outcome
        failures.append(outcome)
        return None if outcome.fail_open else failure_response(outcome)

    async def _execute(self, member: _Member, data: PluginData, exchange: Exchange) -> Reject | Failure | None:
        """Run one plugin under its timeout; never raises except for cancellation."""
        plugin = member.plugin
        if not member.suspends:
            return self._execute_inline(member, data, exchange)
        settings = plugin.settings
        ctx = _context(self.name, exchange, plugin)
        started = time.perf_counter()
        timeout = asyncio.timeout(settings.timeout)
        try:
            async with timeout:
                await plugin.execute(ctx, data)
        except Reject as reject:
            return self._rejected(member, reject)
        except Exception as error:
            return self._failed(member, data, exchange, error, timed_out=isinstance(error, TimeoutError) and timeout.expired())
        finally:
            member.latency.observe(time.perf_counter() - started)
        member.outcomes["allow"].inc()
        return None

    def _execute_inline(self, member: _Member, data: PluginData, exchange: Exchange) -> Reject | Failure | None:
        """:meth:`_execute` for a plugin that never suspends: driven to completion at once, with no
        timer (nothing could interrupt it anyway), task or event-loop turn."""
        plugin = member.plugin
        ctx = _context(self.name, exchange, plugin)
        started = time.perf_counter()
        try:
            _run_to_completion(plugin.execute(ctx, data))
        except Reject as reject:
            return self._rejected(member, reject)
        except Exception as error:
            return self._failed(member, data, exchange, error, timed_out=False)
        finally:
            member.latency.observe(time.perf_counter() - started)
        member.outcomes["allow"].inc()
        return None

    @staticmethod
    def _rejected(member: _Member, reject: Reject) -> Reject:
        reject.plugin_id = member.plugin.id
        member.outcomes["reject"].inc()
        return reject

    def _failed(self, member: _Member, data: PluginData, exchange: Exchange, error: Exception, *, timed_out: bool) -> Failure:
        plugin = member.plugin
        settings = plugin.settings
        fail_open = settings.on_error == "fail_open"
        if timed_out:
            failure = Failure(plugin.id, data.stage, "timeout", f"timed out after {settings.timeout:g}s", fail_open)
        else:
            failure = Failure(plugin.id, data.stage, "exception", f"{type(error).__name__}: {error}", fail_open)
        member.outcomes["fail_open" if fail_open else "error"].inc()
        logger.warning(
            "plugin %s failed in %s (%s, %s): %s",
            plugin.id, data.stage, failure.kind, settings.on_error, failure.message,
            extra={"chain": self.name, "request_id": exchange.request_id, "plugin": plugin.id},
            exc_info=failure.kind == "exception",
        )
        return failure


def _context(chain: str, exchange: Exchange, plugin: Plugin) -> PluginContext:
    deadline = asyncio.get_running_loop().time() + plugin.settings.timeout
    return PluginContext(chain, exchange.request_id, plugin.id, deadline, exchange.consumer, exchange.session)


def _run_to_completion(coroutine: Coroutine[Any, Any, None]) -> None:
    """Drive a coroutine that never suspends; one that does is a plugin bug, reported as such."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a plugin said it never suspends but awaited (`suspends = False`, or suspends=False in its needs())")


def failure_response(failure: Failure) -> Reject:
    """What the client gets for a fail_closed failure: no internals beyond the plugin id."""
    if failure.kind == "timeout":
        return Reject(504, f"request blocked: plugin {failure.plugin_id!r} timed out", code="plugin_timeout", type="server_error")
    return Reject(500, f"request blocked: plugin {failure.plugin_id!r} failed", code="plugin_failed", type="server_error")


class Plan:
    """Every compiled chain of one config, by name. Swapped whole on reload, never edited."""

    def __init__(self, chains: Mapping[str, CompiledChain]):
        self.chains = dict(chains)

    def get(self, name: str) -> CompiledChain | None:
        return self.chains.get(name)

    async def aclose(self) -> None:
        """Release every plugin's resources; call once no request uses this plan any more."""
        for chain in self.chains.values():
            for plugin in chain.plugins:
                try:
                    await plugin.aclose()
                except Exception:
                    logger.exception("closing plugin %s of chain %s failed", plugin.id, chain.name)


def compile_plan(chains: Mapping[str, ValidatedChain], registry: PluginRegistry, observer: Observer | None = None) -> Plan:
    """Build plugin instances and groups for validated chains; raise ConfigError if one cannot be
    built or asks for more than its class declares. ``observer``: see :class:`Observer`.

    Plugin constructors open no connections (those are made on first use), so a plan that fails
    to build half-way leaves nothing to close.
    """
    compiled: dict[str, CompiledChain] = {}
    issues: list[ConfigIssue] = []
    for chain in chains.values():
        plugins: list[tuple[Plugin, Needs]] = []
        for validated in chain.plugins:
            entry = validated.entry
            if not entry.enabled:
                continue
            plugin_class = registry.get(entry.name)
            assert plugin_class is not None, "validated chains name registered plugins only"
            settings = InstanceSettings(
                id=entry.instance_id,
                stage=entry.stage,
                priority=entry.priority,
                parallel=entry.parallel,
                timeout=entry.timeout,
                on_error=entry.on_error,
                chain=chain.name,
            )
            try:
                plugin = plugin_class(validated.config, settings)
                needs = _needs_of(plugin)
            except Exception as error:
                issues.append(ConfigIssue(validated.path, f"cannot build plugin: {error}"))
                continue
            plugins.append((plugin, needs))
        compiled[chain.name] = CompiledChain(chain.name, plugins, observer)
    if issues:
        raise ConfigError(issues)
    return Plan(compiled)


def _needs_of(plugin: Plugin) -> Needs:
    """The instance's :meth:`Plugin.needs`, held to what its class declares."""
    needs = plugin.needs()
    if not isinstance(needs, Needs):
        raise TypeError(f"needs() must return pluginchain.Needs, got {type(needs).__name__}")
    declared = type(plugin)
    if (needs.request_body or needs.response_body) and not declared.reads_body:
        raise ValueError("needs() asks for a body, but the class declares reads_body = False")
    if needs.suspends and not declared.suspends:
        raise ValueError("needs() says it suspends, but the class declares suspends = False")
    if needs.response_body and plugin.stage is Stage.PRE_REQUEST:
        raise ValueError("needs() asks for the response body in pre_request, before there is a response")
    if needs.response_body and needs.stream is None:
        needs = dataclasses.replace(needs, stream=preferred_stream_mode(declared.streams))
    if needs.response_body and needs.stream not in declared.streams:
        modes = ", ".join(sorted(declared.streams)) or "none"
        raise ValueError(f"needs() treats streams as {needs.stream}, but the class declares streams: {modes}")
    if needs.holdback < 0 or (needs.stream_limit_bytes is not None and needs.stream_limit_bytes <= 0):
        raise ValueError("needs() asks for a negative holdback or a stream limit that is not positive")
    return needs


def _group(plugins: Iterable[Plugin]) -> tuple[Group, ...]:
    by_priority: dict[int, list[Plugin]] = {}
    for plugin in plugins:
        by_priority.setdefault(plugin.priority, []).append(plugin)
    return tuple(
        Group(
            priority,
            tuple(p for p in members if not p.settings.parallel),
            tuple(p for p in members if p.settings.parallel),
        )
        for priority, members in sorted(by_priority.items())
    )
