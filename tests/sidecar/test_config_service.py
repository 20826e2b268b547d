"""ConfigService over real gRPC: pushes change what ext_proc does, and every refused push (no or
wrong token, older version, invalid chains) changes nothing; the state file brings the last good
plan back after a restart; mTLS and token rotation."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluginchain._sidecar.server import EXT_PROC_SERVICE, Sidecar, SidecarSettings
from pluginchain.cli import main
from pluginchain.v1 import config_pb2, config_pb2_grpc
from tests.support.extproc import PLUGINS, request_headers

Mode = processing_mode_pb2.ProcessingMode
TOKEN = "push-token-for-tests-0123456789"
FILTER = {"default": [{"name": "content_filter", "config": {"banned_patterns": ["forbidden"]}}]}
STAMP_YAML = "plugins: [{name: stamp, config: {value: from-file}}]"


def entry(name: str, config: dict | None = None, **fields) -> config_pb2.PluginEntry:
    return config_pb2.PluginEntry(name=name, config_json=json.dumps(config or {}), **fields)


def chain_set(version: int, chains: dict[str, list[dict]]) -> config_pb2.ChainSet:
    return config_pb2.ChainSet(version=version, chains=[
        config_pb2.Chain(name=name, source=f"test {name}", plugins=[entry(**p) for p in plugins])
        for name, plugins in chains.items()
    ])


def stamp(value: str) -> dict[str, list[dict]]:
    return {"default": [{"name": "stamp", "config": {"value": value}}]}


@dataclass
class Pushable:
    """An in-process push-mode sidecar, its ext_proc stub, and an authorised ConfigService client."""

    sidecar: Sidecar
    extproc: pb_grpc.ExternalProcessorStub
    config: config_pb2_grpc.ConfigServiceStub
    token_file: Path

    async def apply(self, chains: config_pb2.ChainSet, token: str | None = TOKEN) -> config_pb2.ApplyResponse:
        return await self.config.Apply(config_pb2.ApplyRequest(chain_set=chains), metadata=auth(token), timeout=5)

    async def get(self, token: str | None = TOKEN) -> config_pb2.GetResponse:
        return await self.config.Get(config_pb2.GetRequest(), metadata=auth(token), timeout=5)

    async def status_for(self, text: str = "hello", chain: str | None = None) -> int:
        """What ext_proc answers a chat request: the ImmediateResponse status, or 200 to go on."""
        answers = await self.send(text, chain)
        last = answers[-1]
        return last.immediate_response.status.code if last.HasField("immediate_response") else 200

    async def stamp(self) -> str | None:
        [answer] = await self.send(None)
        for option in answer.request_headers.response.header_mutation.set_headers:
            if option.header.key == "x-pluginchain-stamp":
                return option.header.raw_value.decode()
        return None

    async def send(self, text: str | None, chain: str | None = None) -> list[pb.ProcessingResponse]:
        metadata = (("x-pluginchain-chain", chain),) if chain else ()
        call = self.extproc.Process(metadata=metadata)
        await call.write(request_headers(end_of_stream=text is None, content_type="application/json"))
        answers = [await call.read()]
        first = answers[0]
        if text is not None and not first.HasField("immediate_response") and first.mode_override.request_body_mode == Mode.BUFFERED:
            body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
            answers.append(await call.read())
        await call.done_writing()
        return answers


def auth(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "secret" / "token"
    path.parent.mkdir()
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
async def start_pushable(tmp_path, token_file):
    started: list[Sidecar] = []
    channels: list[grpc.aio.Channel] = []

    async def start(chain_yaml: str | None = None, *, credentials: grpc.ChannelCredentials | None = None, **settings) -> Pushable:
        config = None
        if chain_yaml is not None:
            config = tmp_path / "chain.yaml"
            config.write_text(chain_yaml)
        settings = {"state_file": tmp_path / "state.json", "token_file": token_file, **settings}
        sidecar = Sidecar(SidecarSettings(
            config=config, plugin_modules=PLUGINS, port=0, metrics_port=None, grace=2,
            config_host="127.0.0.1", config_port=0, **settings,
        ))
        await sidecar.start()
        started.append(sidecar)
        extproc = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
        target = f"127.0.0.1:{sidecar.config_port}"
        control = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        channels.extend([extproc, control])
        return Pushable(sidecar, pb_grpc.ExternalProcessorStub(extproc), config_pb2_grpc.ConfigServiceStub(control), settings["token_file"])

    yield start
    for channel in channels:
        await channel.close()
    for sidecar in started:
        await sidecar.drain()


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


async def test_a_pushed_chain_set_changes_what_ext_proc_does(start_pushable, tmp_path):
    pushable = await start_pushable(STAMP_YAML)
    before = await pushable.get()
    assert (before.origin, before.chain_set.version) == ("config-file", 0)
    assert [p.name for p in before.chain_set.chains[0].plugins] == ["stamp"]
    assert await pushable.stamp() == "from-file"

    pushed = chain_set(5, {**FILTER, "premium": [{"name": "stamp", "config": {"value": "premium"}}]})
    reply = await pushable.apply(pushed)
    assert (reply.active_version, reply.changed) == (5, True)

    assert await pushable.status_for("something forbidden") == 403
    assert await pushable.status_for("something fine") == 200
    [premium] = await pushable.send(None, chain="premium")
    assert premium.request_headers.response.header_mutation.set_headers[0].header.raw_value == b"premium"
    now = await pushable.get()
    assert now.origin == "push"
    assert now.chain_set == pushed
    state = tmp_path / "state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["chain_set"]["version"] == "5"


async def test_a_pushed_set_without_a_default_chain_is_applied_with_a_warning_naming_the_consequence(start_pushable, caplog):
    pushable = await start_pushable()
    plugins = [entry("stamp", {"value": "premium"})]
    reply = await pushable.apply(config_pb2.ChainSet(version=1, chains=[config_pb2.Chain(name="premium", plugins=plugins)]))
    assert reply.changed
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "pluginchain.config"]
    assert "pushed version 1 has no chain named 'default' (chains defined: 'premium')" in warning
    assert "500 unknown_chain" in warning
    [unrouted] = await pushable.send(None)
    assert unrouted.immediate_response.status.code == 500


async def test_an_entry_without_enabled_runs_like_a_chain_file_entry(start_pushable):
    pushable = await start_pushable()
    plugins = [entry("stamp", {"value": "on"}), entry("stamp", {"header": "x-off"}, id="off", enabled=False)]
    await pushable.apply(config_pb2.ChainSet(version=1, chains=[config_pb2.Chain(name="default", plugins=plugins)]))
    [answer] = await pushable.send(None)
    keys = {o.header.key for o in answer.request_headers.response.header_mutation.set_headers}
    assert "x-pluginchain-stamp" in keys and "x-off" not in keys


@pytest.mark.parametrize("token", [None, "wrong-token", "", f"{TOKEN}x"], ids=["none", "wrong", "empty", "longer"])
async def test_a_push_without_the_right_token_is_refused_and_changes_nothing(start_pushable, tmp_path, caplog, token):
    pushable = await start_pushable()
    await pushable.apply(chain_set(3, FILTER))
    state_before = (tmp_path / "state.json").read_bytes()

    error = await refused(pushable.apply(chain_set(10**12, {"default": []}), token=token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await refused(pushable.get(token=token))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await pushable.get()).chain_set.version == 3
    assert await pushable.status_for("forbidden words") == 403
    assert (tmp_path / "state.json").read_bytes() == state_before
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("metadata", [
    (("authorization", f"Basic {TOKEN}"),),
    (("authorization", TOKEN),),
    (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")),
], ids=["basic-scheme", "no-scheme", "two-headers"])
async def test_only_one_bearer_authorization_counts(start_pushable, metadata):
    pushable = await start_pushable()
    call = pushable.config.Apply(config_pb2.ApplyRequest(chain_set=chain_set(1, FILTER)), metadata=metadata, timeout=5)
    assert (await refused(call)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await pushable.get()).origin == "empty"


async def test_an_older_version_is_refused_naming_both(start_pushable):
    pushable = await start_pushable()
    await pushable.apply(chain_set(10, FILTER))
    error = await refused(pushable.apply(chain_set(9, stamp("older"))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 9" in error.details() and "version 10" in error.details()
    assert (await pushable.get()).chain_set.version == 10
    assert await pushable.status_for("forbidden") == 403


async def test_the_active_version_again_is_a_no_op_unless_its_chains_differ(start_pushable, tmp_path):
    pushable = await start_pushable()
    await pushable.apply(chain_set(4, FILTER))
    state = tmp_path / "state.json"
    written = state.stat().st_mtime_ns

    again = await pushable.apply(chain_set(4, FILTER))
    assert (again.active_version, again.changed) == (4, False)
    # The same chains spelled differently: explicit defaults, other JSON whitespace.
    respelled = config_pb2.ChainSet(version=4, chains=[config_pb2.Chain(name="default", source="test default", plugins=[
        config_pb2.PluginEntry(name="content_filter", enabled=True, stage="pre_request", on_error="fail_closed",
                               timeout_seconds=5, config_json='{ "banned_patterns" : ["forbidden"] }'),
    ])])
    assert (await pushable.apply(respelled)).changed is False
    assert state.stat().st_mtime_ns == written

    error = await refused(pushable.apply(chain_set(4, stamp("different"))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already active with different chains" in error.details()
    assert await pushable.status_for("forbidden") == 403

    zero = await refused(pushable.apply(chain_set(0, stamp("zero"))))
    assert zero.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await pushable.get()).chain_set.version == 4


async def test_an_invalid_chain_set_is_refused_with_every_error_and_the_old_plan_serves(start_pushable, tmp_path):
    pushable = await start_pushable()
    await pushable.apply(chain_set(1, FILTER))
    state_before = (tmp_path / "state.json").read_bytes()
    bad = config_pb2.ChainSet(version=2, chains=[
        config_pb2.Chain(name="default", plugins=[
            entry("content_filter", {"banned_patterns": ["(unclosed"]}),
            entry("rate_limiter", parallel=True),
            entry("nope"),
            config_pb2.PluginEntry(name="content_filter", id="second", config_json="{not json"),
            entry("stamp", id="never", timeout_seconds=float("nan")),
        ]),
        config_pb2.Chain(name="default"),
        config_pb2.Chain(name="Bad Name"),
    ])
    error = await refused(pushable.apply(bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = error.details().splitlines()
    expected = [
        "chains[1].name: duplicate chain name 'default' (also chains[0])",
        "chains.default[3] (second).config_json: not valid JSON",
        "chains.default[0] (content_filter).config.banned_patterns[0]: not a valid RE2 pattern: missing )",
        "chains.default[1] (rate_limiter).parallel: rate_limiter does not support parallel execution",
        "chains.default[2] (nope).name: unknown plugin 'nope'",
        "chains.Bad Name: chain name 'Bad Name' must be",
        "chains.default[4] (never).timeout_seconds: must be a finite number of seconds, got nan",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, lines)
    # Exactly these: no echo of what an unparsable config_json "misses".
    assert len(lines) == len(expected), lines

    assert (await pushable.get()).chain_set.version == 1
    assert await pushable.status_for("forbidden") == 403
    assert (tmp_path / "state.json").read_bytes() == state_before


async def test_a_restarted_sidecar_resumes_its_last_pushed_plan_before_any_push(start_pushable):
    first = await start_pushable(STAMP_YAML)
    pushed = chain_set(7, FILTER)
    await first.apply(pushed)
    await first.sidecar.drain()

    second = await start_pushable(STAMP_YAML)
    resumed = await second.get()
    assert (resumed.origin, resumed.chain_set) == ("state-file", pushed)
    assert await second.status_for("forbidden") == 403
    assert second.sidecar.plans.version == 7
    assert (await second.apply(chain_set(7, FILTER))).changed is False
    assert (await refused(second.apply(chain_set(6, stamp("older"))))).code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_state_file_is_replaced_whole_never_written_in_place(start_pushable, tmp_path):
    pushable = await start_pushable(STAMP_YAML)
    await pushable.apply(chain_set(1, stamp("one")))
    state = tmp_path / "state.json"
    first_version = tmp_path / "first-version.json"
    os.link(state, first_version)  # a second name for the file version 1 was written to
    reads: list[bytes] = []
    stop = False

    def read_while_pushing() -> None:
        while not stop:
            reads.append(state.read_bytes())

    reader = asyncio.get_running_loop().run_in_executor(None, read_while_pushing)
    try:
        for version in range(2, 52):
            await pushable.apply(chain_set(version, stamp(f"value {version} " + "x" * 4000)))
    finally:
        stop = True
        await reader
    # Every read found a whole chain set: a reader (a restarting sidecar) never sees half a file.
    versions = {json.loads(read)["chain_set"]["version"] for read in reads}
    assert len(versions) > 1
    # The file of version 1 was never written again: each push wrote a new file and renamed it.
    assert json.loads(first_version.read_text())["chain_set"]["version"] == "1"
    assert json.loads(state.read_text())["chain_set"]["version"] == "51"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chain.yaml", "first-version.json", "secret", "state.json"]


async def test_pushes_keep_each_limiters_state_and_never_share_it(start_pushable):
    pushable = await start_pushable()

    def limiter(**entry) -> dict:
        return {"name": "rate_limiter", "config": {"limit": 2, "window": "1h"}, **entry}

    async def statuses(chain: str, count: int) -> list[int]:
        return [await pushable.status_for(chain=chain) for _ in range(count)]

    await pushable.apply(chain_set(1, {"default": [limiter()], "premium": [limiter()]}))
    assert await statuses("default", 3) == [200, 200, 429]
    # Another chain's entry of the same id has a bucket of its own.
    await pushable.apply(chain_set(2, {"default": [limiter(priority=1), *FILTER["default"]], "premium": [limiter()]}))
    assert await statuses("default", 1) == [429]
    assert await statuses("premium", 3) == [200, 200, 429]
    # Another id, or another key form, is another limiter: it starts with a full bucket.
    per_key = limiter(config={"limit": 2, "window": "1h", "key": "header:x-api-key"})
    await pushable.apply(chain_set(3, {"default": [limiter(id="hourly")], "premium": [per_key]}))
    assert await statuses("default", 3) == [200, 200, 429]
    assert await statuses("premium", 3) == [200, 200, 429]


@pytest.mark.parametrize("content", [
    "{not json",
    '{"kind": "something.Else", "chain_set": {}}',
    '{"kind": "pluginchain.v1.ChainSet"}',
    '{"kind": "pluginchain.v1.ChainSet", "chain_set": {"version": "2", "extra": 1}}',
    '{"kind": "pluginchain.v1.ChainSet", "chain_set": {"version": "3", "chains": [{"name": "default", "plugins": [{"name": "gone"}]}]}}',
], ids=["not-json", "not-a-chain-set", "no-chain-set", "unknown-field", "does-not-validate"])
@pytest.mark.parametrize("chain_yaml", [STAMP_YAML, None], ids=["with-config", "without-config"])
async def test_an_unusable_state_file_is_reported_and_ignored(start_pushable, tmp_path, caplog, content, chain_yaml):
    state = tmp_path / "state.json"
    state.write_text(content)
    with caplog.at_level(logging.ERROR, logger="pluginchain"):
        pushable = await start_pushable(chain_yaml)
    assert any(str(state) in r.getMessage() and "ignoring it" in r.getMessage() for r in caplog.records), caplog.text
    active = await pushable.get()
    assert active.chain_set.version == 0
    if chain_yaml is None:
        assert active.origin == "empty"
        [answer] = await pushable.send(None)
        assert answer.immediate_response.status.code == 500
        assert b"unknown plugin chain" in answer.immediate_response.body
    else:
        assert active.origin == "config-file"
        assert await pushable.stamp() == "from-file"
    # The next push replaces the unusable file.
    await pushable.apply(chain_set(1, FILTER))
    assert json.loads(state.read_text())["chain_set"]["version"] == "1"


async def test_a_rotated_token_takes_effect_without_a_restart(start_pushable, token_file):
    pushable = await start_pushable()
    await pushable.apply(chain_set(1, FILTER))
    # As the kubelet updates a mounted Secret: a new file swapped in, not an edit in place.
    fresh = token_file.with_name("token.new")
    fresh.write_text("rotated-token-abcdef\n")
    os.replace(fresh, token_file)

    assert (await refused(pushable.apply(chain_set(2, stamp("old token"))))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await pushable.apply(chain_set(3, stamp("new token")), token="rotated-token-abcdef")).changed
    assert await pushable.stamp() == "new token"


@pytest.mark.parametrize("problem", ["empty", "missing"])
async def test_without_a_usable_token_file_every_push_is_refused(start_pushable, token_file, caplog, problem):
    if problem == "empty":
        token_file.write_text("\n")
    else:
        token_file.unlink()
    pushable = await start_pushable(STAMP_YAML)
    for token in (TOKEN, "", None):
        error = await refused(pushable.apply(chain_set(1, FILTER), token=token))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await pushable.stamp() == "from-file"
    assert str(token_file) in caplog.text
    # Once the Secret is there, pushes work.
    token_file.write_text(TOKEN)
    assert (await pushable.apply(chain_set(1, FILTER))).changed


async def test_an_in_flight_request_finishes_on_the_plan_it_started_with(start_pushable):
    pushable = await start_pushable("plugins: [{name: slow, config: {seconds: 0.6}}, {name: stamp, config: {value: old}}]")
    call = pushable.extproc.Process()
    await call.write(request_headers(end_of_stream=True))
    await asyncio.sleep(0.15)  # now inside the slow plugin of the old plan

    reply = await asyncio.wait_for(pushable.apply(chain_set(1, stamp("new"))), timeout=0.3)
    assert reply.changed
    assert await asyncio.wait_for(pushable.stamp(), timeout=0.3) == "new"

    answer = await call.read()
    await call.done_writing()
    [header] = answer.request_headers.response.header_mutation.set_headers[:1]
    assert header.header.raw_value == b"old"


async def test_an_empty_chain_set_fails_every_request_closed(start_pushable):
    pushable = await start_pushable(STAMP_YAML)
    assert (await pushable.apply(config_pb2.ChainSet(version=1))).changed
    [answer] = await pushable.send(None)
    assert answer.immediate_response.status.code == 500
    assert (await pushable.get()).chain_set.chains == []


async def test_a_state_file_that_cannot_be_written_refuses_the_push(start_pushable, tmp_path):
    pushable = await start_pushable(STAMP_YAML)
    (tmp_path / "state.json").mkdir()  # the rename onto it now fails
    error = await refused(pushable.apply(chain_set(1, FILTER)))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "state file" in error.details()
    assert (await pushable.get()).origin == "config-file"
    assert await pushable.stamp() == "from-file"
    assert [p.name for p in (tmp_path / "state.json").iterdir()] == []  # no temporary file left behind


async def test_health_answers_without_a_token_and_drain_stops_the_config_port(start_pushable):
    pushable = await start_pushable(STAMP_YAML)
    address = f"127.0.0.1:{pushable.sidecar.config_port}"
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pluginchain.v1.ConfigService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await pushable.sidecar.drain()
    error = await refused(pushable.get())
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status


async def _readiness(sidecar: Sidecar) -> dict[str, int]:
    """ext_proc's health as each of the sidecar's ports reports it; "" is the process's liveness."""
    return {
        "ext_proc port": await _health(sidecar.port, EXT_PROC_SERVICE),
        "config port": await _health(sidecar.config_port, EXT_PROC_SERVICE),
        "liveness": await _health(sidecar.port, ""),
    }


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_sidecar_without_chains_is_live_but_not_ready_until_the_first_push(start_pushable):
    pushable = await start_pushable()
    assert await _readiness(pushable.sidecar) == {"ext_proc port": NOT_SERVING, "config port": NOT_SERVING, "liveness": SERVING}

    await pushable.apply(chain_set(1, stamp("pushed")))

    assert await _readiness(pushable.sidecar) == {"ext_proc port": SERVING, "config port": SERVING, "liveness": SERVING}


