"""The learner's settings: `[learner]` in flywheel.toml, then FLYWHEEL_LEARNER_* env vars, then flags."""

from __future__ import annotations

from dataclasses import dataclass

from learner.advantages import AdvantageConfig
from learner.credit import CreditConfig
from learner.loss import LossConfig
from learner.trainer import ALL_LINEAR, TrainerConfig


@dataclass(frozen=True)
class LearnerConfig:
    # Hugging Face model directory: the base model vLLM serves ("" = the embedded SmolLM2)
    model: str = ""
    # gRPC address the learner listens on
    listen: str = "127.0.0.1:8401"
    # the proxy that publishes adapters into vLLM and records train_runs
    proxy: str = "http://127.0.0.1:8400"
    # where the learner keeps its buffer, adapters and optimizer states
    state_dir: str = "flywheel-learner"
    # agents to train: a regex matched against the whole agent name
    train_agents: str = ".*"
    # "" = one adapter per agent; a name = one adapter of that name shared by all trained agents
    shared_adapter: str = ""
    # --- scheduling ---
    # update once this many trainable groups (agent x task with differing rewards) are buffered
    # (0 = never by count: only on the timer or on demand, e.g. `flywheel train`)
    min_groups: int = 8
    # ...or this many seconds after the last update, if anything is trainable (0 = never by time)
    interval_s: float = 0.0
    # --- credit assignment ---
    credit: str = "identical"  # identical (LightningRL) | discounted
    gamma: float = 1.0  # discounted: per call back from the end of the episode
    call_feedback: str = "add"  # a call's own reward is added to | overrides its credit
    dim_weights: str = ""  # "correct=1,style=0.2": reward = weighted sum of dims ("" = the scalar reward)
    skip_truncated: bool = True  # skip completions cut off by max_tokens
    max_tokens: int = 4096  # skip transitions longer than this (prompt + completion)
    # --- advantages ---
    scale: str = "group"  # group | batch | none
    # --- loss (TRL GRPOTrainer's definitions) ---
    loss_type: str = "dapo"  # dapo | grpo | dr_grpo
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0  # k3 KL to the base model; 0 skips the reference pass
    is_cap: float = 2.0  # truncated importance weight cap for off-policy tokens (0 = off)
    max_staleness: int = 4  # drop calls served by adapter versions this many or more behind the current
    # --- optimisation ---
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = ",".join(ALL_LINEAR)
    lr: float = 2e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 1024  # padded tokens per forward/backward: bounds activation memory (~2.3 GB on SmolLM2-135M)
    ppo_epochs: int = 1
    dtype: str = "bfloat16"
    threads: int = 0
    # refuse an update whose learner/vLLM logprob gap (mean |diff| per token) exceeds this (0 = report only)
    max_logprob_mismatch: float = 0.0
    # config file this was read from (set by the CLI)
    config: str = ""

    def trainer(self, model_dir: str) -> TrainerConfig:
        return TrainerConfig(
            model=model_dir, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=tuple(m.strip() for m in self.target_modules.split(",") if m.strip()), lr=self.lr,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
            micro_batch_tokens=self.micro_batch_tokens, ppo_epochs=self.ppo_epochs, dtype=self.dtype,
            threads=self.threads,
            loss=LossConfig(epsilon=self.epsilon, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                            beta=self.beta, is_cap=self.is_cap),
        )

    def credit_config(self) -> CreditConfig:
        weights = None
        if self.dim_weights:
            weights = {k.strip(): float(v) for k, v in (pair.split("=") for pair in self.dim_weights.split(","))}
        return CreditConfig(mode=self.credit, gamma=self.gamma, call_feedback=self.call_feedback,
                            dim_weights=weights, skip_truncated=self.skip_truncated, max_tokens=self.max_tokens)

    def advantage_config(self) -> AdvantageConfig:
        return AdvantageConfig(scale=self.scale)
