"""The learner process: gRPC service, scheduling, updates and publishing.

Episodes arrive over PushEpisodes into the durable buffer. An update runs when enough
trainable groups are buffered (or on a timer, or on demand through Train): credit
assignment, staleness filter, advantages, then one GRPO update per trained adapter on a
worker thread, so the gRPC server keeps answering. Each new adapter version is saved
atomically and published through the proxy's adapter registry, which hot-swaps it into
vLLM and records the update in `train_runs`. `agents.json` in the state directory
remembers the latest published version of each adapter, so a restarted learner resumes
from it (weights and optimizer state).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import aiohttp
import grpc

from learner.advantages import Baseline, compute_advantages
from learner.buffer import EpisodeBuffer
from learner.config import LearnerConfig
from learner.credit import Transition, agent_filter, assign
from protos import flywheel_pb2 as pb
from protos import flywheel_pb2_grpc as pb_grpc

log = logging.getLogger("flywheel.learner")

_VERSION = re.compile(r"-v(\d+)$")


def served_version(adapter: str, agent_prefix: str) -> int:
    """`{agent}-v{N}` -> N; the base model (or another agent's adapter) -> 0."""
    match = _VERSION.search(adapter)
    return int(match.group(1)) if match and adapter[: match.start()] == agent_prefix else 0


def update_due(ready_groups: int, since_last_s: float, min_groups: int, interval_s: float) -> str | None:
    """Why an update is due, given something is trainable: "scheduled" (enough groups), "timer"
    (interval passed), or None.
    0 turns either trigger off; with both off, updates happen only on demand."""
    if min_groups and ready_groups >= min_groups:
        return "scheduled"
    if interval_s and since_last_s >= interval_s:
        return "timer"
    return None


class Learner:
    def __init__(self, config: LearnerConfig, model_dir: str):
        self.config = config
        self.model_dir = model_dir
        self.state_dir = Path(config.state_dir)
        self.buffer = EpisodeBuffer(self.state_dir)
        self.agents_file = self.state_dir / "agents.json"
        self.published: dict[str, dict] = json.loads(self.agents_file.read_text()) if self.agents_file.exists() else {}
        self.trains = agent_filter(config.train_agents)
        self.baselines: dict[str, Baseline] = {}
        self.trainer = None  # loaded on the first update: start-up stays fast
        self.updates = 0
        self.last_update = time.time()
        self.training = asyncio.Lock()
        self.watchers: list[asyncio.Queue] = []

    # ---- what to train on ---------------------------------------------------

    def adapter_for(self, agent: str) -> str:
        return self.config.shared_adapter or agent

    def _transitions(self, episodes) -> tuple[dict[str, list[Transition]], Counter]:
        by_adapter: dict[str, list[Transition]] = defaultdict(list)
        skipped = Counter()
        credit = self.config.credit_config()
        for episode in episodes:
            transitions, why = assign(episode, credit, self.trains)
            skipped.update(why)
            for t in transitions:
                current = self.published.get(t.agent, {}).get("version", 0)
                if current - served_version(t.adapter, t.agent) >= self.config.max_staleness:
                    skipped["stale"] += 1
                else:
                    by_adapter[self.adapter_for(t.agent)].append(t)
        return by_adapter, skipped

    def plan(self, commit: bool = False):
        """What an update would train on now: episodes, {adapter: (scored, stats)}, groups, skipped.
        Only `commit` lets the per-agent baselines learn from these rewards."""
        episodes = list(self.buffer.pending.values())
        by_adapter, skipped = self._transitions(episodes)
        plan, groups = {}, 0
        baselines = self.baselines if commit else {k: Baseline(**asdict(v)) for k, v in self.baselines.items()}
        for adapter, transitions in by_adapter.items():
            scored, stats = compute_advantages(transitions, self.config.advantage_config(), baselines)
            skipped.update(stats.skipped)
            groups += stats.groups
            if scored:
                plan[adapter] = (scored, stats)
        return episodes, plan, groups, skipped

    # ---- updates ------------------------------------------------------------

    async def update(self, reason: str, emit=None) -> list[pb.AdapterPublished]:
        emit = emit or (lambda event: None)
        async with self.training:
            episodes, plan, groups, skipped = self.plan(commit=True)
            if not plan:
                emit(pb.TrainEvent(progress=f"nothing to train: {len(episodes)} episodes buffered, "
                                            f"no trainable group (skipped: {dict(skipped)})"))
                return []
            emit(pb.TrainEvent(progress=f"update ({reason}): {groups} groups from {len(episodes)} episodes"))
            if self.trainer is None:
                emit(pb.TrainEvent(progress="loading the model"))
                self.trainer = await asyncio.to_thread(self._load_trainer)
            published = []
            for adapter, (scored, advantage_stats) in plan.items():
                stats = await asyncio.to_thread(self.trainer.update, adapter, scored, self._progress(adapter))
                if self.config.max_logprob_mismatch and stats.mismatch_mean > self.config.max_logprob_mismatch:
                    emit(pb.TrainEvent(error=f"{adapter}: learner/vLLM logprob gap {stats.mismatch_mean:.3f} "
                                             f"exceeds max_logprob_mismatch; not published"))
                    continue
                metrics = pb.UpdateMetrics(
                    agent=adapter, episodes=len({s.transition.episode_id for s in scored}),
                    transitions=len(scored), tokens=stats.tokens, loss=stats.loss,
                    reward_mean=sum(s.transition.reward for s in scored) / len(scored),
                    advantage_mean=advantage_stats.mean, advantage_std=advantage_stats.std,
                    clip_fraction=stats.clip_fraction, kl=stats.kl, entropy=stats.entropy,
                    tokens_per_s=stats.tokens_per_s, grad_norm=stats.grad_norm,
                    logprob_mismatch_mean=stats.mismatch_mean, logprob_mismatch_max=stats.mismatch_max,
                    seconds=stats.seconds, skipped=dict(skipped))
                emit(pb.TrainEvent(metrics=metrics))
                agents = sorted({s.transition.agent for s in scored}) if self.config.shared_adapter else [adapter]
                for event in await self._publish(adapter, agents, metrics):
                    published.append(event)
                    emit(pb.TrainEvent(published=event))
            self.buffer.consume(e.episode_id for e in episodes)
            self.updates += 1
            self.last_update = time.time()
            return published

    def _load_trainer(self):
        from learner.trainer import PolicyTrainer

        trainer = PolicyTrainer(self.config.trainer(self.model_dir))
        for agent, record in self.published.items():
            trainer.ensure_adapter(self.adapter_for(agent), resume_from=record["path"])
            log.info("resumed %s from %s", agent, record["path"])
        return trainer

    def _progress(self, adapter: str):
        if not sys.stderr.isatty():
            return None

        def show(done: int, total: int) -> None:
            bar = "#" * (20 * done // total)
            sys.stderr.write(f"\r[learner] {adapter}: [{bar:<20}] micro-batch {done}/{total}")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

        return show

    async def _publish(self, adapter: str, agents: list[str], metrics: pb.UpdateMetrics) -> list[pb.AdapterPublished]:
        number = max([self.published.get(a, {}).get("version", 0) for a in agents] + [0]) + 1
        path = await asyncio.to_thread(self.trainer.save, adapter,
                                       self.state_dir / "adapters" / adapter / f"update-{int(time.time())}-{number}")
        events = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            for agent in agents:
                body = {"agent": agent, "path": str(path.resolve()),
                        "train_run": json.loads(_metrics_json(metrics))}
                async with session.post(f"{self.config.proxy.rstrip('/')}/v1/adapters", json=body) as response:
                    reply = await response.json()
                    if response.status != 201:
                        raise RuntimeError(f"proxy refused adapter {path}: {reply}")
                self.published[agent] = {"version": reply["version"], "served_name": reply["served_name"],
                                         "path": str(path)}
                events.append(pb.AdapterPublished(agent=agent, version=reply["version"],
                                                  served_name=reply["served_name"], path=str(path),
                                                  metrics=metrics))
                log.info("published %s (loss %.4f, reward %.3f, %d transitions, %.1f s)", reply["served_name"],
                         metrics.loss, metrics.reward_mean, metrics.transitions, metrics.seconds)
        tmp = self.agents_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.published, indent=1))
        tmp.replace(self.agents_file)
        for queue in self.watchers:
            for event in events:
                queue.put_nowait(event)
        return events

    async def schedule(self) -> None:
        """Update when enough groups are ready, or on the timer."""
        while True:
            await asyncio.sleep(1.0)
            if self.training.locked() or not self.buffer.pending:
                continue
            _, plan, groups, _ = self.plan()
            reason = update_due(groups, time.time() - self.last_update, self.config.min_groups,
                                self.config.interval_s)
            if plan and reason:
                try:
                    await self.update(reason)
                except Exception:
                    log.exception("update failed; the episodes stay buffered")
                    await asyncio.sleep(10)

    def status(self) -> pb.LearnerStatus:
        episodes, plan, _, _ = self.plan()
        agents = set(self.published) | {s.transition.agent for scored, _ in plan.values() for s in scored}
        return pb.LearnerStatus(
            buffered_episodes=len(episodes), episodes_received=self.buffer.received, updates=self.updates,
            training=self.training.locked(),
            agents=[pb.AgentStatus(
                agent=a, version=self.published.get(a, {}).get("version", 0),
                buffered_transitions=sum(1 for scored, _ in plan.values() for s in scored if s.transition.agent == a),
                ready_groups=plan[self.adapter_for(a)][1].groups if self.adapter_for(a) in plan else 0,
                last_update=self.last_update) for a in sorted(agents)])


