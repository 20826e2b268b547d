"""The sidecar's side of ConfigService: the operator pushes whole chain sets here.

A push is trusted only with the bearer token from the mounted Secret; it is validated with the
same models as a chain file, compiled, written to the state file, and only then swapped in, so
that what serves is always what a restart would resume with. Anything that goes wrong refuses
the push and leaves the serving plan, its version and the state file as they were.

Status codes are decided in one place, :class:`ConfigGuard`, from :class:`Refused`:
UNAUTHENTICATED (no or wrong token), INVALID_ARGUMENT (the chains do not validate; one error per
line), FAILED_PRECONDITION (an older version, or the active version with other chains), INTERNAL
(the state file cannot be written).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from pluginchain._config.issues import ConfigError, ConfigIssue
from pluginchain._config.models import ValidatedChain
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import missing_default_chain
from pluginchain._config.wire import chain_to_wire, validate_chain_set, wire_sources
from pluginchain._engine.plan import Plan
from pluginchain._metrics import PUSHES
from pluginchain._sidecar.plans import PlanHolder, serving_plan
from pluginchain.v1 import config_pb2, config_pb2_grpc

logger = logging.getLogger("pluginchain.config")

SERVICE_NAME = config_pb2.DESCRIPTOR.services_by_name["ConfigService"].full_name
STATE_FILE_KIND = "pluginchain.v1.ChainSet"

# gRPC carries `details` in a trailer; clients refuse trailers over 8 KiB by default, and a
# refusal the operator cannot read is worse than a shortened one.
_MAX_DETAILS_CHARS = 6000



class Refused(Exception):
    """A call that must fail with ``code``; nothing has changed. ``result`` labels the metric."""

    def __init__(self, code: grpc.StatusCode, details: str, result: str):
        super().__init__(details)
        self.code = code
        self.details = details
        self.result = result


# --- Authentication ----------------------------------------------------------------------------


class TokenFile:
    """The push token, read from a mounted Secret and re-read whenever the file changes.

    Kubernetes rotates a mounted Secret by swapping a symlink to a new file, so the file's
    identity (inode, mtime, size) is checked on every call, which costs one ``stat``. A missing,
    unreadable or empty file means no token: every call is refused, never let through.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._identity: tuple[int, ...] | None = None
        self._token: bytes | None = None
        self._problem: str | None = None

    def token(self) -> bytes | None:
        try:
            stat = os.stat(self.path)
        except OSError as error:
            self._forget(f"cannot be read: {error.strerror or error}")
            return None
        identity = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if identity != self._identity:
            try:
                token = self.path.read_bytes().strip()
            except OSError as error:
                self._forget(f"cannot be read: {error.strerror or error}")
                return None
            self._identity = identity
            if not token:
                self._forget("is empty")
                return None
            self._token = token
            if self._problem is not None:
                logger.info("push token file %s is usable again", self.path)
            self._problem = None
        return self._token

    def _forget(self, problem: str) -> None:
        self._identity = None
        self._token = None
        # Logged once per change of problem, not once per refused call.
        if problem != self._problem:
            logger.error("push token file %s %s; refusing every ConfigService call", self.path, problem)
        self._problem = problem

    def authenticate(self, metadata: Any) -> None:
        """Raise :class:`Refused` unless ``metadata`` carries ``authorization: Bearer <token>``."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        expected = self.token()
        if len(values) != 1:
            raise _unauthenticated("no bearer token" if not values else "more than one authorization header")
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, presented = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise _unauthenticated("the authorization is not `Bearer <token>`")
        if expected is None:
            raise _unauthenticated("the sidecar has no usable push token")
        # Constant time, so the comparison does not reveal how much of a guess was right.
        if not hmac.compare_digest(presented.strip().encode(), expected):
            raise _unauthenticated("wrong token")


def _unauthenticated(reason: str) -> Refused:
    return Refused(grpc.StatusCode.UNAUTHENTICATED, f"ConfigService call refused: {reason}", "unauthenticated")


class ConfigGuard(grpc.aio.ServerInterceptor):
    """Authenticates every ConfigService call and turns :class:`Refused` into its status code.

    The ConfigService runs on its own server, so this sees health checks too; those pass without
    a token (the kubelet probes them), everything of ConfigService needs one.
    """

    def __init__(self, token: TokenFile):
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        inner = handler.unary_unary
        if inner is None:
            # A streaming method added to the proto must be guarded on purpose, not by accident.
            raise TypeError(f"ConfigGuard handles unary methods only, not {method}")
        token = self._token
        is_apply = method.endswith("/Apply")

        async def guarded(request, context: grpc.aio.ServicerContext):
            try:
                token.authenticate(context.invocation_metadata())
                response = await inner(request, context)
            except Refused as error:
                refused = error
            except Exception:
                logger.exception("ConfigService %s failed", method)
                refused = Refused(grpc.StatusCode.INTERNAL, "internal error in the sidecar; see its log", "failed")
            else:
                if is_apply:
                    PUSHES.labels("applied" if response.changed else "unchanged").inc()
                return response
            if refused.result == "unauthenticated":
                # Never the token itself, only who tried and why it failed.
                logger.warning("refused %s from %s: %s", method, context.peer(), refused.details)
            if is_apply:
                PUSHES.labels(refused.result).inc()
            await context.abort(refused.code, refused.details)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


# --- Chain sets and chain documents ------------------------------------------------------------


@dataclass(frozen=True)
class ActiveConfig:
    """What serves now, as ConfigService reports it."""

    chain_set: config_pb2.ChainSet
    origin: str
    """``push``, ``state-file``, ``config-file`` or ``empty``."""
    fingerprint: str
    """The chains' meaning, for telling a repeated push from a conflicting one."""

    @property
    def version(self) -> int:
        return self.chain_set.version

    @classmethod
    def empty(cls) -> ActiveConfig:
        return cls(config_pb2.ChainSet(version=0), "empty", fingerprint({}, {}))

    @classmethod
    def from_file(cls, chains: Mapping[str, ValidatedChain], path: Path) -> ActiveConfig:
        source = f"file {path}"
        chain_set = config_pb2.ChainSet(version=0, chains=[chain_to_wire(chain, source) for chain in chains.values()])
        return cls(chain_set, "config-file", fingerprint(chains, {name: source for name in chains}))