async def test_a_refused_push_leaves_an_unconfigured_sidecar_unready(start_pushable):
    pushable = await start_pushable()
    await refused(pushable.apply(chain_set(1, {"default": [{"name": "no_such_plugin"}]})))
    await refused(pushable.apply(chain_set(1, stamp("pushed")), token="wrong"))
    assert (await _readiness(pushable.sidecar))["ext_proc port"] == NOT_SERVING


async def test_a_sidecar_resuming_its_state_file_or_given_a_chain_file_is_ready_at_once(start_pushable, tmp_path):
    first = await start_pushable()
    await first.apply(chain_set(3, stamp("pushed")))
    await first.sidecar.drain()

    resumed = await start_pushable()
    assert (await resumed.get()).origin == "state-file"
    assert (await _readiness(resumed.sidecar))["ext_proc port"] == SERVING

    from_file = await start_pushable(STAMP_YAML, state_file=None)
    assert (await from_file.get()).origin == "config-file"
    assert (await _readiness(from_file.sidecar))["config port"] == SERVING


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Path | bytes]:
    directory = tmp_path_factory.mktemp("tls")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": directory / "server.pem", "key": directory / "server.key", "ca": directory / "ca.pem"}
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    client, foreign = ca.issue_cert("operator.pluginchain.test"), stranger.issue_cert("operator.pluginchain.test")
    return {
        **files,
        "ca_pem": ca.cert_pem.bytes(),
        "client_key": client.private_key_pem.bytes(), "client_cert": client.cert_chain_pems[0].bytes(),
        "foreign_key": foreign.private_key_pem.bytes(), "foreign_cert": foreign.cert_chain_pems[0].bytes(),
    }