def _metrics_json(metrics: pb.UpdateMetrics) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(metrics, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class Servicer(pb_grpc.LearnerServicer):
    def __init__(self, learner: Learner):
        self.learner = learner

    async def PushEpisodes(self, request_iterator, context):
        episodes = [episode async for episode in request_iterator]
        accepted, duplicates = self.learner.buffer.add(episodes)
        return pb.PushAck(accepted=accepted, duplicates=duplicates, episode_ids=[e.episode_id for e in episodes])

    async def Train(self, request, context):
        events: asyncio.Queue = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(self.learner.update("on demand", events.put_nowait))
        while not (task.done() and events.empty()):
            try:
                yield await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            if not request.wait:
                return
        if task.exception() is not None:
            yield pb.TrainEvent(error=str(task.exception()))

    async def Status(self, request, context):
        return self.learner.status()

    async def WatchAdapters(self, request, context):
        queue: asyncio.Queue = asyncio.Queue()
        self.learner.watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.learner.watchers.remove(queue)


async def serve(config: LearnerConfig, model_dir: str) -> None:
    learner = Learner(config, model_dir)
    server = grpc.aio.server()
    pb_grpc.add_LearnerServicer_to_server(Servicer(learner), server)
    server.add_insecure_port(config.listen)
    await server.start()
    log.info("learner listening on %s (state %s, %d episodes buffered, adapters: %s)", config.listen,
             config.state_dir, len(learner.buffer.pending), {a: r["served_name"] for a, r in learner.published.items()})
    scheduler = asyncio.get_running_loop().create_task(learner.schedule())
    try:
        await server.wait_for_termination()
    finally:
        scheduler.cancel()
        await server.stop(grace=5)
