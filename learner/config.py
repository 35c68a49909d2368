"""The learner's settings: `[learner]` in flywheel.toml and its sub-tables, then env vars, then flags.

Each sub-table is the dataclass of the module that uses it, documented there:

    [learner]              LearnerConfig (this file): where it listens, what it trains, when
    [learner.credit]       flywheel.learner.credit.CreditConfig: episode outcome -> each call's reward
    [learner.advantages]   flywheel.learner.advantages.AdvantageConfig: rewards -> advantages
    [learner.loss]         flywheel.learner.loss.LossConfig: TRL GRPOTrainer's loss settings
    [learner.trainer]      flywheel.learner.trainer.TrainerConfig: LoRA, optimiser, micro-batches

Environment variables follow the path: FLYWHEEL_LEARNER_TRAINER_LR=3e-4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from flywheel.learner.advantages import AdvantageConfig
from flywheel.learner.credit import CreditConfig
from flywheel.learner.guards import GuardConfig
from flywheel.learner.loss import LossConfig
from flywheel.learner.trainer import TrainerConfig


@dataclass(frozen=True)
class LearnerConfig:
    # Hugging Face model directory: the base model vLLM serves ("" = the embedded SmolLM2)
    model: str = ""
    # gRPC address the learner listens on
    listen: str = "127.0.0.1:8401"
    # the proxy that publishes adapters into vLLM and records train_runs
    proxy: str = "http://127.0.0.1:8400"
    # an admin key of that proxy, when it has keys (FLYWHEEL_LEARNER_PROXY_KEY; `flywheel up` passes one)
    proxy_key: str = ""
    # token the proxy must present on the gRPC port (the proxy's learner_token); "" = none
    token: str = ""
    # where the learner keeps its buffer, adapters and optimizer states
    state_dir: str = "flywheel-learner"
    # agents to train: a regex matched against the whole agent name
    train_agents: str = ".*"
    # "" = one adapter per agent; a name = one adapter of that name shared by all trained agents
    shared_adapter: str = ""
    # update once this many episodes with a learning signal are ready (members of groups whose
    # rewards differ, and one-off episodes scored against a warm baseline); 64 is 8 tasks x 8
    # attempts (0 = never by count: only on the timer or on demand, e.g. `flywheel train`)
    min_episodes: int = 64
    # ...or this many seconds after the last update, if anything is trainable (0 = never by time)
    interval_s: float = 0.0
    # how a task's attempts (episodes sharing a task id) are grouped. "rolling": each attempt is
    # trained once, in the first update after its task has two attempts (counting those already
    # trained), against the task's latest `group_size` returns, so attempts spread over time are
    # learnt from on-policy (trickle traffic: see the README's tables). "complete": a group waits
    # until `group_size` attempts are buffered and is trained whole, as in TRL and verl; its
    # early members are by then one or more versions stale. Measured on the demo's trickle
    # traffic (attempts over 4 rounds): +0.20 complete, +0.32 rolling in 20 minutes, and the
    # trained calls' logprob gap to vLLM 0.09-0.18 nats per token complete, 0.00 rolling.
    # Either way, a lone attempt is trained as a one-off once no attempt of its task has come
    # for `group_wait_s`.
    group_policy: Literal["rolling", "complete"] = "rolling"
    # attempts per task in a complete group, and the size of a rolling group
    group_size: int = 8
    # a task with no attempt for this long stops waiting: what is buffered is trained as it is
    group_wait_s: float = 300.0
    # drop calls served by adapter versions this many or more behind the current one
    max_staleness: int = 4
    # largest episode message accepted from the proxy, bytes (gRPC's default is 4 MiB)
    max_message_bytes: int = 64 * 1024 * 1024
    # refuse an update whose learner/vLLM logprob gap (mean |diff| per token) exceeds this (0 = report only)
    max_logprob_mismatch: float = 0.0
    credit: CreditConfig = field(default_factory=CreditConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