async def test_with_mtls_only_a_client_certificate_from_the_ca_gets_through(start_pushable, tls):
    good = grpc.ssl_channel_credentials(tls["ca_pem"], tls["client_key"], tls["client_cert"])
    pushable = await start_pushable(
        STAMP_YAML, credentials=good, tls_cert=tls["cert"], tls_key=tls["key"], tls_client_ca=tls["ca"],
    )
    assert (await pushable.apply(chain_set(1, FILTER))).changed
    # The certificate does not replace the token.
    assert (await refused(pushable.apply(chain_set(2, stamp("no token")), token=None))).code() == grpc.StatusCode.UNAUTHENTICATED

    target = f"127.0.0.1:{pushable.sidecar.config_port}"
    others = {
        "no client certificate": grpc.ssl_channel_credentials(tls["ca_pem"]),
        "another CA's certificate": grpc.ssl_channel_credentials(tls["ca_pem"], tls["foreign_key"], tls["foreign_cert"]),
    }
    for what, credentials in others.items():
        async with grpc.aio.secure_channel(target, credentials) as channel:
            stub = config_pb2_grpc.ConfigServiceStub(channel)
            call = stub.Apply(config_pb2.ApplyRequest(chain_set=chain_set(3, stamp(what))), metadata=auth(TOKEN), timeout=5)
            assert (await refused(call)).code() == grpc.StatusCode.UNAVAILABLE, what
    async with grpc.aio.insecure_channel(target) as channel:
        call = config_pb2_grpc.ConfigServiceStub(channel).Get(config_pb2.GetRequest(), metadata=auth(TOKEN), timeout=5)
        assert (await refused(call)).code() == grpc.StatusCode.UNAVAILABLE
    assert (await pushable.get()).chain_set.version == 1
    assert await pushable.status_for("forbidden") == 403


