"""The operator's side of ConfigService: authenticated Apply and Get calls to one sidecar."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from pluginchain.v1 import config_pb2, config_pb2_grpc


@dataclass(frozen=True)
class PushCredentials:
    """How the operator authenticates to sidecars: the shared bearer token, optionally mTLS."""

    token_file: Path
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def token(self) -> str:
        # Read on every push, so a rotated Secret takes effect without a restart.
        token = self.token_file.read_text().strip()
        if not token:
            raise PushError(f"the push token file {self.token_file} is empty")
        return token

    def channel(self, target: str) -> grpc.aio.Channel:
        if self.tls_ca is None:
            return grpc.aio.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes(),
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )
        return grpc.aio.secure_channel(target, credentials)


class PushError(Exception):
    """A push that did not apply; the message says why, for the PluginChain status."""


async def apply(target: str, chain_set: config_pb2.ChainSet, credentials: PushCredentials, timeout: float) -> config_pb2.ApplyResponse:
    """Push ``chain_set`` to the sidecar at ``target`` (host:port); raise PushError with the reason."""
    async with credentials.channel(target) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        try:
            return await stub.Apply(
                config_pb2.ApplyRequest(chain_set=chain_set),
                metadata=(("authorization", f"Bearer {credentials.token()}"),),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise PushError(_describe(error)) from None
        except OSError as error:
            raise PushError(f"cannot read push credentials: {error}") from None


async def active_version(target: str, credentials: PushCredentials, timeout: float) -> int:
    """The version the sidecar at ``target`` runs now."""
    async with credentials.channel(target) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        try:
            reply = await stub.Get(
                config_pb2.GetRequest(),
                metadata=(("authorization", f"Bearer {credentials.token()}"),),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise PushError(_describe(error)) from None
        return reply.chain_set.version


def _describe(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"sidecar unreachable: {error.details()}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "sidecar did not answer in time"
    return f"{code.name}: {error.details()}"
