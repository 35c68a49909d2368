"""The proxy's aiohttp application: routes, start-up and clean shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging

import aiohttp
from aiohttp import web

from proxy import adapters, episodes, learner_routes
from proxy.capture import CHAT, COMPLETIONS
from proxy.config import ProxyConfig
from proxy.errors import error_middleware
from proxy.feed import Feed
from proxy.forward import completion_handler, models_handler
from proxy.state import STATE, ProxyState, upstream_base
from proxy.upstream import UpstreamPool
from store.db import Store
from store.writer import BatchWriter

log = logging.getLogger("flywheel.proxy")

# Attribution by base_url: every OpenAI route is also served under these prefixes.
_PREFIXES = ("", "/agents/{agent}", "/agents/{agent}/episodes/{episode}")


def build_app(config: ProxyConfig) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    for prefix in _PREFIXES:
        app.router.add_post(f"{prefix}/v1/chat/completions", completion_handler(CHAT))
        app.router.add_post(f"{prefix}/v1/completions", completion_handler(COMPLETIONS))
        app.router.add_get(f"{prefix}/v1/models", models_handler)
    app.router.add_post("/v1/episodes", episodes.create_episode)
    app.router.add_get("/v1/episodes/{episode}", episodes.get_episode)
    app.router.add_post("/v1/episodes/{episode}/feedback", episodes.post_feedback)
    app.router.add_post("/v1/episodes/{episode}/close", episodes.close_episode)
    app.router.add_post("/v1/sql", episodes.run_sql)
    app.router.add_get("/v1/adapters", adapters.list_adapters)
    app.router.add_post("/v1/adapters", adapters.register_adapter)
    app.router.add_post("/v1/adapters/{agent}/rollback", adapters.rollback_adapter)
    app.router.add_post("/v1/learner/train", learner_routes.train)
    app.router.add_get("/v1/learner/status", learner_routes.status)
    app.router.add_get("/healthz", _health)
    app.cleanup_ctx.append(_lifecycle(config))
    return app


def _lifecycle(config: ProxyConfig):
    async def lifecycle(app: web.Application):
        writer = BatchWriter(Store(config.db), config.queue_size, config.batch_max, config.batch_linger_ms / 1000)
        writer.start()
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.upstream_timeout_s, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        )
        state = app[STATE] = ProxyState(config=config, writer=writer, session=session,
                                        upstream=UpstreamPool(upstream_base(config.upstream)))
        state.registry = adapters.Registry(state, config.base_model or None, config.max_lora_rank)
        restoring = asyncio.get_running_loop().create_task(
            state.registry.restore(await writer.read(writer.store.adapter_rows)))
        feeding = None
        if config.learner:
            state.feed = Feed(state, config.learner, config.push_after_s, config.push_batch, config.push_interval_s)
            feeding = asyncio.get_running_loop().create_task(state.feed.run())
        log.info("proxy up: upstream %s, store %s, learner %s", config.upstream, config.db, config.learner or "none")
        yield
        restoring.cancel()
        if feeding is not None:
            feeding.cancel()
            await state.feed.close()
        await session.close()
        await state.upstream.close()
        await writer.close()  # writes everything still queued
        log.info("proxy stopped; store flushed")

    return lifecycle


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "queued_records": state.writer.pending})


def run(config: ProxyConfig) -> None:
    app = build_app(config)
    app.on_startup.append(_tune_gc)  # after the lifecycle's start-up: its objects are long-lived too
    web.run_app(app, host=config.host, port=config.port, print=None,
                access_log=None, shutdown_timeout=30, loop=_fast_loop())


async def _tune_gc(app: web.Application) -> None:
    """Keep CPython's cycle collector off the hot path.

    Each call allocates a few dozen containers and the writer holds a second of calls, so
    with the default thresholds the collector ran ~80 times a second and rescanned the
    ~60k objects of the imports every couple of seconds: 18-41 µs of CPU per call and
    pauses up to 120 ms at concurrency 64. Freezing the start-up heap and collecting the
    young generation every 20k allocations cut that to ~3 µs per call, pauses ~15 ms.
    """
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _fast_loop():
    """uvloop where it installs (Linux, macOS): about twice the event loop throughput."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop()
