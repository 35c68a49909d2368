"""The proxy's aiohttp application: routes, one cleanup context per resource, and `run`.

Resources open in order (store writer, upstream pool, admin client, adapter registry,
rollout, shadow sampler, grader, learner feed), each under its own AppKey, and close in reverse; one that fails to open
closes the ones already open. `ProxyState` is assembled last, complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import re
import resource
import signal
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import grpc
from aiohttp import web

from flywheel.proxy.admin import upstream_base
from flywheel.proxy.attribution import new_id
from flywheel.proxy.audit import caller_key_id
from flywheel.proxy.auth import ROUTE_ACCESS, Access, guard_middleware, is_loopback
from flywheel.proxy.canary import PromotionConfig
from flywheel.proxy.capture import CHAT, COMPLETIONS
from flywheel.proxy.config import ProxyConfig
from flywheel.proxy.errors import ApiError, error_middleware
from flywheel.proxy.feed import Feed, channel_options
from flywheel.proxy.grader import EndpointScorer, Grader, GraderConfig, Scorer, http_session
from flywheel.proxy.judge import JudgeScorer
from flywheel.proxy.metrics import METRICS, Metrics, metrics_handler, metrics_middleware
from flywheel.proxy.openapi import openapi_handler
from flywheel.proxy.policy import RecentIds
from flywheel.proxy.quotas import Quotas, share
from flywheel.proxy.reload import Loader, NothingToReload, Rules, reload_rules
from flywheel.proxy.registry import Registry
from flywheel.proxy.responses import RESPONSES
from flywheel.proxy.retention import Retention
from flywheel.proxy.rollout import Rollout
from flywheel.proxy.routes import adapters, episodes, erasure, grading, learner, sql, ui
from flywheel.proxy.routes.completions import completion_handler, stored_response_handler
from flywheel.proxy.routes.passthrough import FORWARDED, forward_handler, model_handler, models_handler
from flywheel.proxy.sampling import checked_defaults
from flywheel.proxy.shadow import ShadowSampler
from flywheel.proxy.state import STATE, ProxyState
from flywheel.proxy.replicas import Replica, Replicas
from flywheel.store import open_store, shown
from flywheel.store.db import StoreLimits
from flywheel.store.process import StoreProcess, cap_address_space
from flywheel.store.writer import BatchWriter

if TYPE_CHECKING:
    from flywheel.proxy.tracing import CallTracer

log = logging.getLogger("flywheel.proxy")

CONFIG = web.AppKey("flywheel_config", ProxyConfig)
WRITER = web.AppKey("flywheel_writer", BatchWriter)
UPSTREAM = web.AppKey("flywheel_upstream", Replicas)
REGISTRY = web.AppKey("flywheel_registry", Registry)
FEED = web.AppKey("flywheel_feed", Feed)
GRADER_CONFIG = web.AppKey("flywheel_grader_config", GraderConfig)
GRADER = web.AppKey("flywheel_grader", Grader)
SHADOWS = web.AppKey("flywheel_shadows", ShadowSampler)
PROMOTION = web.AppKey("flywheel_promotion", PromotionConfig)
QUOTAS = web.AppKey("flywheel_quotas", Quotas)
RULES = web.AppKey("flywheel_rules", Rules)
RELOAD_FROM = web.AppKey("flywheel_reload_from", object)  # a Loader, or None
ROLLOUT = web.AppKey("flywheel_rollout", Rollout)
TRACER: web.AppKey["CallTracer"] = web.AppKey("flywheel_tracer")

_LEADER_RETRY_S = 2.0  # how often a proxy that does not hold a once-only job's lock tries to take it
_FOLLOW_S = 0.5  # how often a proxy on a shared store looks for registry changes made through others

# Attribution by base_url: every OpenAI route is also served under these prefixes.
_PREFIXES = ("", "/agents/{agent}", "/agents/{agent}/episodes/{episode}")


def build_app(config: ProxyConfig, grader: GraderConfig = GraderConfig(),
              promotion: PromotionConfig = PromotionConfig(), reload_from: Loader | None = None) -> web.Application:
    """The proxy for `config` (and `[grader]`); raises ValueError for settings it cannot serve
    with (InsecureConfig for keys or a bind address that would expose the store)."""
    if grader.kind == "endpoint" and not grader.url:
        raise ValueError("[grader] kind = \"endpoint\" needs a url")
    if grader.kind == "judge" and not (grader.judge_model or config.base_model):
        raise ValueError("[grader] kind = \"judge\" needs judge_model, or [proxy] base_model (flywheel up sets it)")
    _check_shadows(grader)
    promotion.check()
    if config.otel_endpoint:
        try:
            import flywheel.proxy.tracing  # noqa: F401
        except ImportError as missing:
            raise ValueError(f"otel_endpoint is set but OpenTelemetry is not installed ({missing}): "
                             "pip install 'flywheel-rl[otel]'") from None
    config = dataclasses.replace(config, sampling_defaults=checked_defaults(config.sampling_defaults))
    rules = Rules(config)  # InsecureConfig for keys or a bind that would expose the store, UnknownDetector
    metrics = Metrics()
    app = web.Application(middlewares=[metrics_middleware(metrics), error_middleware,
                                       guard_middleware(config, lambda: rules.keys)],
                          client_max_size=config.max_body_bytes)
    app[RULES], app[RELOAD_FROM] = rules, reload_from
    app[CONFIG] = config
    app[GRADER_CONFIG] = grader
    app[PROMOTION] = promotion
    app[METRICS] = metrics
    access: dict = {}
    for method, path, handler, needs in _routes():
        access[app.router.add_route(method, path, handler)] = needs
    app[ROUTE_ACCESS] = access
    app.cleanup_ctx.extend([_writer, _upstream, _registry, _rollout, _shadows, _grader, _feed, _retention,
                            _quotas, _tracer, _state])
    return app


def _check_shadows(grader: GraderConfig) -> None:
    """`[grader] shadow_*` settings that can work, when shadow samples are on; ValueError otherwise."""
    if grader.shadow_samples < 0:
        raise ValueError("[grader] shadow_samples must be 0 (off) or more")
    if not grader.shadow_samples:
        return
    if grader.kind == "feedback":
        raise ValueError("[grader] shadow_samples needs a grader to score them: kind = \"endpoint\" or \"judge\"")
    positive = {"shadow_budget": grader.shadow_budget, "shadow_busy": grader.shadow_busy,
                "shadow_max_wait_s": grader.shadow_max_wait_s, "shadow_queue": grader.shadow_queue,
                "shadow_max_tokens": grader.shadow_max_tokens}
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"[grader] {name} must be more than 0, got {value}")
    try:
        re.compile(grader.shadow_agents)
    except re.error as bad:
        raise ValueError(f"[grader] shadow_agents is not a regex: {bad}") from None


def _routes():
    """(method, path, handler, who may call it) for every route."""
    for prefix in _PREFIXES:
        yield "POST", f"{prefix}/v1/chat/completions", completion_handler(CHAT), Access.CLIENT
        yield "POST", f"{prefix}/v1/completions", completion_handler(COMPLETIONS), Access.CLIENT
        yield "POST", f"{prefix}/v1/responses", completion_handler(RESPONSES), Access.CLIENT
        yield "GET", f"{prefix}/v1/responses/{{response}}", stored_response_handler, Access.CLIENT
        yield "DELETE", f"{prefix}/v1/responses/{{response}}", stored_response_handler, Access.CLIENT
        yield "GET", f"{prefix}/v1/models", models_handler, Access.CLIENT
        yield "GET", f"{prefix}/v1/models/{{model:.+}}", model_handler, Access.CLIENT
        for method, path in FORWARDED:
            yield method, prefix + path, forward_handler(path), Access.CLIENT
    yield "POST", "/v1/episodes", episodes.create_episode, Access.CLIENT
    yield "GET", "/v1/episodes/{episode}", episodes.get_episode, Access.CLIENT
    yield "POST", "/v1/episodes/{episode}/feedback", episodes.post_feedback, Access.CLIENT
    yield "POST", "/v1/episodes/{episode}/close", episodes.close_episode, Access.CLIENT
    yield "DELETE", "/v1/episodes/{episode}", erasure.erase_episode, Access.ADMIN
    yield "POST", "/v1/erase", erasure.erase_matching, Access.ADMIN
    yield "POST", "/v1/admin/reload", _reload, Access.ADMIN
    yield "POST", "/v1/sql", sql.run_sql, Access.ADMIN
    yield "GET", "/v1/adapters", adapters.list_adapters, Access.ADMIN
    yield "POST", "/v1/adapters", adapters.register_adapter, Access.ADMIN
    yield "POST", "/v1/adapters/{agent}/rollback", adapters.rollback_adapter, Access.ADMIN
    yield "POST", "/v1/adapters/{agent}/promote", adapters.decide_candidate("promote"), Access.ADMIN
    yield "POST", "/v1/adapters/{agent}/reject", adapters.decide_candidate("reject"), Access.ADMIN
    yield "POST", "/v1/learner/train", learner.train, Access.ADMIN
    yield "GET", "/v1/learner/status", learner.status, Access.ADMIN
    yield "POST", "/v1/learner/runs", learner.record_held_run, Access.ADMIN
    yield "GET", "/v1/grader", grading.status, Access.ADMIN
    yield "POST", "/v1/grader/regrade", grading.regrade, Access.ADMIN
    yield "POST", "/v1/grader/calibrate", grading.calibrate, Access.ADMIN
    yield "GET", "/metrics", metrics_handler, Access.ADMIN
    yield "GET", "/v1/dashboard", ui.dashboard, Access.ADMIN
    yield "GET", "/ui", ui.page, Access.PUBLIC
    yield "GET", "/ui/{file}", ui.page, Access.PUBLIC
    yield "GET", "/healthz", _health, Access.PUBLIC
    yield "GET", "/readyz", _ready, Access.PUBLIC
    yield "GET", "/openapi.json", openapi_handler, Access.PUBLIC


async def _writer(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    limits = StoreLimits(memory_mb=config.sql_memory_mb, threads=config.sql_threads, temp_mb=config.sql_temp_mb)
    store = (StoreProcess(config.db, limits, config.memory_headroom_mb) if config.store_process
             else open_store(config.db, limits=limits))
    writer = BatchWriter(store, config.queue_max_bytes, config.batch_max,
                         config.batch_linger_ms / 1000, config.sql_concurrency, config.serve_without_store)
    writer.start()
    app[WRITER] = writer
    yield
    await writer.close()  # writes everything still queued
    log.info("proxy stopped; store flushed")


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    """The vLLM replicas: connection pools for the calls, admin clients for adapters and models."""
    config = app[CONFIG]
    app[UPSTREAM] = replicas = Replicas(config.upstream, config.upstream_timeout_s, config.upstream_api_key,
                                        config.upstream_max_connections)
    yield
    await replicas.close()


async def _registry(app: web.Application) -> AsyncIterator[None]:
    """The adapter registry, restored from the store and reloaded into vLLM in the background,
    then kept loaded there (a restarted vLLM gets its adapters back)."""
    config, writer = app[CONFIG], app[WRITER]
    promotion = app[PROMOTION]
    registry = Registry(writer, app[UPSTREAM], config.base_model or None, config.max_lora_rank, config.adapter_roots,
                        promotion.canary_fraction, promotion.seed)
    app[REGISTRY] = registry
    rows = await writer.read(writer.store.adapter_rows)

    async def restore_then_watch() -> None:
        await registry.restore(rows)
        await registry.watch_upstream(config.adapter_check_s)

    keeping = asyncio.get_running_loop().create_task(restore_then_watch())
    # other proxies on the same store register and roll back too: their changes are taken here
    following = asyncio.get_running_loop().create_task(registry.follow(_FOLLOW_S)) if writer.store.shared else None
    yield
    await _cancel(keeping)
    if following is not None:
        await _cancel(following)


async def _rollout(app: web.Application) -> AsyncIterator[None]:
    """Candidates decided and newly active versions watched, in the background."""
    app[ROLLOUT] = rollout = Rollout(app[PROMOTION], app[REGISTRY], app[WRITER], app[METRICS])
    deciding = asyncio.get_running_loop().create_task(_leading(app[WRITER], "rollout", rollout.run))
    yield
    await _cancel(deciding)


async def _feed(app: web.Application) -> AsyncIterator[None]:
    """The learner feed, when a learner is configured."""
    config = app[CONFIG]
    if not config.learner:
        yield
        return
    channel = grpc.aio.insecure_channel(config.learner, options=channel_options(config.max_message_bytes))
    grader = app.get(GRADER)
    # the learner waits for the grade of every episode when all are graded (or it would learn from
    # the feedback alone), else for those with shadow samples (which only the grader scores)
    await_grade = (grader.source, grader.config.version, grader.config.apply_to == "all") if grader else None
    shadows = app.get(SHADOWS)

    def busy() -> list[str]:
        """Episodes not to push yet: their shadows still to come, or their grades being written."""
        return (shadows.busy_episodes() if shadows else []) + (list(grader.grading) if grader else [])

    feed = Feed(app[WRITER], channel, config.learner, config.push_after_s, config.push_batch, config.push_interval_s,
                config.max_message_bytes, config.learner_token, await_grade, busy)
    app[FEED] = feed
    feeding = asyncio.get_running_loop().create_task(feed.run())
    yield
    await _cancel(feeding)
    await channel.close()


async def _shadows(app: web.Application) -> AsyncIterator[None]:
    """The shadow sampler, when `[grader] shadow_samples` asks for one."""
    config, proxy = app[GRADER_CONFIG], app[CONFIG]
    if not config.shadow_samples:
        yield
        return
    app[SHADOWS] = sampler = ShadowSampler(config, app[WRITER], app[UPSTREAM], proxy.upstream_headers(),
                                           app[REGISTRY], app[METRICS], proxy.upstream_timeout_s)
    sampling = asyncio.get_running_loop().create_task(sampler.run())
    yield
    await _cancel(sampling)


async def _retention(app: web.Application) -> AsyncIterator[None]:
    """Old episodes and old content removed in the background, when retention is configured."""
    retention = Retention(app[CONFIG], app[WRITER], app.get(FEED))
    if not retention.enabled:
        yield
        return
    pruning = asyncio.get_running_loop().create_task(_leading(app[WRITER], "retention", retention.run))
    yield
    await _cancel(pruning)


async def _quotas(app: web.Application) -> AsyncIterator[None]:
    """The keys' and agents' limits; shared with the other proxies on a PostgreSQL store."""
    writer, rules = app[WRITER], app[RULES]
    app[QUOTAS] = quotas = Quotas()

    def any_limits() -> bool:  # as configured now: a reload may add or remove them
        return any(rule.limits for rule in (*rules.config.keys, *rules.config.agents))

    sharing = (asyncio.get_running_loop().create_task(share(quotas, writer, new_id("proxy"), any_limits))
               if writer.store.shared else None)
    yield
    if sharing is not None:
        await _cancel(sharing)


async def _grader(app: web.Application) -> AsyncIterator[None]:
    """The grader (the team's service or the LLM judge), grading closed episodes in the
    background, when one is configured."""
    config, proxy = app[GRADER_CONFIG], app[CONFIG]
    if config.kind == "feedback":
        yield
        return
    if config.kind == "endpoint":
        session = http_session(config)
        scorer: Scorer = EndpointScorer(config, session)
    else:  # the judge: on the upstream unless told otherwise, with the upstream's key there
        session = http_session(config, "" if config.judge_url else proxy.upstream_api_key)
        scorer = JudgeScorer(config, session, config.judge_url or upstream_base(proxy.upstream[0]),
                             config.judge_model or proxy.base_model, app[WRITER])
    shadows = app.get(SHADOWS)
    app[GRADER] = grader = Grader(config, app[WRITER], scorer, shadows.busy_episodes if shadows else list)
    grading = asyncio.get_running_loop().create_task(_leading(app[WRITER], "grader", grader.run))
    yield
    await _cancel(grading)
    await session.close()


async def _tracer(app: web.Application) -> AsyncIterator[None]:
    """OpenTelemetry spans, when an OTLP endpoint is configured; what is buffered is exported at shutdown."""
    config = app[CONFIG]
    if not config.otel_endpoint:
        yield
        return
    from flywheel.proxy.tracing import CallTracer

    app[TRACER] = tracer = CallTracer.otlp(config.otel_endpoint, config.otel_content)
    yield
    await asyncio.to_thread(tracer.shutdown)


async def _state(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[METRICS].watch(app[WRITER], app.get(FEED), app[UPSTREAM])
    app[STATE] = ProxyState(config=config, writer=app[WRITER], upstream=app[UPSTREAM],
                            registry=app[REGISTRY], feed=app.get(FEED), metrics=app[METRICS],
                            tracer=app.get(TRACER), grader=app.get(GRADER), shadows=app.get(SHADOWS),
                            rollout=app[ROLLOUT], quotas=app[QUOTAS], rules=app[RULES],
                            reload_from=app[RELOAD_FROM], untrainable=RecentIds(), erased=RecentIds())
    log.info("proxy up: upstream %s, store %s, learner %s", ", ".join(config.upstream), shown(config.db), config.learner or "none")
    if not (config.client_keys or config.every_admin_key):
        log.warning("no keys configured: every route is open to whoever reaches %s%s", config.host,
                    " (loopback only)" if is_loopback(config.host) else " (--insecure)")
    yield


async def _leading(writer: BatchWriter, work: str, run: Callable[[], Awaitable[None]]) -> None:
    """`run` once this proxy holds the store's lock on `work`: of several proxies on one store,
    one decides candidates and one grades; when it dies, its lock goes and another takes over.
    (A DuckDB store has one proxy: it always holds it.)"""
    while not await writer.read(writer.store.try_lock, work):
        await asyncio.sleep(_LEADER_RETRY_S)
    await run()


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _reload(request: web.Request) -> web.Response:
    """Read the configuration again and apply its keys, agent rules and redaction; 400 (the running
    rules kept) for one that cannot serve, 409 for a proxy not started from a configuration."""
    state = request.app[STATE]
    try:
        result = await reload_rules(state.rules, state.reload_from, state.writer, caller_key_id(request))
    except NothingToReload as nothing:
        raise ApiError(409, str(nothing), "nothing_to_reload") from None
    except ValueError as refused:
        raise ApiError(400, f"reload refused, the running rules stay: {refused}", "invalid_config") from None
    return web.json_response(result)


async def _health(request: web.Request) -> web.Response:
    """Alive: the process answers. What it can do is /readyz's."""
    state = request.app[STATE]
    body = {"status": "ok", "queued_records": state.writer.pending}
    if state.feed is not None:
        body["feed"] = state.feed.health()
    return web.json_response(body)


async def _ready(request: web.Request) -> web.Response:
    """Ready to serve agents: the upstream answers, adapters are restored and the store writes
    (unless serve_without_store). 503 with the failing checks otherwise. A learner the feed
    cannot reach, or a store that cannot write under serve_without_store, is reported as
    `degraded` and does not make the proxy unready: agents are served all the same."""
    state = request.app[STATE]
    checks: dict[str, dict] = {}
    answers = await asyncio.gather(*(_answers(replica) for replica in state.upstream.replicas))
    checks["upstream"] = {"ok": any(ok for ok, _ in answers),
                          "detail": "; ".join(f"{r.url}: {detail}" for r, (_, detail) in zip(state.upstream.replicas, answers))
                          if len(answers) > 1 else answers[0][1]}
    checks["store"] = {"ok": state.writer.failing is None, "detail": state.writer.failing or "writes",
                       "queued_records": state.writer.pending, "lag_s": round(state.writer.lag_s, 3),
                       "dropped_records": state.writer.dropped}
    checks["adapters"] = {"ok": state.registry.restored, "detail": state.registry.restore_detail()}
    optional = {"feed"} | ({"store"} if state.config.serve_without_store else set())
    if state.feed is not None:
        checks["feed"] = {"ok": state.feed.last_error is None, "detail": state.feed.last_error or "reaches the learner"}
    ready = all(check["ok"] for name, check in checks.items() if name not in optional)
    degraded = sorted(name for name, check in checks.items() if name in optional and not check["ok"])
    return web.json_response({"ready": ready, "degraded": degraded, "checks": checks}, status=200 if ready else 503)


async def _answers(replica: Replica) -> tuple[bool, str]:
    """Whether a replica lists its models within 5 s, and what it said."""
    try:
        await asyncio.wait_for(replica.models(), 5)
        return True, "GET /v1/models: 200" + ("" if replica.live else " (joining: loading adapters)")
    except (ApiError, TimeoutError) as down:
        return False, getattr(down, "message", "no answer within 5 s")


def run(config: ProxyConfig, grader: GraderConfig = GraderConfig(),
        promotion: PromotionConfig = PromotionConfig(), reload_from: Loader | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C; SIGHUP reloads the access rules through `reload_from`."""
    _raise_file_limit()
    app = build_app(config, grader, promotion, reload_from)
    app.on_startup.append(_tune_gc)  # after the resources open: their objects are long-lived too
    app.on_startup.append(_reload_on_sighup)
    if config.memory_headroom_mb:
        app.on_startup.append(lambda _: _cap_address_space(config.memory_headroom_mb))
    # handler_cancellation: a client that hangs up cancels its handler, which records the call
    # (499) and closes the upstream request, so vLLM stops generating for nobody
    web.run_app(app, host=config.host, port=config.port, print=None, access_log=None,
                shutdown_timeout=config.shutdown_timeout_s, handler_cancellation=True, loop=_fast_loop())


async def _reload_on_sighup(app: web.Application) -> None:
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        state = app[STATE]
        try:
            await reload_rules(state.rules, state.reload_from, state.writer, None)
        except (NothingToReload, ValueError) as refused:
            log.error("SIGHUP: reload refused, the running rules stay: %s", refused)

    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))


def _raise_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: each stream holds two sockets (client and upstream),
    and the usual soft limit of 1024 would refuse connections from about 500 streams on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _cap_address_space(headroom_mb: int) -> None:
    """`cap_address_space` once everything is open (the store, when it runs in this process)."""
    cap_address_space(headroom_mb)


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