def fingerprint(chains: Mapping[str, ValidatedChain], sources: Mapping[str, str]) -> str:
    """The chains' meaning as one string: equal for pushes that differ only in spelling
    (an unset field vs. its default, whitespace in config_json, the order of chains)."""
    content = {
        name: {
            "source": sources.get(name, ""),
            "plugins": [
                {**p.entry.model_dump(mode="json"), "id": p.entry.instance_id} for p in chain.plugins
            ],
        }
        for name, chain in chains.items()
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)


# --- The state file ----------------------------------------------------------------------------


class StateFileError(Exception):
    """A state file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Restored:
    chain_set: config_pb2.ChainSet
    chains: dict[str, ValidatedChain]
    plan: Plan

    def active(self) -> ActiveConfig:
        return ActiveConfig(self.chain_set, "state-file", fingerprint(self.chains, wire_sources(self.chain_set)))


class StateFile:
    """The last applied chain set on disk, so a restarted sidecar resumes before the operator
    reaches it. Written atomically (temporary file, fsync, rename, fsync of the directory) with
    mode 0600: plugin configs may hold credentials, e.g. an external validator's headers."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def restore(self, registry: PluginRegistry) -> Restored | None:
        """The chain set the file holds, validated and compiled; None when there is no file yet.
        Raise :class:`StateFileError` when it exists but cannot be used."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise StateFileError(f"state file {self.path} cannot be read: {error}") from None
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or document.get("kind") != STATE_FILE_KIND:
                raise ValueError(f"expected an object with kind {STATE_FILE_KIND!r}")
            if not isinstance(document.get("chain_set"), dict):
                raise ValueError("`chain_set` is missing or not an object")
            chain_set = json_format.ParseDict(document["chain_set"], config_pb2.ChainSet())
        except (ValueError, TypeError, json_format.ParseError) as error:
            raise StateFileError(f"state file {self.path} is not a saved chain set: {error}") from None
        if chain_set.version == 0:
            raise StateFileError(f"state file {self.path} holds no version")
        try:
            chains = validate_chain_set(chain_set, registry)
            plan = serving_plan(chains, registry)
        except ConfigError as error:
            # E.g. a custom plugin that is no longer installed.
            raise StateFileError(
                f"state file {self.path} (version {chain_set.version}) does not validate: "
                + "; ".join(str(issue) for issue in error.issues)
            ) from None
        return Restored(chain_set, chains, plan)

    def write(self, chain_set: config_pb2.ChainSet) -> None:
        """Replace the file with ``chain_set``, atomically; raise OSError if that fails."""
        document = {
            "kind": STATE_FILE_KIND,
            "chain_set": json_format.MessageToDict(chain_set, preserving_proto_field_name=True),
        }
        data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
        directory = self.path.parent
        # mkstemp creates the file with mode 0600, in the same directory so the rename is atomic.
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        # The rename itself survives a power cut only once the directory is on disk too.
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


# --- The service -------------------------------------------------------------------------------


class ConfigService(config_pb2_grpc.ConfigServiceServicer):
    """Apply and Get; authentication and status codes are :class:`ConfigGuard`'s."""

    def __init__(
        self,
        plans: PlanHolder,
        registry: PluginRegistry,
        active: ActiveConfig,
        state_file: StateFile | None,
        on_applied: Callable[[], Awaitable[None]] | None = None,
    ):
        self._plans = plans
        self._registry = registry
        self._state_file = state_file
        self._on_applied = on_applied
        self.active = active

    async def Apply(self, request: config_pb2.ApplyRequest, context) -> config_pb2.ApplyResponse:
        # Everything from the version check to the swap is synchronous: two pushes cannot
        # interleave, and a call cancelled by its deadline cannot stop half-way. Writing the small
        # state file (with its fsync) blocks the loop briefly, as compiling a plan does anyway.
        chain_set = request.chain_set
        version = chain_set.version
        active = self.active
        if version == 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "chain_set.version must be at least 1", "invalid")
        if version < active.version:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"version {version} is older than the active version {active.version}; nothing changed",
                "stale",
            )
        try:
            chains = validate_chain_set(chain_set, self._registry)
        except ConfigError as error:
            raise _invalid_push(error, version, active.version) from None
        pushed_fingerprint = fingerprint(chains, wire_sources(chain_set))
        if version == active.version:
            if pushed_fingerprint == active.fingerprint:
                return config_pb2.ApplyResponse(active_version=version, changed=False)
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"version {version} is already active with different chains; push them as a newer version",
                "stale",
            )
        try:
            plan = serving_plan(chains, self._registry)
        except ConfigError as error:
            raise _invalid_push(error, version, active.version) from None
        saved = config_pb2.ChainSet()
        saved.CopyFrom(chain_set)
        if self._state_file is not None:
            # Before the swap: if this fails, nothing serves that a restart would not resume.
            try:
                self._state_file.write(saved)
            except OSError as error:
                await plan.aclose()
                logger.error("push of version %d refused: cannot write state file %s: %s", version, self._state_file.path, error)
                raise Refused(
                    grpc.StatusCode.INTERNAL,
                    f"cannot write the state file {self._state_file.path}: {error.strerror or error}; "
                    f"version {active.version} still serves",
                    "failed",
                ) from None
        self._plans.replace(plan, version=version)
        self.active = ActiveConfig(saved, "push", pushed_fingerprint)
        logger.info(
            "applied pushed version %d (was %d, %s): chains %s",
            version, active.version, active.origin, ", ".join(chains) or "none",
        )
        # Not refused: a pushed set grows one PluginChain at a time, and routes may all name theirs.
        missing_default = missing_default_chain(chains)
        if missing_default is not None:
            logger.warning("pushed version %d has %s", version, missing_default)
        if self._on_applied is not None:
            await self._on_applied()
        return config_pb2.ApplyResponse(active_version=version, changed=True)

    async def Get(self, request: config_pb2.GetRequest, context) -> config_pb2.GetResponse:
        return config_pb2.GetResponse(chain_set=self.active.chain_set, origin=self.active.origin)


def _invalid_push(error: ConfigError, version: int, active_version: int) -> Refused:
    logger.error("push of version %d refused, keeping version %d:\n%s", version, active_version, error.render())
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, _issue_lines(error.issues), "invalid")


def _issue_lines(issues: list[ConfigIssue]) -> str:
    """Every issue on its own line, cut short (saying how much) if it would not fit a trailer."""
    lines: list[str] = []
    used = 0
    for index, issue in enumerate(issues):
        line = str(issue)
        if used + len(line) + 1 > _MAX_DETAILS_CHARS:
            lines.append(f"... and {len(issues) - index} more errors")
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join(lines)