async def test_a_rotated_certificate_is_served_without_a_restart(start_pushable, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pluginchain")
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def install(ca: trustme.CA) -> None:
        issued = ca.issue_cert("127.0.0.1")
        issued.private_key_pem.write_to_path(str(key))
        issued.cert_chain_pems[0].write_to_path(str(cert))

    async def version_seen_trusting(ca: trustme.CA) -> int | grpc.StatusCode:
        # A new channel each time: rotation applies to new connections.
        credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{pushable.sidecar.config_port}", credentials) as channel:
            call = config_pb2_grpc.ConfigServiceStub(channel).Get(config_pb2.GetRequest(), metadata=auth(TOKEN), timeout=5)
            try:
                return (await call).chain_set.version
            except grpc.aio.AioRpcError as error:
                return error.code()

    install(old_ca)
    pushable = await start_pushable(tls_cert=cert, tls_key=key, credentials=grpc.ssl_channel_credentials(old_ca.cert_pem.bytes()))
    await pushable.apply(chain_set(4, stamp("before rotation")))
    assert await version_seen_trusting(old_ca) == 4

    install(new_ca)
    assert await version_seen_trusting(new_ca) == 4
    assert await version_seen_trusting(old_ca) == grpc.StatusCode.UNAVAILABLE
    assert "certificate files changed" in caplog.text

    # A file missing mid-rotation keeps the certificate in use rather than breaking TLS.
    key.unlink()
    assert await version_seen_trusting(new_ca) == 4
    assert "keeping the certificate in use" in caplog.text


def test_push_mode_never_starts_without_a_token_file(tmp_path, capsys):
    with pytest.raises(ValueError, match="--token-file"):
        SidecarSettings(config_port=0)
    assert main(["serve", "--config-port", "0", "--metrics-port", "-1"]) == 2
    assert "--config-port needs --token-file" in capsys.readouterr().err
    assert main(["serve", "--metrics-port", "-1"]) == 2
    assert "--config is required unless --config-port" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text(TOKEN)
    assert main(["serve", "--config", "x.yaml", "--token-file", str(token)]) == 2
    assert "only apply with --config-port" in capsys.readouterr().err


async def test_a_taken_config_port_fails_the_start_and_leaves_nothing_serving(tmp_path, token_file):
    taken = grpc.aio.server()
    port = taken.add_insecure_port("127.0.0.1:0")
    await taken.start()
    sidecar = Sidecar(SidecarSettings(
        port=0, metrics_port=None, config_host="127.0.0.1", config_port=port, token_file=token_file,
    ))
    try:
        with pytest.raises(RuntimeError):
            await sidecar.start()
        assert sidecar.port != 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert (await refused(check)).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await sidecar.drain()
        await taken.stop(0)
