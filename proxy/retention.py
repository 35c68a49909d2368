"""Retention: episodes older than `retention_days` are deleted, and the content of calls older
than `content_retention_days` is dropped (their metadata stays, as under the `metadata` policy).

Every `retention_check_s` the proxy that holds the store's "retention" lock looks for expired
episodes, `RETENTION_CHUNK` at a time: each chunk is dropped from the learner's buffer first
(its spool rewritten without them), then deleted or stripped in the store by one short write,
audited as action "retention" or "content_retention". Chunks go through the writer's queue
one by one, so serving and other writes never wait behind a long purge. A learner that cannot
be reached holds the purge until the next check (its copy would outlive the store's).
Adapters already trained on the data keep what they learned.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone

import grpc

from flywheel.proxy.config import ProxyConfig
from flywheel.proxy.feed import Feed
from flywheel.store.records import AuditEntry, Erase, StoreUnavailable, StripContent
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.proxy")

RETENTION_CHUNK = 500  # episodes per write: one short transaction each


class Retention:
    def __init__(self, config: ProxyConfig, writer: BatchWriter, feed: Feed | None):
        self.config, self.writer, self.feed = config, writer, feed

    @property
    def enabled(self) -> bool:
        return self.config.retention_days > 0 or self.config.content_retention_days > 0

    async def run(self) -> None:
        while True:
            try:
                await self.prune()
            except (grpc.aio.AioRpcError, OSError) as unreachable:
                log.warning("retention waits for the learner (its copies go first): %s", unreachable)
            except StoreUnavailable as failing:
                log.warning("retention waits for the store: %s", failing)
            except Exception as failed:  # noqa: BLE001 - a background loop: a round that failed is tried again
                log.error("retention round failed, tried again in %g s: %r", self.config.retention_check_s, failed)
            await asyncio.sleep(self.config.retention_check_s)

    async def prune(self) -> tuple[int, int]:
        """Everything expired now: (episodes deleted, calls stripped of their content)."""
        now = datetime.now(timezone.utc)
        deleted = stripped = 0
        if self.config.retention_days > 0:
            before = now - timedelta(days=self.config.retention_days)
            while ids := await self.writer.read(self.writer.store.expired_episodes, before, RETENTION_CHUNK):
                await self._erase_at_learner(ids)
                erased = await self.writer.submit(Erase(tuple(ids), self._audit("retention", before, len(ids))))
                deleted += erased.episodes
        if self.config.content_retention_days > 0:
            before = now - timedelta(days=self.config.content_retention_days)
            while ids := await self.writer.read(self.writer.store.episodes_with_old_content, before, RETENTION_CHUNK):
                await self._erase_at_learner(ids)
                stripped += await self.writer.submit(
                    StripContent(tuple(ids), before, self._audit("content_retention", before, len(ids))))
        return deleted, stripped

    async def _erase_at_learner(self, episode_ids: list[str]) -> None:
        if self.feed is not None:
            await self.feed.erase(episode_ids)

    @staticmethod
    def _audit(action: str, before: datetime, episodes: int) -> AuditEntry:
        return AuditEntry.now(None, action, detail={"before": before.isoformat(), "episodes": episodes})
