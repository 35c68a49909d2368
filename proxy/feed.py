"""Feeding finished episodes to the learner over gRPC, and asking it to train.

An episode is pushed once it is rewarded and closed (or rewarded and quiet for
`push_after_s`), in batches, with back-off when the learner is down; the proxy keeps
serving meanwhile. The store marks what the learner acknowledged, so an outage or a
learner restart loses nothing, and the learner ignores duplicates by episode id.
Rows become protobuf messages through the column spec (store/schema.py): every column
marked `proto` travels in the same-named field.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone
from typing import Any

import grpc

from protos import flywheel_pb2 as pb
from protos import flywheel_pb2_grpc as pb_grpc
from store.records import EpisodesPushed
from store.schema import CALLS, EPISODES, FEEDBACK, Table

log = logging.getLogger("flywheel.feed")


def fill(message, table: Table, row: dict[str, Any]) -> None:
    """Copy `row`'s proto columns into `message` (timestamps as unix seconds, JSON maps as maps)."""
    for column in table.proto_columns:
        value = row.get(column.name)
        if value is None:
            continue
        target = getattr(message, column.name)
        if column.sql_type == "TIMESTAMPTZ":
            setattr(message, column.name, value.timestamp())
        elif column.sql_type.endswith("[]"):
            target.extend(value)
        elif column.sql_type == "JSON":
            target.update(json.loads(value) if isinstance(value, str) else value)
        else:
            setattr(message, column.name, value)


def reward_proto(row: dict[str, Any]) -> pb.Reward:
    reward = pb.Reward()
    fill(reward, FEEDBACK, row)
    if row.get("dims"):
        reward.dims.update(json.loads(row["dims"]))
    return reward


def episode_proto(row: dict[str, Any]) -> pb.Episode:
    """An episode with its calls and feedback (as `Store.episodes_to_push` returns it)."""
    episode = pb.Episode()
    fill(episode, EPISODES, row)
    call_rewards: dict[str, list] = {}
    for fb in row["feedback"]:
        if fb["call_id"] is None:
            episode.rewards.append(reward_proto(fb))
        else:
            call_rewards.setdefault(fb["call_id"], []).append(reward_proto(fb))
    for call_row in row["calls"]:
        call = episode.calls.add()
        fill(call, CALLS, call_row)
        request = json.loads(call_row["request"] or "{}")
        temperature = request.get("temperature")
        call.temperature = 1.0 if temperature is None else float(temperature)
        call.choices = int(request.get("n") or 1)
        call.rewards.extend(call_rewards.get(call_row["call_id"], ()))
    return episode


class Feed:
    def __init__(self, state, target: str, push_after_s: float, batch: int, interval_s: float):
        self.state = state
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.LearnerStub(self.channel)
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
        writer = self.state.writer
        rows = await writer.read(writer.store.episodes_to_push, self.batch, self.push_after_s)
        if not rows:
            return 0
        messages = [episode_proto(row) for row in rows]
        ack = await self.stub.PushEpisodes(iter(messages), timeout=60)
        await writer.submit(EpisodesPushed(tuple(ack.episode_ids), datetime.now(timezone.utc)))
        self.pushed += ack.accepted
        self.last_error = None
        return len(messages)

    async def close(self) -> None:
        await self.channel.close()
