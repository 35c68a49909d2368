"""Feeding finished episodes to the learner over gRPC, and reaching it for updates and status.

An episode is pushed once it is rewarded and closed (or rewarded and quiet for
`push_after_s`), in batches, with back-off when the learner is down; the proxy keeps
serving meanwhile. The store marks what the learner acknowledged, so an outage or a
learner restart loses nothing, and the learner ignores duplicates by episode id.
Rows become protobuf messages in `flywheel.store.proto_map`.

Nothing can poison the feed: each episode is converted on its own, and one that fails to
convert, is over `max_message_bytes`, or is refused by the learner for what it is (not
because the learner is down) is quarantined with its error and never sent again; the
others go on. The loop survives anything else too, and says how it is in `health()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import AsyncIterator, Callable

import grpc

from flywheel.protos import flywheel_pb2 as pb
from flywheel.protos import flywheel_pb2_grpc as pb_grpc
from flywheel.store.proto_map import episode_proto
from flywheel.store.records import EpisodeQuarantined, EpisodesPushed
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.feed")

# The learner is down or slow: wait and send again. Any other failure is about the episodes sent.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.UNAUTHENTICATED}


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC message limits for both sides of the contract (the default 4 MiB is too small for long episodes)."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class Feed:
    def __init__(self, writer: BatchWriter, channel: grpc.aio.Channel, target: str, push_after_s: float,
                 batch: int, interval_s: float, max_message_bytes: int, token: str = "",
                 await_grade: tuple[str, str, bool] | None = None, busy: Callable[[], list[str]] = list):
        self.writer = writer
        # (grader source, version, every episode): push only what it scored or gave up on (all
        # episodes, or those with shadow samples)
        self.await_grade = await_grade
        self.busy = busy  # episodes whose shadow samples are still to come: pushed once they are in
        # the learner's TokenCheck: every call carries the shared token
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.LearnerStub(channel)
        self.target = target
        self.push_after_s = push_after_s
        self.batch = batch
        self.interval_s = interval_s
        self.max_message_bytes = max_message_bytes
        self.pushed = 0
        self.quarantined = 0
        self.last_error: str | None = None
        self.last_success = 0.0  # time.time() of the last push round that reached the learner

    async def run(self) -> None:
        """Push forever; back off (1 s doubling to 30 s) while the learner is unreachable or anything fails."""
        backoff = 1.0
        while True:
            try:
                sent = await self.push_once()
                backoff = 1.0
                if sent < self.batch:
                    await asyncio.sleep(self.interval_s)
                continue
            except grpc.aio.AioRpcError as failure:
                self.last_error = f"learner at {self.target}: {failure.code().name}: {failure.details()}"
            except Exception as failure:  # a bug must not stop the feed for good: say so and go on
                log.exception("feed round failed")
                self.last_error = f"feed round failed: {failure!r}"
            log.warning("%s; retrying in %.0f s", self.last_error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def push_once(self) -> int:
        """One round: up to `batch` ready episodes; returns how many were handled (pushed or quarantined)."""
        rows = await self.writer.read(self.writer.store.episodes_to_push, self.batch, self.push_after_s,
                                      self.await_grade, self.busy())
        if not rows:
            self.last_success = time.time()
            return 0
        messages = []
        for row in rows:
            try:
                message = episode_proto(row)
            except Exception as bad:
                await self._quarantine(row["episode_id"], f"cannot convert the episode: {bad!r}")
                continue
            if message.ByteSize() > self.max_message_bytes:
                await self._quarantine(message.episode_id, f"episode is {message.ByteSize()} bytes, over the feed's "
                                                           f"max_message_bytes {self.max_message_bytes}")
                continue
            messages.append(message)
        if messages:
            await self._send(messages)
        self.last_success = time.time()
        self.last_error = None
        return len(rows)

    async def _send(self, messages: list[pb.Episode]) -> None:
        """Push `messages`; if the learner refuses the batch for what is in it, find the one by sending singly."""
        try:
            ack = await self.stub.PushEpisodes(iter(messages), timeout=60, metadata=self.metadata)
        except grpc.aio.AioRpcError as failure:
            if failure.code() in _TRANSIENT:
                raise
            if len(messages) == 1:
                await self._quarantine(messages[0].episode_id,
                                       f"learner refused it: {failure.code().name}: {failure.details()}")
                return
            for message in messages:
                await self._send([message])
            return
        await self.writer.submit(EpisodesPushed(tuple(ack.episode_ids), datetime.now(timezone.utc)))
        self.pushed += ack.accepted

    async def _quarantine(self, episode_id: str, error: str) -> None:
        log.error("episode %s quarantined: %s", episode_id, error)
        await self.writer.submit(EpisodeQuarantined(episode_id, error, datetime.now(timezone.utc)))
        self.quarantined += 1

    async def push_ready(self) -> None:
        """Everything accepted so far becomes visible, and everything ready is pushed now."""
        await self.writer.flush(timeout_s=30)
        while await self.push_once() == self.batch:
            pass

    def health(self) -> dict:
        return {"learner": self.target, "ok": self.last_error is None, "last_error": self.last_error,
                "pushed_episodes": self.pushed, "quarantined_episodes": self.quarantined,
                "last_success": self.last_success}

    def train(self, wait: bool, force: bool = False) -> AsyncIterator[pb.TrainEvent]:
        """An update now: its events as the learner streams them (every one with `wait`); `force`
        publishes what the learner's guards held back first."""
        return self.stub.Train(pb.TrainRequest(wait=wait, force=force), metadata=self.metadata)

    async def status(self) -> pb.LearnerStatus:
        return await self.stub.Status(pb.StatusRequest(), timeout=10, metadata=self.metadata)

    async def erase(self, episode_ids: list[str]) -> int:
        """Have the learner drop these episodes from its buffer, on disk too; how many it held."""
        reply = await self.stub.Erase(pb.EraseRequest(episode_ids=episode_ids), timeout=30, metadata=self.metadata)
        return reply.erased
