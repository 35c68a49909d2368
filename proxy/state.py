"""What the proxy's handlers share: settings, store writer, upstream clients, adapter registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.config import ProxyConfig
from proxy.upstream import UpstreamPool
from store.writer import BatchWriter

if TYPE_CHECKING:
    from proxy.adapters import Registry
    from proxy.feed import Feed


@dataclass
class ProxyState:
    config: ProxyConfig
    writer: BatchWriter
    session: aiohttp.ClientSession  # admin calls: adapter loading, /v1/models
    upstream: UpstreamPool  # the LLM calls
    registry: "Registry | None" = None  # set right after construction: it needs the state too
    feed: "Feed | None" = None  # set when a learner is configured

    def upstream_url(self, route: str) -> str:
        """`route` is the part after /v1/, e.g. "chat/completions"."""
        return f"{upstream_base(self.config.upstream)}/{route}"


def upstream_base(upstream: str) -> str:
    """The upstream's /v1 URL, whether or not the setting ends in /v1."""
    base = upstream.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


STATE = web.AppKey("flywheel_state", ProxyState)
