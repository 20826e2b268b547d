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

Each execution is counted once, by what the plugin did (:class:`Outcome`), with the error code
the client got from it; each stage run is timed under its :data:`STAGE_LABELS` name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Coroutine, Generator, Iterable, Mapping, Sequence
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


class Outcome(enum.StrEnum):
    """How one plugin execution ended, as the metrics count it."""

    ALLOW = "allow"
    """It returned, leaving the body, a stream's text and its events as they were (header,
    metadata and identity changes are still an allow)."""
    REDACTED = "redacted"
    """It returned having changed the body of its stage's message, a stream's pending text
    (``set_text``) or an event (``replace_event``): a redaction, or any rewrite of what is said."""
    REJECT = "reject"
    """It raised :class:`Reject`; counted with the reject's code."""
    ERROR = "error"
    """It raised anything else (fail_closed: the client got ``plugin_failed``)."""
    TIMEOUT = "timeout"
    """It ran past its ``timeout`` (fail_closed: the client got ``plugin_timeout``)."""
    CANCELLED = "cancelled"
    """It was stopped unfinished: a member of its parallel group rejected or failed closed, or
    the request went away."""


STAGE_LABELS = ("pre_request", "post_request", "post_request_event", "error")
"""What a stage run is timed as. ``post_request_event``: the per-event (EVENTS-mode) members on one
event of a streamed response, so that a stream's hundreds of event runs do not pass for
post_request runs; its other post_request runs (on its headers, on the whole stream) are
``post_request``."""


class Observer(Protocol):
    """What the engine reports while it runs. The serving sidecar passes its Prometheus metrics
    (``pluginchain._metrics.EngineMetrics``); compiling anywhere else observes nothing, so
    checking a chain never creates metric series. Chain names and plugin ids come from the
    compiled config; ``code`` from plugins (a reject's code): the observer bounds its values."""

    def plugin_latency(self, chain: str, plugin: str) -> Histogram: ...

    def plugin_outcome(self, chain: str, plugin: str, outcome: str, code: str | None) -> Counter:
        """The counter of ``outcome``; ``code``: the error code the client got from it, or None."""
        ...

    def stage_latency(self, chain: str, stage: str) -> Histogram:
        """The histogram of one of :data:`STAGE_LABELS`."""
        ...


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

    def plugin_outcome(self, chain: str, plugin: str, outcome: str, code: str | None) -> Counter:
        return self._IGNORED

    def stage_latency(self, chain: str, stage: str) -> Histogram:
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


_MAX_BOUND_COUNTERS = 64
"""Outcome counters one member keeps bound. Reject codes come from plugins: past this many, a
counter is looked up at each use instead of kept (the observer bounds the label values)."""


class _Member:
    """A plugin instance with what it needs and its metric children, settled once, at compile time
    (the counter of an outcome with a code at its first use)."""

    __slots__ = ("plugin", "suspends", "latency", "_counters", "_chain", "_observer")

    def __init__(self, plugin: Plugin, needs: Needs, chain: str, observer: Observer):
        self.plugin = plugin
        self.suspends = needs.suspends
        self.latency = observer.plugin_latency(chain, plugin.id)
        self._chain = chain
        self._observer = observer
        self._counters: dict[tuple[Outcome, str | None], Counter] = {}
        for outcome in (Outcome.ALLOW, Outcome.REDACTED):
            self._bind(outcome, None)

    def count(self, outcome: Outcome, code: str | None = None) -> None:
        """One execution that ended with ``outcome``; ``code``: the error code the client got from it."""
        counter = self._counters.get((outcome, code))
        if counter is None:
            counter = self._bind(outcome, code)
        counter.inc()

    def _bind(self, outcome: Outcome, code: str | None) -> Counter:
        counter = self._observer.plugin_outcome(self._chain, self.plugin.id, outcome, code)
        if len(self._counters) < _MAX_BOUND_COUNTERS:
            self._counters[(outcome, code)] = counter
        return counter


