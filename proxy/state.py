"""What the proxy's handlers share, complete from the moment the app serves.

Each resource is opened by its own `cleanup_ctx` in `app.py` (and closed by it, in reverse
order), then `ProxyState` is assembled from them, every field given: handlers read
`request.app[STATE]` and never see a half-built state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from flywheel.proxy.config import ProxyConfig
from flywheel.proxy.errors import ApiError
from flywheel.proxy.feed import Feed
from flywheel.proxy.grader import Grader
from flywheel.proxy.metrics import Metrics
from flywheel.proxy.policy import RecentIds
from flywheel.proxy.quotas import Quotas
from flywheel.proxy.reload import Loader, Rules
from flywheel.proxy.registry import Registry
from flywheel.proxy.replicas import Replicas
from flywheel.proxy.rollout import Rollout
from flywheel.proxy.shadow import ShadowSampler
from flywheel.store.writer import BatchWriter

if TYPE_CHECKING:  # the `otel` extra: imported only when spans are on
    from flywheel.proxy.tracing import CallTracer


@dataclass(frozen=True)
class ProxyState:
    config: ProxyConfig
    writer: BatchWriter  # the store: every write goes through its queue, reads through its threads
    upstream: Replicas  # the vLLM replicas: LLM calls (the hot path), adapter loading, /v1/models
    registry: Registry  # which adapter version serves each agent
    feed: Feed | None  # episodes to the learner; None when no learner is configured
    metrics: Metrics  # what /metrics reports
    tracer: "CallTracer | None"  # one OpenTelemetry span per LLM call; None unless otel_endpoint is set
    grader: Grader | None  # scores closed episodes through the grading service; None with [grader] kind = "feedback"
    shadows: ShadowSampler | None  # resamples one-off calls for comparison groups; None unless shadow_samples is set
    rollout: Rollout  # decides candidates and watches newly active versions ([promotion])
    quotas: Quotas  # the keys' and agents' rpm, tpm and max_concurrent counters
    rules: Rules  # keys, agent rules and redaction as configured now (a reload replaces them)
    # episodes with a call under `none` (no record, so no row to mark): their later calls are not trainable
    untrainable: RecentIds
    # episodes erased here: a call still in flight then (a stream, a shadow sample) is not recorded
    erased: RecentIds
    reload_from: Loader | None  # how to read the configuration again; None: built from code

    def require_writable_store(self) -> None:
        """A 503 at once while the store cannot write, for requests acknowledged only once committed
        (feedback, episodes, adapter versions): the client retries later instead of waiting on a full disk."""
        if self.writer.failing is not None:
            raise ApiError(503, f"the store cannot write now ({self.writer.failing}); retry later", "store_unavailable")


STATE = web.AppKey("flywheel_state", ProxyState)
