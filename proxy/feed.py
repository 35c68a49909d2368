"""Feeding finished episodes to the learner over gRPC, and reaching it for updates and status.

An episode is pushed once it is rewarded and closed (or rewarded and quiet for
`push_after_s`), in batches, with back-off when the learner is down; the proxy keeps
serving meanwhile. The store marks what the learner acknowledged, so an outage or a
learner restart loses nothing, and the learner ignores duplicates by episode id.
Rows become protobuf messages in `flywheel.store.proto_map`.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import AsyncIterator

import grpc

from flywheel.protos import flywheel_pb2 as pb
from flywheel.protos import flywheel_pb2_grpc as pb_grpc
from flywheel.store.proto_map import episode_proto
from flywheel.store.records import EpisodesPushed
from flywheel.store.writer import BatchWriter

log = logging.getLogger("flywheel.feed")


class Feed:
    def __init__(self, writer: BatchWriter, channel: grpc.aio.Channel, target: str, push_after_s: float,
                 batch: int, interval_s: float):
        self.writer = writer
        self.stub = pb_grpc.LearnerStub(channel)
        self.target = target
        self.push_after_s = push_after_s
        self.batch = batch
        self.interval_s = interval_s
        self.pushed = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        """Push forever; back off (1 s doubling to 30 s) while the learner is unreachable."""
        backoff = 1.0
        while True:
            try:
                sent = await self.push_once()
                backoff = 1.0
                if sent < self.batch:
                    await asyncio.sleep(self.interval_s)
            except grpc.aio.AioRpcError as failure:
                self.last_error = f"{failure.code().name}: {failure.details()}"
                log.warning("learner at %s unreachable (%s); retrying in %.0f s", self.target, self.last_error,
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def push_once(self) -> int:
        rows = await self.writer.read(self.writer.store.episodes_to_push, self.batch, self.push_after_s)
        if not rows:
            return 0
        messages = [episode_proto(row) for row in rows]
        ack = await self.stub.PushEpisodes(iter(messages), timeout=60)
        await self.writer.submit(EpisodesPushed(tuple(ack.episode_ids), datetime.now(timezone.utc)))
        self.pushed += ack.accepted
        self.last_error = None
        return len(messages)

    async def push_ready(self) -> None:
        """Everything accepted so far becomes visible, and everything ready is pushed now."""
        await self.writer.flush()
        while await self.push_once() == self.batch:
            pass

    def train(self, wait: bool) -> AsyncIterator[pb.TrainEvent]:
        """An update now: its events as the learner streams them (every one with `wait`)."""
        return self.stub.Train(pb.TrainRequest(wait=wait))

    async def status(self) -> pb.LearnerStatus:
        return await self.stub.Status(pb.StatusRequest(), timeout=10)
