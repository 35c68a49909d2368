"""Store rows <-> the protobuf contract with the learner, through the column spec (schema.py).

Every column marked `proto` travels in the same-named field of its table's message
(TIMESTAMPTZ as unix seconds, JSON maps as maps): `episode_proto` turns an episode row with
its calls and feedback (as `Store.episodes_to_push` returns it) into the `Episode` the
learner receives; `train_run_record` turns the learner's `UpdateMetrics` (as JSON) back into
a `train_runs` row. `tests/test_protos.py` fails if the spec and the messages drift apart.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from flywheel.protos import flywheel_pb2 as pb
from flywheel.store.records import AdapterRow, TrainRun
from flywheel.store.schema import CALLS, EPISODES, FEEDBACK, Table


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
        call.rewards.extend(call_rewards.get(call_row["call_id"], ()))
    return episode


_RUN_IDENTITY = ("run_id", "created_at", "served_name", "agent", "version", "skipped", "held")


def train_run_record(metrics: dict, row: AdapterRow | None, run_id: str, created_at: datetime) -> TrainRun:
    """A `train_runs` row from the learner's UpdateMetrics (as JSON) and the adapter version it
    produced (None: an update a guard held back, which produced none)."""
    numeric = {f.name: (int if f.type == "int" else float)(metrics.get(f.name) or 0)  # int64 arrives as text
               for f in dataclasses.fields(TrainRun) if f.name not in _RUN_IDENTITY}
    return TrainRun(run_id=run_id, created_at=created_at, served_name=row.served_name if row else None,
                    agent=row.agent if row else str(metrics.get("agent", "")), version=row.version if row else None,
                    skipped=json.dumps(metrics.get("skipped") or {}), held=metrics.get("held") or None, **numeric)
