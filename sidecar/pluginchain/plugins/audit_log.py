"""The built-in ``audit_log``: one JSON record per request, written once the exchange is over.

The plugin does nothing while the request passes (``execute`` returns at once, inline); its
``finish`` hook, which the engine calls however the exchange ended, builds the record and hands
it to its sinks. A record::

    {"time": "2025-01-31T12:00:00.123Z", "request_id": "...", "chain": "default",
     "consumer": "acme" | null, "session": "..." | null, "model": "gpt-4o-mini" | null,
     "decision": "allowed" | "rejected" | "failed", "plugin": "rate_limiter" | null,
     "code": "rate_limit_exceeded" | null, "status": 429 | null, "latency_ms": 12.5 | null,
     "usage": {"input_tokens": 10, "output_tokens": 20, "total_tokens": 30} | null,
     "headers": {"user-agent": "..."}}

- ``time``: when the request reached the sidecar, UTC, ISO 8601 with milliseconds.
- ``decision``: ``allowed`` when the client got the upstream's answer (whatever its status),
  ``rejected`` when a plugin refused the request (``plugin`` is its id, ``code`` its code; an
  ``error``-stage plugin that replaced an error response counts as its reject), ``failed`` when the
  client got an error response instead (``code`` ``plugin_failed``, ``plugin_timeout``...).
- ``status``: the status of the rejection the client got, else the upstream response's, else
  null (the client went away before an answer). A stream refused mid-way has the rejection's
  status, though the client had already received the upstream's.
- ``latency_ms``: from the request reaching the sidecar to the end of the exchange.
- ``model``: the request body's ``model`` when the chain read the body (a body plugin, a
  ``token_limiter`` with ``models``, or ``read_model: true``), else the model the response named
  in its usage. At most 256 characters.
- ``usage``: the tokens the response reported, when a member of the chain had them read (a
  ``token_limiter``); this plugin does not make the sidecar read responses for it.
- ``headers``: only with ``headers`` configured: those of the listed request headers the request
  had, as they went upstream (after the chain's changes). Credentials (``authorization``,
  cookies, API keys, tokens...) cannot be listed; ``:path`` is recorded without its query string,
  which may carry keys. Nothing else of the request or the response (no other header, no body,
  no prompt or completion text) is ever recorded.

**Sinks.** ``sink: stdout`` (JSON lines, the default) or ``file`` (JSON lines appended to
``path``, reopened when it is rotated away), and, with ``http_url``, an HTTP endpoint, sent
JSON arrays (``POST``) of up to ``batch_size`` records at most ``flush_interval`` after the
first of them came (``sink: none`` writes to the endpoint only). A failed POST is retried
``http_retries`` times (connection errors, timeouts, 429 and 5xx), then its records are lost.

**Never in the request's way.** Each sink has its own bounded queue (``queue_size`` records) and
its own background task, started on first use, that writes what the queue holds: stdout and
file writes run in a worker thread (a full pipe or a stalled disk blocks that thread, not the
event loop), the HTTP endpoint is called by the task. ``finish`` only encodes the record and
puts it on the queues: when a queue is full the record is dropped for that sink and counted,
never waited for. A slow sink therefore loses records, not requests, and one sink's trouble does
not touch the others. ``aclose`` (when the plan is replaced, or the sidecar stops) lets each
sink write what it holds within ``close_timeout``; what is left then is dropped and counted.

Every record is counted in ``pluginchain_audit_records_total`` by sink and result: ``written``,
``dropped`` (queue full, or left at close) or ``failed`` (the write or the POST failed); sink
failures are logged, one warning per ten seconds per sink at most.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Literal
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter
from pydantic import BeforeValidator, Field, field_validator, model_validator

from pluginchain._api.durations import Duration
from pluginchain._api.plugin import (
    BodyNotJSON,
    Exchange,
    HttpMessage,
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Stage,
)
from pluginchain._metrics import AUDIT_RECORDS
from pluginchain.plugins._call_failures import describe_error, safe_endpoint, traceback_if_debug
from pluginchain.plugins._http import check_http_url
from pluginchain.plugins._limits import WarningSpacing
from pluginchain.plugins.external_validator import SECRET_HEADERS

MAX_MODEL_CHARS = 256
"""Longest ``model`` recorded; the request's is whatever the client wrote."""

