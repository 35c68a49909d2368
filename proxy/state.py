"""What the proxy's handlers share: settings, store writer, upstream session, adapter registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.config import ProxyConfig
from store.writer import BatchWriter

if TYPE_CHECKING:
    from proxy.adapters import Registry
    from proxy.feed import Feed


@dataclass
class ProxyState:
    config: ProxyConfig
    writer: BatchWriter
    session: aiohttp.ClientSession
    registry: "Registry | None" = None  # set right after construction: it needs the state too
    feed: "Feed | None" = None  # set when a learner is configured

    def upstream_url(self, route: str) -> str:
        """`route` is the part after /v1/, e.g. "chat/completions"."""
        base = self.config.upstream.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return f"{base}/{route.replace('.', '/')}"


STATE = web.AppKey("flywheel_state", ProxyState)
