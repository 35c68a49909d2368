"""The proxy's Prometheus metrics (`GET /metrics`, admin key), on a registry of its own.

Counted as they happen: requests by route template and status with their latency; LLM calls
by agent and status with time to first token, tokens and Flywheel's own overhead; calls over a
limit; adapter swaps; SQL refusals. Read
when scraped: the writer's queue (records, bytes, lag), whether the store writes, records
dropped, the learner feed's lag and counts.
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from flywheel.proxy.feed import Feed
from flywheel.proxy.replicas import Replicas
from flywheel.store.writer import BatchWriter

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flywheel_requests", "HTTP requests by route template and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("flywheel_request_seconds", "HTTP request latency by route template",
                                 ["route"], buckets=_LATENCY_S, registry=r)
        self.calls = Counter("flywheel_llm_calls", "LLM calls by agent and status", ["agent", "status"], registry=r)
        self.ttft = Histogram("flywheel_ttft_seconds", "time to the first generated token, by agent", ["agent"],
                              buckets=_LATENCY_S, registry=r)
        self.tokens = Counter("flywheel_tokens", "tokens by agent and kind (prompt, completion)",
                              ["agent", "kind"], registry=r)
        self.adapter_swaps = Counter("flywheel_adapter_swaps", "adapter registry changes (register, candidate, "
                                     "promote, reject, rollback; auto_promote, auto_reject, auto_rollback by the rollout)",
                                     ["agent", "reason"], registry=r)
        self.shadows = Counter("flywheel_shadow_samples", "calls offered for shadow samples, by outcome "
                               "(sampled, failed, dropped_queue_full, dropped_waited, skipped_task, skipped_eval, "
                               "skipped_forced_tool, not_stored)", ["outcome"], registry=r)
        self.overhead = Histogram("flywheel_overhead_seconds", "time an LLM call spent in Flywheel, not waiting on "
                                  "the upstream, by agent", ["agent"], buckets=_OVERHEAD_S, registry=r)
        self.over_limit = Counter("flywheel_over_limit", "LLM calls refused with a 429 by a key's or an agent's "
                                  "limit, by agent and limit (rpm, tpm, max_concurrent)", ["agent", "limit"], registry=r)
        self.redactions = Counter("flywheel_redactions", "matches replaced by placeholders before forwarding, by "
                                  "detector", ["detector"], registry=r)
        self.sql_refused = Counter("flywheel_sql_refused", "SQL queries refused or failed, by reason",
                                   ["reason"], registry=r)

    def watch(self, writer: BatchWriter, feed: Feed | None, replicas: Replicas) -> None:
        """Report the writer's, the feed's and the upstream replicas' state at each scrape."""
        self.registry.register(_StateCollector(writer, feed, replicas))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, writer: BatchWriter, feed: Feed | None, replicas: Replicas):
        self.writer, self.feed, self.replicas = writer, feed, replicas

    def collect(self):
        w = self.writer
        yield GaugeMetricFamily("flywheel_writer_queue_records", "records waiting for the store", value=w.pending)
        yield GaugeMetricFamily("flywheel_writer_queue_bytes", "bytes of records waiting for the store",
                                value=w.queued_bytes)
        yield GaugeMetricFamily("flywheel_writer_lag_seconds", "how long the oldest waiting record has waited",
                                value=w.lag_s)
        yield GaugeMetricFamily("flywheel_store_writable", "1 while the store commits, 0 while it cannot",
                                value=0 if w.failing else 1)
        yield CounterMetricFamily("flywheel_records_dropped", "records not kept (serve_without_store)",
                                  value=w.dropped)
        yield CounterMetricFamily("flywheel_records_committed", "records committed to the store", value=w.committed)
        live = GaugeMetricFamily("flywheel_upstream_live", "1 while a replica takes new episodes", labels=["upstream"])
        busy = GaugeMetricFamily("flywheel_upstream_in_progress", "LLM calls in progress on a replica",
                                 labels=["upstream"])
        for replica in self.replicas.replicas:
            live.add_metric([replica.url], 1 if replica.live else 0)
            busy.add_metric([replica.url], replica.pool.in_progress)
        yield live
        yield busy
        if self.feed is not None:
            f = self.feed
            yield GaugeMetricFamily("flywheel_feed_lag_seconds", "seconds since the feed last reached the learner",
                                    value=time.time() - f.last_success if f.last_success else float("nan"))
            yield CounterMetricFamily("flywheel_feed_pushed_episodes", "episodes the learner acknowledged",
                                      value=f.pushed)
            yield CounterMetricFamily("flywheel_feed_quarantined_episodes", "episodes the feed could not send",
                                      value=f.quarantined)


METRICS = web.AppKey("flywheel_metrics", Metrics)


def metrics_middleware(metrics: Metrics):
    """Every request counted by its route template (never the raw path: ids would explode the labels)."""

    @web.middleware
    async def measure(request: web.Request, handler):
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as err:
            status = err.status
            raise
        finally:
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)

    return measure


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
