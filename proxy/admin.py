"""The upstream's admin and pass-through calls (adapter loading, /v1/models, embeddings, tokenize):
aiohttp's client, off the hot path."""

from __future__ import annotations

import asyncio

import aiohttp

from flywheel.proxy.errors import ApiError


def upstream_base(upstream: str) -> str:
    """The upstream's /v1 URL, whether or not the setting ends in /v1."""
    base = upstream.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class UpstreamAdmin:
    def __init__(self, upstream: str, timeout_s: float, api_key: str = ""):
        self.upstream = upstream
        self.base = upstream_base(upstream)
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        )

    async def post(self, route: str, payload: dict) -> tuple[int, str]:
        """POST JSON to {base}/{route}: (status, body text); a 502 ApiError when unreachable."""
        try:
            async with self.session.post(f"{self.base}/{route}", json=payload) as response:
                return response.status, await response.text()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as failure:
            raise self.unreachable(failure) from None

    async def get(self, route: str) -> tuple[int, bytes, str]:
        """GET {base}/{route}: (status, body, content type); a 502 ApiError when unreachable."""
        try:
            async with self.session.get(f"{self.base}/{route}") as response:
                return response.status, await response.read(), response.content_type
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as failure:
            raise self.unreachable(failure) from None

    async def forward(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, str]:
        """`method` `path` (from the upstream's root, e.g. /tokenize) with a JSON body as it came:
        (status, body, content type); a 502 ApiError when unreachable."""
        root = self.base.removesuffix("/v1")
        headers = {"Content-Type": "application/json"} if body is not None else None
        try:
            async with self.session.request(method, root + path, data=body, headers=headers) as response:
                return response.status, await response.read(), response.content_type
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as failure:
            raise self.unreachable(failure) from None

    def unreachable(self, failure: Exception | str) -> ApiError:
        return ApiError(502, f"upstream {self.upstream} unreachable: {failure}", "upstream_unreachable")

    async def close(self) -> None:
        await self.session.close()
