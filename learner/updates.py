"""What the learner trains on and when: plans, scheduled and on-demand updates.

An update runs when enough trainable groups are buffered (or on a timer, or on demand
through Train): credit assignment, staleness filter, advantages (the `Plan`), then one
GRPO update per trained adapter on a worker thread, so the gRPC server keeps answering.
Each new adapter version is saved atomically and handed to the `Publisher`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from flywheel.learner.advantages import AdvantageStats, Baseline, Scored, compute_advantages
from flywheel.learner.buffer import EpisodeBuffer
from flywheel.learner.config import LearnerConfig
from flywheel.learner.credit import Transition, agent_filter, assign
from flywheel.learner.publish import Publisher
from flywheel.protos import flywheel_pb2 as pb

log = logging.getLogger("flywheel.learner")

_VERSION = re.compile(r"-v(\d+)$")

Emit = Callable[[pb.TrainEvent], None]


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


@dataclass(frozen=True)
class AdapterBatch:
    """What one adapter trains on in an update: scored transitions and their advantage statistics."""

    scored: list[Scored]
    stats: AdvantageStats


@dataclass(frozen=True)
class Plan:
    """What an update would train on now."""

    episodes: list[pb.Episode]  # every buffered episode it considered
    batches: dict[str, AdapterBatch]  # adapter -> its batch; adapters with nothing trainable are absent
    groups: int  # trainable groups over all adapters
    skipped: Counter  # transitions not trained on, by reason


class Learner:
    def __init__(self, config: LearnerConfig, model_dir: str):
        self.config = config
        self.model_dir = model_dir
        self.state_dir = Path(config.state_dir)
        self.buffer = EpisodeBuffer(self.state_dir)
        self.publisher = Publisher(self.state_dir, config.proxy)
        self.trains = agent_filter(config.train_agents)
        self.baselines: dict[str, Baseline] = {}
        self.trainer = None  # loaded on the first update: start-up stays fast
        self.updates = 0
        self.last_update = time.time()
        self.training = asyncio.Lock()

    # ---- what to train on ---------------------------------------------------

    def adapter_for(self, agent: str) -> str:
        return self.config.shared_adapter or agent

    def _transitions(self, episodes) -> tuple[dict[str, list[Transition]], Counter]:
        by_adapter: dict[str, list[Transition]] = defaultdict(list)
        skipped = Counter()
        for episode in episodes:
            transitions, why = assign(episode, self.config.credit, self.trains)
            skipped.update(why)
            for t in transitions:
                if self.publisher.version(t.agent) - served_version(t.adapter, t.agent) >= self.config.max_staleness:
                    skipped["stale"] += 1
                else:
                    by_adapter[self.adapter_for(t.agent)].append(t)
        return by_adapter, skipped

    def plan(self, commit: bool = False) -> Plan:
        """What an update would train on now. Only `commit` lets the per-agent baselines learn
        from these rewards."""
        episodes = list(self.buffer.pending.values())
        by_adapter, skipped = self._transitions(episodes)
        batches, groups = {}, 0
        baselines = self.baselines if commit else {k: Baseline(**asdict(v)) for k, v in self.baselines.items()}
        for adapter, transitions in by_adapter.items():
            scored, stats = compute_advantages(transitions, self.config.advantages, baselines)
            skipped.update(stats.skipped)
            groups += stats.groups
            if scored:
                batches[adapter] = AdapterBatch(scored, stats)
        return Plan(episodes, batches, groups, skipped)

    # ---- updates ------------------------------------------------------------

    async def update(self, reason: str, emit: Emit | None = None) -> list[pb.AdapterPublished]:
        emit = emit or (lambda event: None)
        async with self.training:
            plan = self.plan(commit=True)
            if not plan.batches:
                emit(pb.TrainEvent(progress=f"nothing to train: {len(plan.episodes)} episodes buffered, "
                                            f"no trainable group (skipped: {dict(plan.skipped)})"))
                return []
            emit(pb.TrainEvent(progress=f"update ({reason}): {plan.groups} groups from {len(plan.episodes)} episodes"))
            if self.trainer is None:
                emit(pb.TrainEvent(progress="loading the model"))
                self.trainer = await asyncio.to_thread(self._load_trainer)
            published = []
            for adapter, batch in plan.batches.items():
                for event in await self._update_adapter(adapter, batch, plan.skipped, emit):
                    published.append(event)
                    emit(pb.TrainEvent(published=event))
            self.buffer.consume(e.episode_id for e in plan.episodes)
            self.updates += 1
            self.last_update = time.time()
            return published

    async def _update_adapter(self, adapter: str, batch: AdapterBatch, skipped: Counter,
                              emit: Emit) -> list[pb.AdapterPublished]:
        scored = batch.scored
        stats = await asyncio.to_thread(self.trainer.update, adapter, scored, self._progress(adapter))
        if self.config.max_logprob_mismatch and stats.mismatch_mean > self.config.max_logprob_mismatch:
            emit(pb.TrainEvent(error=f"{adapter}: learner/vLLM logprob gap {stats.mismatch_mean:.3f} "
                                     f"exceeds max_logprob_mismatch; not published"))
            return []
        metrics = pb.UpdateMetrics(
            agent=adapter, episodes=len({s.transition.episode_id for s in scored}),
            transitions=len(scored), tokens=stats.tokens, loss=stats.loss,
            reward_mean=sum(s.transition.reward for s in scored) / len(scored),
            advantage_mean=batch.stats.mean, advantage_std=batch.stats.std,
            clip_fraction=stats.clip_fraction, kl=stats.kl, entropy=stats.entropy,
            tokens_per_s=stats.tokens_per_s, grad_norm=stats.grad_norm,
            logprob_mismatch_mean=stats.mismatch_mean, logprob_mismatch_max=stats.mismatch_max,
            seconds=stats.seconds, skipped=dict(skipped))
        emit(pb.TrainEvent(metrics=metrics))
        agents = sorted({s.transition.agent for s in scored}) if self.config.shared_adapter else [adapter]
        number = max(self.publisher.version(a) for a in agents) + 1
        directory = await asyncio.to_thread(
            self.trainer.save, adapter, self.state_dir / "adapters" / adapter / f"update-{int(time.time())}-{number}")
        return await self.publisher.publish(directory, agents, metrics)

    def _load_trainer(self):
        from flywheel.learner.trainer import PolicyTrainer

        trainer = PolicyTrainer(self.model_dir, self.config.trainer, self.config.loss)
        for agent, record in self.publisher.latest.items():
            trainer.ensure_adapter(self.adapter_for(agent), resume_from=record.path)
            log.info("resumed %s from %s", agent, record.path)
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

    async def schedule(self) -> None:
        """Update when enough groups are ready, or on the timer."""
        while True:
            await asyncio.sleep(1.0)
            if self.training.locked() or not self.buffer.pending:
                continue
            plan = self.plan()
            reason = update_due(plan.groups, time.time() - self.last_update, self.config.min_groups,
                                self.config.interval_s)
            if plan.batches and reason:
                try:
                    await self.update(reason)
                except Exception:
                    log.exception("update failed; the episodes stay buffered")
                    await asyncio.sleep(10)

    def status(self) -> pb.LearnerStatus:
        plan = self.plan()
        agents = set(self.publisher.latest) | {s.transition.agent for b in plan.batches.values() for s in b.scored}
        return pb.LearnerStatus(
            buffered_episodes=len(plan.episodes), episodes_received=self.buffer.received, updates=self.updates,
            training=self.training.locked(),
            agents=[pb.AgentStatus(
                agent=a, version=self.publisher.version(a),
                buffered_transitions=sum(1 for b in plan.batches.values() for s in b.scored if s.transition.agent == a),
                ready_groups=plan.batches[self.adapter_for(a)].stats.groups if self.adapter_for(a) in plan.batches
                else 0,
                last_update=self.last_update) for a in sorted(agents)])