SECRET_HEADER_PARTS = ("auth", "cookie", "token", "secret", "passw", "credential", "signature", "api-key", "apikey", "api_key")
"""A header whose name contains one of these may carry a credential and cannot be allow-listed."""

RESULTS = ("written", "dropped", "failed")

_RETRY_BACKOFF = 0.5
"""Seconds before the first retry of a failed POST; doubled for each further retry."""
_HEADER_NAME: Final = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_FILE_MODE = 0o640
_STOP: Final = object()
"""Put on a sink's queue by ``aclose``: write what came before, then end."""

logger = logging.getLogger("pluginchain.plugin")


def _not_a_bool(value: object) -> object:
    # pydantic takes true as 1; a size written as a boolean is a mistake.
    if isinstance(value, bool):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


Count = Annotated[int, BeforeValidator(_not_a_bool), Field(gt=0)]
"""A positive number of records."""


def _header_name(value: str, setting: str) -> str:
    name = value.strip().lower()
    if not name or not set(name.removeprefix(":")) <= _HEADER_NAME:
        raise ValueError(f"not a valid header name in {setting}: {value!r}")
    return name


class AuditLogConfig(PluginConfig):
    """Config of ``audit_log``. ``{}`` is valid: JSON lines on stdout, no request headers."""

    sink: Literal["stdout", "file", "none"] = "stdout"
    """Where records are written: ``stdout`` (JSON lines, default), ``file`` (JSON lines appended
    to ``path``) or ``none`` (only to ``http_url``, which it then needs)."""

    path: str | None = None
    """The file of ``sink: file``, created (mode 0640) if missing; required with it and refused
    otherwise. Relative to the sidecar's working directory."""

    http_url: str | None = None
    """Also POST records, in batches (JSON arrays), to this ``http://`` or ``https://`` URL.
    Credentials go in ``http_headers``, not in the URL."""

    http_headers: dict[str, str] = {}
    """Extra headers on the POSTs, e.g. the endpoint's own ``authorization``. Never logged."""

    http_timeout: Duration = 5.0
    """Limit of one POST, connection included. Default ``5s``."""

    http_retries: Annotated[int, BeforeValidator(_not_a_bool), Field(ge=0)] = 2
    """Extra attempts of a POST that failed with a connection error, a timeout, 429 or 5xx (after
    0.5 s, then twice as long each time). Default 2; then the batch is lost (counted ``failed``)."""

    batch_size: Count = 100
    """Most records in one POST, and in one write to stdout or the file. Default 100."""

    flush_interval: Duration = 1.0
    """Longest a record waits for a batch to fill before it is POSTed. Default ``1s``. Stdout and
    the file are written as soon as records arrive."""

    queue_size: Count = 10000
    """Most records each sink holds before it drops new ones (and counts them). Default 10000."""

    close_timeout: Duration = 5.0
    """How long ``aclose`` (a plan reload, the sidecar stopping) lets the sinks write what they
    hold; the rest is dropped and counted. Default ``5s``."""

    headers: tuple[str, ...] = ()
    """Request headers to record (case-insensitive), when the request has them. Default none.
    Names that may carry credentials (``authorization``, ``cookie``, ``x-api-key``, anything with
    ``auth``, ``token``, ``secret``, ``key``...) are refused."""

    read_model: bool = False
    """Make the sidecar read request bodies, so that ``model`` is the request's even when no other
    member of the chain reads them. Default false: the request's ``model`` when the body was read
    anyway, else the one the response names in its usage."""

    @field_validator("path")
    @classmethod
    def _path_is_a_path(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\0" in value):
            raise ValueError("path must be a non-empty file path")
        return value

    @field_validator("http_url")
    @classmethod
    def _http_url_is_an_endpoint(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(check_http_url(url, "http_url"))
        if parts.username is not None or parts.password is not None:
            # Not echoed: the user info is a credential.
            raise ValueError("http_url carries credentials; put them in http_headers (e.g. authorization)")
        return url

    @field_validator("http_headers")
    @classmethod
    def _http_headers_are_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            _header_name(name, "http_headers")
            if any(c in value for c in "\r\n\0"):
                # The value may be a credential: name the header, not the value.
                raise ValueError(f"value of header {name!r} contains a line break or NUL")
        return headers

    @field_validator("headers")
    @classmethod
    def _headers_are_harmless(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        checked = []
        for value in names:
            name = _header_name(value, "headers")
            if name in SECRET_HEADERS or any(part in name for part in SECRET_HEADER_PARTS):
                raise ValueError(
                    f"header {name!r} may carry a credential and is never recorded; "
                    "take it out of headers (the consumer an authentication plugin established is recorded)"
                )
            checked.append(name)
        return tuple(dict.fromkeys(checked))

    @model_validator(mode="after")
    def _settings_agree(self) -> AuditLogConfig:
        if self.sink == "file" and self.path is None:
            raise ValueError("sink 'file' needs path, e.g. '/var/log/pluginchain/audit.jsonl'")
        if self.sink != "file" and self.path is not None:
            raise ValueError(f"path is set but sink is {self.sink!r}; set sink: file to use it")
        if self.sink == "none" and self.http_url is None:
            raise ValueError("sink 'none' writes only to http_url, which is not set")
        if self.http_url is None and self.http_headers:
            raise ValueError("http_headers is set but http_url is not")
        return self


class AuditLog(Plugin):
    """Write one JSON record per request, once the exchange is over, to stdout, a file and/or an
    HTTP endpoint, without ever delaying or failing a request."""

    name = "audit_log"
    Config = AuditLogConfig
    stages = frozenset({Stage.PRE_REQUEST})
    supports_parallel = True
    reads_body = True
    """The request body, only with ``read_model: true``."""
    suspends = False

    config: AuditLogConfig

    def __init__(self, config: AuditLogConfig, settings: InstanceSettings):
        super().__init__(config, settings)
        self._sinks: list[_Sink] = []
        if config.sink == "stdout":
            self._sinks.append(_StdoutSink(self))
        elif config.sink == "file":
            assert config.path is not None
            self._sinks.append(_FileSink(self, config.path))
        if config.http_url is not None:
            self._sinks.append(_HttpSink(self, config.http_url))

    def needs(self) -> Needs:
        # response_headers turns on the response-headers phase, so that a chain without
        # post_request plugins still sees the status the upstream answered.
        return Needs(request_body=self.config.read_model, suspends=False, finish=True, response_headers=True)

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        return None  # Everything happens in finish, once the exchange is over.

    async def finish(self, ctx: PluginContext, data: PluginData) -> None:
        # No await in here: the record is queued, never waited for.
        line = json.dumps(self._record(ctx, data), ensure_ascii=False, separators=(",", ":"))
        for sink in self._sinks:
            sink.offer(line)

    async def aclose(self) -> None:
        await asyncio.gather(*(sink.aclose(self.config.close_timeout) for sink in self._sinks))

    def _record(self, ctx: PluginContext, data: PluginData) -> dict[str, Any]:
        exchange = data.exchange
        now = time.time()
        latency = time.monotonic() - exchange.started_at if exchange.started_at > 0 else None
        rejection = exchange.rejection
        if rejection is None:
            decision, plugin, code = "allowed", None, None
            status = _status(exchange.response)
        else:
            decision = "failed" if rejection.plugin_id is None else "rejected"
            plugin, code, status = rejection.plugin_id, rejection.code, rejection.status
        usage = exchange.usage
        record: dict[str, Any] = {
            "time": _iso(now - (latency or 0.0)),
            "request_id": exchange.request_id or None,
            "chain": ctx.chain,
            "consumer": data.consumer,
            "session": data.session,
            "model": _model(exchange),
            "decision": decision,
            "plugin": plugin,
            "code": code,
            "status": status,
            "latency_ms": round(latency * 1000, 3) if latency is not None else None,
            "usage": None if usage is None else {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
            },
        }
        if self.config.headers:
            request_headers = exchange.request.headers
            record["headers"] = {
                name: _without_query(request_headers[name]) if name == ":path" else request_headers[name]
                for name in self.config.headers
                if name in request_headers
            }
        return record


def _status(response: HttpMessage | None) -> int | None:
    status = response.headers.get(":status", "") if response is not None else ""
    return int(status) if status.isascii() and status.isdigit() else None


def _model(exchange: Exchange) -> str | None:
    """The request's ``model`` when its body was read, else the one the response's usage names."""
    model: object = None
    if exchange.request.body is not None:
        try:
            document = exchange.request.json()
        except BodyNotJSON:
            document = None
        if isinstance(document, dict):
            model = document.get("model")
    if not (isinstance(model, str) and model) and exchange.usage is not None:
        model = exchange.usage.model
    return model[:MAX_MODEL_CHARS] if isinstance(model, str) and model else None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _without_query(path: str) -> str:
    return path.split("?", 1)[0]


class _Sink(ABC):
    """One destination of the records: a bounded queue of encoded records, and the background
    task, started on the first record, that writes them in batches."""

    kind: ClassVar[str]
    linger: float = 0.0
    """Seconds a batch that is not full waits for more records before it is written."""

    def __init__(self, owner: AuditLog):
        self._chain = owner.settings.chain
        self._plugin = owner.id
        self._capacity = owner.config.queue_size
        self._batch_size = owner.config.batch_size
        self._queue: asyncio.Queue[object] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._counters: dict[str, Counter] = {}
        self._warnings = WarningSpacing(time.monotonic)

    def offer(self, line: str) -> None:
        """Queue ``line`` for writing, or drop and count it when the queue is full or closing."""
        if self._queue is None:
            if self._closing:
                self._count("dropped")
                return
            # Started on first use, in the event loop that serves requests.
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(self._queue))
        # The queue itself is unbounded so that aclose can always add its _STOP; the bound is here.
        if self._closing or self._queue.qsize() >= self._capacity:
            self._count("dropped")
            return
        self._queue.put_nowait(line)

    async def aclose(self, timeout: float) -> None:
        """Let the task write what the queue holds within ``timeout``; drop and count the rest."""
        self._closing = True
        queue, task = self._queue, self._task
        try:
            if queue is None or task is None:
                return
            queue.put_nowait(_STOP)
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            left = 0
            while not queue.empty():
                left += queue.get_nowait() is not _STOP
            if left:
                self._count("dropped", left)
                logger.warning(
                    "audit log %s sink: %d records still queued after close_timeout %gs were dropped", self.kind, left, timeout,
                    extra={"chain": self._chain, "plugin": self._plugin},
                )
        finally:
            await self._release()

    @abstractmethod
    async def _write(self, lines: list[str]) -> None:
        """Write one batch of encoded records; raise :class:`_SinkFailed` (or OSError) when it could not."""

    async def _release(self) -> None:
        """Close what the sink holds open (after its task has ended)."""

    async def _run(self, queue: asyncio.Queue[object]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            deadline = loop.time() + self.linger
            while len(batch) < self._batch_size:
                if queue.empty():
                    wait = deadline - loop.time()
                    if wait <= 0:
                        break
                    try:
                        async with asyncio.timeout(wait):
                            item = await queue.get()
                    except TimeoutError:
                        break
                else:
                    item = queue.get_nowait()
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            await self._deliver([line for line in batch if isinstance(line, str)])
            if stop:
                return

    async def _deliver(self, batch: list[str]) -> None:
        try:
            await self._write(batch)
        except asyncio.CancelledError:
            self._count("failed", len(batch))  # aclose gave up on it
            raise
        except Exception as error:  # _SinkFailed, OSError, or a bug: never the task's end
            self._count("failed", len(batch))
            suppressed = self._warnings.admit()
            if suppressed is not None:
                logger.warning(
                    "audit log %s sink failed, %d records lost: %s%s", self.kind, len(batch),
                    error if isinstance(error, _SinkFailed) else describe_error(error),
                    f" ({suppressed} similar warnings suppressed)" if suppressed else "",
                    extra={"chain": self._chain, "plugin": self._plugin},
                    exc_info=traceback_if_debug(logger, error),
                )
        else:
            self._count("written", len(batch))

    def _count(self, result: str, records: int = 1) -> None:
        # Bound on first use, not when built: a plan compiled only to be checked creates no series.
        counter = self._counters.get(result)
        if counter is None:
            counter = self._counters[result] = AUDIT_RECORDS.labels(self._chain, self._plugin, self.kind, result)
        counter.inc(records)


class _SinkFailed(Exception):
    """A sink could not take a batch; the message says why (never what the records held)."""


class _StdoutSink(_Sink):
    kind = "stdout"

    async def _write(self, lines: list[str]) -> None:
        await asyncio.to_thread(self._write_blocking, "".join(line + "\n" for line in lines))

    @staticmethod
    def _write_blocking(text: str) -> None:
        stream = sys.stdout  # looked up per write: tests and wrappers replace it
        stream.write(text)
        stream.flush()


class _FileSink(_Sink):
    kind = "file"

    def __init__(self, owner: AuditLog, path: str):
        super().__init__(owner)
        self._path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        """Held by the worker thread while it writes, so that the file is never closed under it."""

    async def _write(self, lines: list[str]) -> None:
        await asyncio.to_thread(self._write_blocking, "".join(line + "\n" for line in lines).encode())

    def _write_blocking(self, data: bytes) -> None:
        with self._lock:
            fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

    def _open(self) -> int:
        """The file's descriptor, reopened when the file at ``path`` was rotated away or removed."""
        if self._fd is not None:
            try:
                current = os.stat(self._path)
                opened = os.fstat(self._fd)
                if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        return self._fd

    async def _release(self) -> None:
        # A thread stuck in a write (a hung disk) keeps the descriptor; it is not closed under it.
        if self._lock.acquire(blocking=False):
            try:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
            finally:
                self._lock.release()


class _HttpSink(_Sink):
    kind = "http"

    def __init__(self, owner: AuditLog, url: str):
        super().__init__(owner)
        config = owner.config
        self.linger = config.flush_interval
        self._url = url
        self._safe_url = safe_endpoint(url)
        """For messages: no user info or query, which may hold a token."""
        self._timeout = config.http_timeout
        self._retries = config.http_retries
        self._headers = {"content-type": "application/json", "user-agent": "pluginchain-audit-log", **config.http_headers}
        self._client: httpx.AsyncClient | None = None

    async def _write(self, lines: list[str]) -> None:
        if self._client is None:
            # Built in the sink's task, inside the event loop; connections are kept alive.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                headers=self._headers,
                follow_redirects=False,
                # Proxy variables of the sidecar's environment must not reroute the records.
                trust_env=False,
            )
        body = ("[" + ",".join(lines) + "]").encode()
        attempts = 0
        while True:
            attempts += 1
            last_error: Exception | None
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._client.post(self._url, content=body)
            except TimeoutError as error:
                cause, retry, last_error = f"no answer within {self._timeout:g}s", True, error
            except httpx.TransportError as error:
                cause, retry, last_error = describe_error(error, self._url), True, error
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return
                cause, retry, last_error = f"HTTP {status}", status == 429 or status >= 500, None
            if not retry or attempts > self._retries:
                # The transport error is chained for the DEBUG traceback; the message says enough.
                raise _SinkFailed(f"POST {self._safe_url} failed after {attempts} attempt(s): {cause}") from last_error
            await asyncio.sleep(_RETRY_BACKOFF * 2 ** (attempts - 1))

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
