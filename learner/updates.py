"""What the learner trains on and when: plans, scheduled and on-demand updates, all-or-nothing.

An update takes the buffered episodes that are ready (`ready_episodes`: one-off episodes,
and the attempts of tasks whose groups are ready under `group_policy`, or have gone
quiet), assigns credit, filters stale calls, computes advantages (the `Plan`), then runs one GRPO update per trained adapter on
a worker thread, so the gRPC server keeps answering. It is transactional:

- everything that can refuse an adapter's update (the learner/vLLM logprob gap) is checked
  before its optimizer step; an update that fails part-way restores every adapter it
  already stepped from a snapshot, and its episodes stay buffered;
- each stepped adapter is saved, and the saved directories are recorded in `pending.json`
  before publishing; a failed publish is retried from that record (never by training
  again), also after a restart;
- the episodes are consumed, and the agents' baselines (`baselines.json`) and the tasks'
  latest returns (`task_returns.json`, the rolling groups) advance, only once every
  version of the update is published;
- an adapter whose update crosses a `[learner.guards]` limit is kept but not published: it
  is recorded as held (`guards.json`, `train_runs.held`) until the next update within the
  limits publishes, or `force` publishes it as it is.

Under torchrun this is rank 0, and each adapter's update runs on every rank together
(`distributed.Followers`); `close` tells the other ranks to stop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

from google.protobuf.json_format import MessageToDict, ParseDict

from flywheel.learner.advantages import AdvantageStats, Baseline, Scored, TaskReturns, compute_advantages
from flywheel.learner.buffer import EpisodeBuffer
from flywheel.learner.config import LearnerConfig
from flywheel.learner.credit import Transition, agent_filter, assign
from flywheel.learner.distributed import Followers, Ranks
from flywheel.learner.durable import write_json
from flywheel.learner.guards import UpdateSignals, crossed
from flywheel.learner.publish import PublishError, Publisher
from flywheel.protos import flywheel_pb2 as pb

log = logging.getLogger("flywheel.learner")

_VERSION = re.compile(r"-v(\d+)$")
_FORCED = "published by --force despite: "  # train_runs.held of a held version published by hand

Emit = Callable[[pb.TrainEvent], None]


def served_version(adapter: str, agent_prefix: str) -> int:
    """`{agent}-v{N}` -> N; the base model (or another agent's adapter) -> 0."""
    match = _VERSION.search(adapter)
    return int(match.group(1)) if match and adapter[: match.start()] == agent_prefix else 0


def update_due(ready_episodes: int, since_last_s: float, min_episodes: int, interval_s: float) -> str | None:
    """Why an update is due, given something is trainable: "scheduled" (enough trainable
    episodes), "timer" (interval passed), or None.
    0 turns either trigger off; with both off, updates happen only on demand."""
    if min_episodes and ready_episodes >= min_episodes:
        return "scheduled"
    if interval_s and since_last_s >= interval_s:
        return "timer"
    return None


def ready_episodes(episodes: Sequence[pb.Episode], arrived: dict[str, float], now: float, min_attempts: int,
                   group_wait_s: float, trained: dict[str, int] | None = None) -> list[pb.Episode]:
    """The episodes an update may take now, in arrival order: every episode without a task id,
    and the buffered attempts of each task that has `min_attempts`, counting the `trained`
    ones (task -> attempts already trained on, for rolling groups), or whose latest attempt
    arrived `group_wait_s` ago. The attempts of a task still short of that stay buffered."""
    trained = trained or {}
    by_task: dict[str, list[pb.Episode]] = defaultdict(list)
    for episode in episodes:
        by_task[episode.task_id].append(episode)
    ready = {task for task, members in by_task.items()
             if not task or len(members) + trained.get(task, 0) >= min_attempts
             or now - max(arrived.get(m.episode_id, 0.0) for m in members) >= group_wait_s}
    return [e for e in episodes if e.task_id in ready]


@dataclass(frozen=True)
class AdapterBatch:
    """What one adapter trains on in an update: scored transitions and their advantage statistics."""

    scored: list[Scored]
    stats: AdvantageStats


@dataclass(frozen=True)
class Plan:
    """What an update would train on now."""

    episodes: list[pb.Episode]  # the ready episodes it considered: consumed once the update is published
    waiting: int  # episodes of groups still filling, left buffered
    batches: dict[str, AdapterBatch]  # adapter -> its batch; adapters with nothing trainable are absent
    skipped: Counter  # transitions not trained on, by reason
    baselines: dict[str, Baseline]  # the agents' baselines once these episodes are learnt from
    task_returns: TaskReturns | None  # the tasks' latest returns once these are learnt from (rolling groups)

    @property
    def groups(self) -> int:
        return sum(b.stats.groups for b in self.batches.values())

    @property
    def trainable_episodes(self) -> int:
        return len({s.transition.episode_id for b in self.batches.values() for s in b.scored})


@dataclass
class PendingUpdate:
    """A trained update whose versions are not all published yet (`pending.json`)."""

    episode_ids: list[str]
    baselines: dict[str, dict]  # agent -> Baseline fields
    publishes: list[dict] = field(default_factory=list)  # {"agent", "directory", "metrics"}, in order
    task_returns: dict[str, list[float]] = field(default_factory=dict)  # TaskReturns.values


class Learner:
    def __init__(self, config: LearnerConfig, model_dir: str, ranks: Ranks = Ranks()):
        """`ranks`: under torchrun, rank 0's place in the job (the other ranks run `service.follow`)."""
        self.config = config
        self.model_dir = model_dir
        self.ranks = ranks
        self.followers = Followers(ranks) if ranks.world > 1 else None
        self.state_dir = Path(config.state_dir)
        self.buffer = EpisodeBuffer(self.state_dir)
        self.publisher = Publisher(self.state_dir, config.proxy, config.proxy_key)
        self.trains = agent_filter(config.train_agents)
        self.baselines_file = self.state_dir / "baselines.json"
        self.baselines = _read_baselines(self.baselines_file)
        self.task_returns_file = self.state_dir / "task_returns.json"
        self.task_returns = TaskReturns(window=config.group_size, values=json.loads(
            self.task_returns_file.read_text()) if self.task_returns_file.exists() else {})
        self.pending_file = self.state_dir / "pending.json"
        self.pending = PendingUpdate(**json.loads(self.pending_file.read_text())) if self.pending_file.exists() else None
        self.guards_file = self.state_dir / "guards.json"
        guards = json.loads(self.guards_file.read_text()) if self.guards_file.exists() else {}
        self.held: dict[str, dict] = guards.get("held", {})  # agent -> {"directory", "metrics", "reason"}
        self.first_lengths: dict[str, float] = guards.get("first_lengths", {})  # adapter -> mean completion length
        self.trainer = None  # loaded on the first update: start-up stays fast
        self.updates = 0
        self.last_update = time.time()
        self.last_error = ""  # why the latest update or publish failed; "" once one succeeds
        self.training = asyncio.Lock()

    # ---- what to train on ---------------------------------------------------

    def adapter_for(self, agent: str) -> str:
        return self.config.shared_adapter or agent

    def _transitions(self, episodes) -> tuple[dict[str, list[Transition]], Counter]:
        by_adapter: dict[str, list[Transition]] = defaultdict(list)
        skipped = Counter()
        for episode in episodes:
            transitions, why = assign(episode, self.config.credit, self.trains,
                                      tuple(self.config.advantages.dim_weights or ()))
            skipped.update(why)
            for t in transitions:
                if self.publisher.version(t.agent) - served_version(t.adapter, t.agent) >= self.config.max_staleness:
                    skipped["stale"] += 1
                else:
                    by_adapter[self.adapter_for(t.agent)].append(t)
        return by_adapter, skipped

    def plan(self, now: float | None = None) -> Plan:
        """What an update would train on now; the learner's own baselines are left as they are."""
        pending = list(self.buffer.pending.values())
        rolling = self.config.group_policy == "rolling"
        episodes = ready_episodes(pending, self.buffer.arrived, time.time() if now is None else now,
                                  2 if rolling else self.config.group_size, self.config.group_wait_s,
                                  self.task_returns.attempts() if rolling else None)
        by_adapter, skipped = self._transitions(episodes)
        batches = {}
        baselines = {agent: Baseline(**asdict(b)) for agent, b in self.baselines.items()}
        task_returns = replace(self.task_returns, values=dict(self.task_returns.values)) if rolling else None
        for adapter, transitions in by_adapter.items():
            scored, stats = compute_advantages(transitions, self.config.advantages, baselines, task_returns)
            skipped.update(stats.skipped)
            if scored:
                batches[adapter] = AdapterBatch(scored, stats)
        return Plan(episodes, len(pending) - len(episodes), batches, skipped, baselines, task_returns)

    # ---- updates ------------------------------------------------------------

    async def update(self, reason: str, emit: Emit | None = None, force: bool = False) -> list[pb.AdapterPublished]:
        """Train on what is ready and publish it; raises PublishError if publishing fails (the
        trained versions stay pending and are published by the next call). `force`: publish the
        versions the guards held back instead."""
        emit = emit or (lambda event: None)
        async with self.training:
            try:
                if force and self.held and self.pending is None:
                    return await self._publish_held(emit)
                return await self._update(reason, emit)
            except Exception as failure:
                self.last_error = f"{type(failure).__name__}: {failure}"
                raise

    async def _update(self, reason: str, emit: Emit) -> list[pb.AdapterPublished]:
        if self.pending is not None:
            emit(pb.TrainEvent(progress=f"publishing the {len(self.pending.publishes)} version(s) of the last "
                                        "update first"))
            return await self._publish_pending(emit)
        plan = self.plan()
        if not plan.batches:
            emit(pb.TrainEvent(progress=f"nothing to train: {len(plan.episodes)} episodes ready, {plan.waiting} "
                                        f"in groups still filling (skipped: {dict(plan.skipped)})"))
            # ready episodes without a learning signal now never get one (their groups are complete,
            # their rewards equal): they leave the buffer, and what they taught the baselines stays
            self._consume(self._pending_update(plan, []))
            return []
        emit(pb.TrainEvent(progress=f"update ({reason}): {plan.groups} groups, {plan.trainable_episodes} "
                                    f"trainable episodes of {len(plan.episodes)} ready"))
        if self.trainer is None:
            emit(pb.TrainEvent(progress="loading the model"))
            self.trainer = await asyncio.to_thread(self._load_trainer)
        self._set_pending(self._pending_update(plan, await self._train_all(plan, emit)))
        return await self._publish_pending(emit)

    def _pending_update(self, plan: Plan, publishes: list[dict]) -> PendingUpdate:
        return PendingUpdate([e.episode_id for e in plan.episodes], {a: asdict(b) for a, b in plan.baselines.items()},
                             publishes, plan.task_returns.values if plan.task_returns else self.task_returns.values)

    async def _train_all(self, plan: Plan, emit: Emit) -> list[dict]:
        """One update per adapter; if one fails, every adapter already stepped is restored."""
        from flywheel.learner.trainer import UpdateRefused

        snapshots = {}
        publishes = []
        step = self.trainer.update if self.followers is None else partial(self.followers.update, self.trainer)
        try:
            for adapter, batch in plan.batches.items():
                snapshots[adapter] = await asyncio.to_thread(self.trainer.snapshot, adapter)
                try:
                    stats = await asyncio.to_thread(step, adapter, batch.scored, self._progress(adapter),
                                                    self.config.max_logprob_mismatch)
                except UpdateRefused as refused:
                    emit(pb.TrainEvent(error=f"{adapter}: {refused}; not trained, not published"))
                    continue
                metrics = _metrics(adapter, batch, stats, plan.skipped)
                mean_length = stats.tokens / len(batch.scored)
                metrics.held = "; ".join(crossed(UpdateSignals(
                    stats.step_kl, stats.entropy, mean_length, self.first_lengths.setdefault(adapter, mean_length),
                    stats.grad_norm, stats.clip_fraction), self.config.guards))
                emit(pb.TrainEvent(metrics=metrics))
                if metrics.held:
                    emit(pb.TrainEvent(error=f"{adapter}: update kept, not published: {metrics.held}"))
                agents = sorted({s.transition.agent for s in batch.scored}) if self.config.shared_adapter else [adapter]
                number = max(self.publisher.version(a) for a in agents) + 1
                directory = await asyncio.to_thread(
                    self.trainer.save, adapter,
                    self.state_dir / "adapters" / adapter / f"update-{time.time_ns()}-{number}")
                publishes += [{"agent": a, "directory": str(directory),
                               "metrics": MessageToDict(metrics, preserving_proto_field_name=True)} for a in agents]
        except BaseException:
            for adapter, snapshot in snapshots.items():
                self.trainer.restore(adapter, snapshot)
                if self.followers is not None:  # restored on rank 0 alone
                    self.followers.forget(adapter)
            raise
        return publishes

    async def _publish_pending(self, emit: Emit) -> list[pb.AdapterPublished]:
        published = []
        while self.pending.publishes:
            entry = self.pending.publishes[0]
            metrics = ParseDict(entry["metrics"], pb.UpdateMetrics())
            if metrics.held and not metrics.held.startswith(_FORCED):
                await self.publisher.record_held(metrics)
                self.held[entry["agent"]] = {"directory": entry["directory"], "metrics": entry["metrics"],
                                             "reason": metrics.held}
                log.warning("%s: update kept, not published: %s", entry["agent"], metrics.held)
            else:
                for event in await self.publisher.publish(Path(entry["directory"]), [entry["agent"]], metrics):
                    published.append(event)
                    emit(pb.TrainEvent(published=event))
                self.held.pop(entry["agent"], None)  # the published version carries any held step
            self._write_guards()
            self.pending.publishes.pop(0)
            self._set_pending(self.pending)
        self._consume(self.pending)
        self._set_pending(None)
        self.updates += 1
        self.last_update = time.time()
        self.last_error = ""
        return published

    async def _publish_held(self, emit: Emit) -> list[pb.AdapterPublished]:
        """The versions the guards held back, published as they are (`flywheel train --force`)."""
        publishes = [{"agent": agent, "directory": entry["directory"],
                      "metrics": {**entry["metrics"], "held": f"{_FORCED}{entry['reason']}"}}
                     for agent, entry in sorted(self.held.items())]
        emit(pb.TrainEvent(progress=f"publishing {len(publishes)} held version(s) (--force)"))
        self._set_pending(PendingUpdate([], {a: asdict(b) for a, b in self.baselines.items()}, publishes,
                                        self.task_returns.values))
        return await self._publish_pending(emit)

    def _write_guards(self) -> None:
        write_json(self.guards_file, {"held": self.held, "first_lengths": self.first_lengths})

    def _consume(self, update: PendingUpdate) -> None:
        """The update's episodes are used: they leave the buffer, and the baselines and task
        returns they moved are kept."""
        write_json(self.baselines_file, update.baselines)
        write_json(self.task_returns_file, update.task_returns)
        self.baselines = {agent: Baseline(**b) for agent, b in update.baselines.items()}
        self.task_returns = replace(self.task_returns, values=dict(update.task_returns))
        self.buffer.consume(update.episode_ids)

    def _set_pending(self, pending: PendingUpdate | None) -> None:
        self.pending = pending
        if pending is None:
            self.pending_file.unlink(missing_ok=True)
        else:
            write_json(self.pending_file, asdict(pending))

    def _load_trainer(self):
        from flywheel.learner.trainer import PolicyTrainer

        trainer = PolicyTrainer(self.model_dir, self.config.trainer, self.config.loss, self.ranks)
        latest = {agent: record.path for agent, record in self.publisher.latest.items()}
        latest |= {agent: entry["directory"] for agent, entry in self.held.items()}  # trained after those
        for entry in self.pending.publishes if self.pending else ():  # trained, not yet published: newer
            latest[entry["agent"]] = entry["directory"]
        for agent, path in latest.items():
            trainer.ensure_adapter(self.adapter_for(agent), resume_from=path)
            log.info("resumed %s from %s", agent, path)
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

    def close(self) -> None:
        """Under torchrun, tell the other ranks to stop (after the update in flight, if any)."""
        if self.followers is not None:
            self.followers.stop()

    async def schedule(self) -> None:
        """Update when enough trainable episodes are ready, or on the timer; publish what is pending."""
        while True:
            await asyncio.sleep(1.0)
            if self.training.locked():
                continue
            try:
                if self.pending is not None:
                    await self.update("retrying publish")
                    continue
                if not self.buffer.pending:
                    continue
                plan = self.plan()
                reason = update_due(plan.trainable_episodes, time.time() - self.last_update, self.config.min_episodes,
                                    self.config.interval_s)
                if plan.batches and reason:
                    await self.update(reason)
            except PublishError as failure:
                log.warning("publishing failed (%s); retrying in 10 s", failure)
                await asyncio.sleep(10)
            except Exception:
                log.exception("update failed; the episodes stay buffered")
                await asyncio.sleep(10)

    def status(self) -> pb.LearnerStatus:
        plan = self.plan()
        agents = set(self.publisher.latest) | {s.transition.agent for b in plan.batches.values() for s in b.scored}
        return pb.LearnerStatus(
            buffered_episodes=len(self.buffer.pending), episodes_received=self.buffer.received, updates=self.updates,
            training=self.training.locked(), waiting_episodes=plan.waiting,
            pending_publishes=len(self.pending.publishes) if self.pending else 0, last_error=self.last_error,
            held={agent: entry["reason"] for agent, entry in self.held.items()},
            agents=[pb.AgentStatus(
                agent=a, version=self.publisher.version(a),
                buffered_transitions=sum(1 for b in plan.batches.values() for s in b.scored if s.transition.agent == a),
                ready_groups=plan.batches[self.adapter_for(a)].stats.groups if self.adapter_for(a) in plan.batches
                else 0,
                last_update=self.last_update) for a in sorted(agents)])


def _metrics(adapter: str, batch: AdapterBatch, stats, skipped: Counter) -> pb.UpdateMetrics:
    scored = batch.scored
    return pb.UpdateMetrics(
        agent=adapter, episodes=len({s.transition.episode_id for s in scored}),
        transitions=len(scored), tokens=stats.tokens, loss=stats.loss,
        reward_mean=sum(s.transition.reward for s in scored) / len(scored),
        advantage_mean=batch.stats.mean, advantage_std=batch.stats.std,
        clip_fraction=stats.clip_fraction, kl=stats.kl, entropy=stats.entropy,
        tokens_per_s=stats.tokens_per_s, grad_norm=stats.grad_norm,
        logprob_mismatch_mean=stats.mismatch_mean, logprob_mismatch_max=stats.mismatch_max,
        seconds=stats.seconds, skipped=dict(skipped), step_kl=stats.step_kl)


def _read_baselines(path: Path) -> dict[str, Baseline]:
    return {agent: Baseline(**b) for agent, b in json.loads(path.read_text()).items()} if path.exists() else {}
