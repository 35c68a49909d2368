"""What the proxy's handlers share: settings, the store writer, the upstream HTTP session."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.config import ProxyConfig
from store.writer import BatchWriter


@dataclass
class ProxyState:
    config: ProxyConfig
    writer: BatchWriter
    session: aiohttp.ClientSession

    def upstream_url(self, route: str) -> str:
        """`route` is the part after /v1/, e.g. "chat/completions"."""
        base = self.config.upstream.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return f"{base}/{route.replace('.', '/')}"


STATE = web.AppKey("flywheel_state", ProxyState)
