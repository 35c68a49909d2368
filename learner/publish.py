"""Publishing: a saved adapter directory becomes the agent's new version in the running vLLM.

The learner never touches vLLM or the store itself: it registers each saved directory with
the proxy (`POST /v1/adapters`, with the update's metrics for `train_runs`), which loads it
into vLLM, routes the agent to it and records it. `agents.json` in the state directory
remembers the latest published version of each agent, so a restarted learner resumes from
its weights and optimizer state. Watchers (the WatchAdapters RPC) hear of each version.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from google.protobuf.json_format import MessageToDict

from flywheel.learner.durable import write_json
from flywheel.protos import flywheel_pb2 as pb

log = logging.getLogger("flywheel.learner")


class PublishError(RuntimeError):
    """The proxy did not take an adapter version (unreachable, or it refused the directory)."""


@dataclass(frozen=True)
class Published:
    """The latest version of one agent's adapter, as the proxy registered it."""

    version: int
    served_name: str
    path: str


class Publisher:
    def __init__(self, state_dir: Path, proxy_url: str, proxy_key: str = ""):
        self.agents_file = Path(state_dir) / "agents.json"
        self.proxy_url = proxy_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {proxy_key}"} if proxy_key else {}
        found = json.loads(self.agents_file.read_text()) if self.agents_file.exists() else {}
        self.latest: dict[str, Published] = {agent: Published(**record) for agent, record in found.items()}
        self.watchers: list[asyncio.Queue] = []

    def version(self, agent: str) -> int:
        """The agent's latest published version; 0 = the base model."""
        record = self.latest.get(agent)
        return record.version if record else 0

    async def record_held(self, metrics: pb.UpdateMetrics) -> None:
        """Record in `train_runs` an update the guards held back (it has no version); raises PublishError."""
        body = {"train_run": MessageToDict(metrics, preserving_proto_field_name=True,
                                           always_print_fields_with_no_presence=True)}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60), headers=self.headers) as session:
            try:
                async with session.post(f"{self.proxy_url}/v1/learner/runs", json=body) as response:
                    if response.status != 201:
                        raise PublishError(f"proxy refused the held update's record: {await response.text()}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as failure:
                raise PublishError(f"proxy at {self.proxy_url} unreachable: {failure!r}") from None

    async def publish(self, directory: Path, agents: list[str], metrics: pb.UpdateMetrics) -> list[pb.AdapterPublished]:
        """Register `directory` as the next version of each of `agents`; raises PublishError."""
        events = []
        train_run = MessageToDict(metrics, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), headers=self.headers) as session:
            for agent in agents:
                body = {"agent": agent, "path": str(Path(directory).resolve()), "train_run": train_run}
                try:
                    async with session.post(f"{self.proxy_url}/v1/adapters", json=body) as response:
                        reply = await response.json(content_type=None)
                        if response.status != 201:
                            raise PublishError(f"proxy refused adapter {directory}: {reply}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as failure:
                    raise PublishError(f"proxy at {self.proxy_url} unreachable: {failure!r}") from None
                self.latest[agent] = Published(reply["version"], reply["served_name"], str(directory))
                events.append(pb.AdapterPublished(agent=agent, version=reply["version"],
                                                  served_name=reply["served_name"], path=str(directory),
                                                  metrics=metrics))
                log.info("published %s (loss %.4f, reward %.3f, %d transitions, %.1f s)", reply["served_name"],
                         metrics.loss, metrics.reward_mean, metrics.transitions, metrics.seconds)
        write_json(self.agents_file, {agent: asdict(record) for agent, record in self.latest.items()})
        for queue in self.watchers:
            for event in events:
                queue.put_nowait(event)
        return events