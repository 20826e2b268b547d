"""The one Kubernetes API call the operator makes itself: merge-patching a PluginChain's status.

Everything else (watching PluginChains and Pods, finalizers, Events) goes through kopf. Status
writes happen outside handlers too (a pod became ready, a retry succeeded), where kopf's
per-handler ``patch`` is not available, so they use kopf's credentials with this small client.
"""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import kopf

from pluginchain_operator.resources import GROUP, PLURAL, VERSION


class KubeClient:
    def __init__(self, connection: kopf.ConnectionInfo):
        self._connection = connection
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        info = self._connection
        if info.insecure:
            return False
        context = ssl.create_default_context(
            cafile=info.ca_path,
            cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data,
        )
        if info.certificate_path and info.private_key_path:
            context.load_cert_chain(info.certificate_path, info.private_key_path)
        return context

    def _headers(self) -> dict[str, str]:
        info = self._connection
        if info.token:
            return {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"}
        return {}

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch ``status`` into the PluginChain; raise ``aiohttp.ClientError`` on failure."""
        if self._session is None:
            ssl_option = self._ssl() if self._connection.server.startswith("https") else False
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_option))
        url = f"{self._connection.server.rstrip('/')}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        async with self._session.patch(
            url,
            json={"status": status},
            headers={**self._headers(), "Content-Type": "application/merge-patch+json"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            if response.status == 404:
                return  # deleted meanwhile: nothing to report on
            response.raise_for_status()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