class _Suspended:
    """A plugin run, started inline, that suspended. Awaiting it drives the rest of the plugin's
    coroutine from where it stopped (``yield from`` cannot: it would resume the coroutine before
    what it awaits is done). What the plugin awaits, and any cancellation thrown in, pass through
    unchanged, so the task awaiting this drives the plugin as if it had run it from the start."""

    __slots__ = ("member", "data", "coroutine", "awaiting", "deadline", "started")

    def __init__(
        self, member: _Member, data: PluginData, coroutine: Coroutine[Any, Any, None], awaiting: Any, deadline: float, started: float,
    ):
        self.member = member
        self.data = data
        self.coroutine = coroutine
        self.awaiting = awaiting
        """What the coroutine yielded when it suspended (a future, as asyncio's tasks expect)."""
        self.deadline = deadline
        """``loop.time()`` at which the plugin times out, counted from its start."""
        self.started = started
        """perf_counter() at its start, for its latency."""

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine = self.coroutine
        awaiting = self.awaiting
        while True:
            try:
                sent = yield awaiting
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    awaiting = coroutine.throw(error)
                except StopIteration:
                    return
            else:
                try:
                    awaiting = coroutine.send(sent)
                except StopIteration:
                    return


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
        self._stage_latency = {stage: observer.stage_latency(name, stage) for stage in self._timed_stages()}

    def _timed_stages(self) -> list[str]:
        """The :data:`STAGE_LABELS` this chain runs: only those get a histogram."""
        runs = {
            "pre_request": bool(self.stages[Stage.PRE_REQUEST]),
            "post_request": bool(self.stages[Stage.POST_REQUEST]),
            "post_request_event": bool(self.stream.per_event),
            "error": bool(self.stages[Stage.ERROR]),
        }
        return [stage for stage in STAGE_LABELS if runs[stage]]

    def __repr__(self) -> str:
        return f"CompiledChain({self.name!r}, plugins={[p.id for p in self.plugins]})"

    async def run_stage(self, stage: Stage, exchange: Exchange, groups: tuple[Group, ...] | None = None) -> StageResult:
        """Run ``pre_request`` or ``post_request`` on ``exchange``, applying changes to it.

        ``groups``: only these of the stage's groups (a part of ``self.stream``), else all.
        """
        if stage is Stage.ERROR:
            raise ValueError("run the error stage with run_error_stage()")
        groups = self.stages[stage] if groups is None else groups
        failures: list[Failure] = []
        rejection = None
        if not groups:
            return StageResult(rejection, failures)
        # The stream's per-event groups are the one subset timed apart (see STAGE_LABELS).
        timer = self._stage_latency["post_request_event" if groups is self.stream.per_event else stage.value]
        started = time.perf_counter()
        try:
            for group in groups:
                rejection = await self._run_group(group, stage, exchange, failures)
                if rejection is not None:
                    break
        finally:
            timer.observe(time.perf_counter() - started)
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
            timeout = asyncio.timeout(plugin.settings.timeout)
            try:
                async with timeout:
                    await plugin.finish(ctx, PluginData(plugin.stage, exchange))
            except Exception as error:
                # The client has its answer: no error code came from this.
                member.count(Outcome.TIMEOUT if isinstance(error, TimeoutError) and timeout.expired() else Outcome.ERROR)
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
        groups = self.stages[Stage.ERROR]
        if not groups:
            return None
        started = time.perf_counter()
        try:
            for group in groups:
                for plugin in group.sequential + group.parallel:
                    data = PluginData(Stage.ERROR, exchange, failure)
                    outcome = await self._execute(self._members[plugin.id], data, exchange)
                    if isinstance(outcome, Reject):
                        return outcome if response is not None or failure.kind == "upstream" else None
                    if isinstance(outcome, Failure):
                        continue
                    data.apply()
            return None
        finally:
            self._stage_latency["error"].observe(time.perf_counter() - started)

    async def _run_group(self, group: Group, stage: Stage, exchange: Exchange, failures: list[Failure]) -> Reject | None:
        for plugin in group.sequential:
            rejection = await self._run_one(plugin, stage, exchange, failures)
            if rejection is not None:
                return rejection
        if len(group.parallel) == 1:
            return await self._run_one(group.parallel[0], stage, exchange, failures)
        if not group.parallel:
            return None
        return await self._run_parallel(group.parallel, stage, exchange, failures)

    async def _run_parallel(self, members: tuple[Plugin, ...], stage: Stage, exchange: Exchange, failures: list[Failure]) -> Reject | None:
        """Parallel members on one snapshot; their changes applied in declaration order after all.

        Each member is started inline, in declaration order, and only one that suspends gets a
        task (and a timer) to finish in. Members that never suspend would all finish in one loop
        turn as tasks and be settled in declaration order; running them one by one in that order
        gives the same result without a task per member (about 40 µs per request).
        """
        views = [PluginData(stage, exchange) for _ in members]
        outcomes: list[Reject | Failure | None] = [None] * len(members)
        suspended: dict[int, asyncio.Future[Reject | Failure | None]] = {}
        stop: Reject | None = None
        for index, (plugin, view) in enumerate(zip(members, views, strict=True)):
            started = self._start(self._members[plugin.id], view, exchange)
            if isinstance(started, _Suspended):
                suspended[index] = asyncio.ensure_future(self._finish(started))
                continue
            outcomes[index] = started
            stop = self._settle(started, failures)
            if stop is not None:
                break
        if suspended:
            stop = await self._wait_suspended(suspended, outcomes, failures, stop)
        if stop is not None:
            return stop
        for outcome, view in zip(outcomes, views, strict=True):
            if outcome is None:
                view.apply()
        return None

    async def _wait_suspended(
        self, tasks: dict[int, asyncio.Future[Reject | Failure | None]], outcomes: list[Reject | Failure | None],
        failures: list[Failure], stop: Reject | None,
    ) -> Reject | None:
        """Wait for the members that suspended until all are done or one stops the group, and
        cancel the rest. ``stop``: a member that finished inline stopped the group already."""
        pending = set(tasks.values())
        try:
            if stop is not None:
                # Let each task take its first step, so that its plugin sees the cancellation at
                # its own ``await`` (a task cancelled before its first step never runs its body).
                await asyncio.sleep(0)
            while pending and stop is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # Several may finish in one wake-up: decide in declaration order.
                for index, task in tasks.items():
                    if task in done and stop is None:
                        outcomes[index] = task.result()
                        stop = self._settle(outcomes[index], failures)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return stop

    async def _run_one(self, plugin: Plugin, stage: Stage, exchange: Exchange, failures: list[Failure]) -> Reject | None:
        view = PluginData(stage, exchange)
        outcome = self._start(self._members[plugin.id], view, exchange)
        if isinstance(outcome, _Suspended):
            outcome = await self._finish(outcome)
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
        started = self._start(member, data, exchange)
        if isinstance(started, _Suspended):
            return await self._finish(started)
        return started

    def _start(self, member: _Member, data: PluginData, exchange: Exchange) -> Reject | Failure | None | _Suspended:
        """Run a plugin inline up to its first suspension: its outcome if it finished without
        one (most runs: a body that needs no inflating, a limiter in memory), else the run for
        :meth:`_finish` to complete. A run that finishes inline needs no timer: nothing could
        have interrupted it anyway."""
        plugin = member.plugin
        ctx = _context(self.name, exchange, plugin)
        started = time.perf_counter()
        coroutine = plugin.execute(ctx, data)
        try:
            awaiting = coroutine.send(None)
        except StopIteration:
            member.latency.observe(time.perf_counter() - started)
            member.count(Outcome.REDACTED if _changes_content(data) else Outcome.ALLOW)
            return None
        except Reject as reject:
            member.latency.observe(time.perf_counter() - started)
            return self._rejected(member, reject)
        except Exception as error:
            member.latency.observe(time.perf_counter() - started)
            return self._failed(member, data, exchange, error, timed_out=False)
        if not member.suspends:
            coroutine.close()
            member.latency.observe(time.perf_counter() - started)
            bug = RuntimeError("a plugin said it never suspends but awaited (`suspends = False`, or suspends=False in its needs())")
            return self._failed(member, data, exchange, bug, timed_out=False)
        return _Suspended(member, data, coroutine, awaiting, ctx.deadline, started)

    async def _finish(self, run: _Suspended) -> Reject | Failure | None:
        """The rest of a run that suspended, under the timeout counted from its start."""
        member = run.member
        timeout = asyncio.timeout_at(run.deadline)
        try:
            async with timeout:
                await run
        except Reject as reject:
            return self._rejected(member, reject)
        except Exception as error:
            return self._failed(member, run.data, run.data.exchange, error, timed_out=isinstance(error, TimeoutError) and timeout.expired())
        except asyncio.CancelledError:
            # Not its own timeout (asyncio.timeout turns that into TimeoutError): a sibling
            # stopped the group, or the request went away.
            member.count(Outcome.CANCELLED)
            raise
        finally:
            member.latency.observe(time.perf_counter() - run.started)
        member.count(Outcome.REDACTED if _changes_content(run.data) else Outcome.ALLOW)
        return None

    @staticmethod
    def _rejected(member: _Member, reject: Reject) -> Reject:
        # The reject lives on as the exchange's answer; its traceback would keep the plugin's and
        # the engine's frames (the exchange among them: a cycle) until the next full collection.
        reject.__traceback__ = None
        reject.plugin_id = member.plugin.id
        member.count(Outcome.REJECT, reject.code)
        return reject

    def _failed(self, member: _Member, data: PluginData, exchange: Exchange, error: Exception, *, timed_out: bool) -> Failure:
        plugin = member.plugin
        settings = plugin.settings
        fail_open = settings.on_error == "fail_open"
        if timed_out:
            failure = Failure(plugin.id, data.stage, "timeout", f"timed out after {settings.timeout:g}s", fail_open)
        else:
            failure = Failure(plugin.id, data.stage, "exception", f"{type(error).__name__}: {error}", fail_open)
        # The client gets an error from it only where a failure answers, and only fail_closed.
        code = None if fail_open or data.stage is Stage.ERROR else failure_response(failure).code
        member.count(Outcome.TIMEOUT if timed_out else Outcome.ERROR, code)
        logger.warning(
            "plugin %s failed in %s (%s, %s): %s",
            plugin.id, data.stage, failure.kind, settings.on_error, failure.message,
            extra={"chain": self.name, "request_id": exchange.request_id, "plugin": plugin.id},
            # One line per failure (an unreachable endpoint fails every request); the traceback,
            # for a plugin's own bug, at debug level.
            exc_info=failure.kind == "exception" and logger.isEnabledFor(logging.DEBUG),
        )
        return failure


def _changes_content(data: PluginData) -> bool:
    """Whether a plugin that let the message on changed what it says: the body of its stage's
    message, a stream's pending text, or the event being judged (see :attr:`Outcome.REDACTED`)."""
    event = data.event
    if event is not None:
        texts = data.texts
        if texts is not event.pending and any(text != event.pending.get(channel) for channel, text in texts.items()):
            return True
        return data._event_data is not None  # replace_event() has no public reader; the engine applies it
    message = data.response if data.stage is Stage.POST_REQUEST else data.request
    original = message.body if message is not None else None
    body = data.body
    return body is not original and body != original


def _context(chain: str, exchange: Exchange, plugin: Plugin) -> PluginContext:
    deadline = asyncio.get_running_loop().time() + plugin.settings.timeout
    return PluginContext(chain, exchange.request_id, plugin.id, deadline, exchange.consumer, exchange.session)


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
