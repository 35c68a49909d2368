"""The LoRA policy trainer: one peft adapter per trained agent (or one shared), on the CPU or CUDA.

Where the time goes is where TRL loses it: we run the LM head only on completion
positions (not on every prompt position), and where the model's logits are plain
hidden @ W^T (checked at start) `logprobs.token_logprobs` computes them 64 positions at a
time, log-probs by a gather and a logsumexp, the backward recomputing each chunk: no
(positions x vocabulary) fp32 tensor is ever kept. The LoRA layers run `fused_lora`'s
forward: the scaling on the rank-r intermediate, the sum in the GEMM. On the CPU, attention
over short rows is `attention`'s plain matmul-softmax-matmul (the CPU flash kernel's backward
is ~3x slower there). Each decoder block runs torch.compile'd (dynamic shapes), which fuses
the norms, rotary embeddings, activations and residual adds around the matmuls.
The base model stays frozen in bf16 (on the CPU its matmuls run on AMX/oneDNN); the
adapters and their AdamW state are fp32.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from flywheel.learner import attention, fused_lora
from flywheel.learner.advantages import Scored
from flywheel.learner.batching import MicroBatch, collate, pack
from flywheel.learner.devices import compile_unavailable, resolve_dtype
from flywheel.learner.distributed import (
    Ranks,
    all_max,
    all_sum,
    default_device,
    shard,
    shard_base_model,
    sum_grads,
)
from flywheel.learner.logprobs import policy_kl_from_hidden, token_logprobs
from flywheel.learner.loss import (
    LossConfig,
    Normalizer,
    aggregate,
    k3_kl,
    per_token_loss,
    policy_kl,
    truncated_is_weight,
)

log = logging.getLogger("flywheel.learner")
RECOMPILE_LIMIT = 256  # compiled variants of the one decoder block, ~6 per adapter

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainerConfig:
    """`[learner.trainer]`: the LoRA adapters and their optimisation."""

    # LoRA rank, alpha and dropout of each agent's adapter (rank must be within vLLM's --max-lora-rank)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # the linear layers that get LoRA weights
    target_modules: tuple[str, ...] = ALL_LINEAR
    # AdamW step size and weight decay. 3e-4, measured on the embedded SmolLM2-135M: with 2e-5 (a
    # full fine-tuning step size) a two-agent task stayed flat for 15 of 20 minutes of updates; with
    # 3e-4 the arithmetic example went from 0.54 to 0.94 held-out in 11.5 minutes (README). LoRA
    # wants about 10x full fine-tuning's rate (TRL's and peft's LoRA examples use 1e-4 to 5e-4)
    lr: float = 3e-4
    weight_decay: float = 0.0
    # gradient norm clipping
    max_grad_norm: float = 1.0
    # padded tokens per forward/backward: bounds activation memory (~1.5 MB per token on SmolLM2-135M;
    # 8192 grew the learner to 19 GB beside vLLM, 1024 peaks at 2.3 GB and is faster)
    micro_batch_tokens: int = 1024
    # passes over each batch; 1 = one optimizer step, ratio 1 (old policy = current)
    ppo_epochs: int = 1
    # the frozen base weights: auto = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16,
    # AMX), float32 elsewhere, where bf16 is emulated and ~13x slower (flywheel.learner.devices)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # torch threads; 0 = torch's default (all cores)
    threads: int = 0
    # where the model runs: "" = CUDA when available, else CPU; or e.g. "cuda:1", "cpu"
    device: str = ""
    # recompute each layer's activations in the backward: trades ~30% more compute for far less
    # activation memory; for long sequences or big models
    gradient_checkpointing: bool = False
    # under torchrun, shard the frozen base model's weights over the ranks (FSDP2), so each device
    # holds 1/N of them: for a base model that does not fit one device. Each block's weights are then
    # gathered from all ranks for every forward and backward, so leave it off when the model fits
    shard_base: bool = False
    # torch.compile each decoder block, with dynamic shapes (one graph for every micro-batch size):
    # it fuses the norms, rotary embeddings, activations and residual adds around the matmuls.
    # Measured on the embedded SmolLM2-135M on 2 CPU cores (bench/learner.py): 16.7 -> 12.4 s per
    # step. The first update (and the first score) of a process compiles: ~50 s on that CPU the
    # first time, ~5 s from inductor's on-disk cache after. Skipped, with a warning, where inductor
    # cannot build (a CPU without a C++ compiler, CUDA without Triton) and when the base is sharded
    compile: bool = True


def compile_blocks(model: torch.nn.Module, device: torch.device) -> int:
    """torch.compile each decoder block of `model` (a peft model), dynamic in batch and sequence
    length; returns how many (0 where inductor cannot build here, or the decoder has no `layers`)."""
    layers = getattr(model.base_model.model.get_decoder(), "layers", None)
    reason = compile_unavailable(device.type)
    if reason or not layers:
        log.warning("learner runs uncompiled: %s", reason or "the decoder has no `layers` to compile")
        return 0
    # one block graph has a variant per adapter (its weights' paths), grad mode (updates and scoring)
    # and input (the first block's needs no grad): dynamo's default 8 would leave a third adapter eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


class UpdateRefused(RuntimeError):
    """An update was refused before its optimizer step; the adapter is unchanged."""


@dataclass(frozen=True)
class AdapterSnapshot:
    weights: dict[str, torch.Tensor]  # parameter name -> a copy
    optimizer: dict  # the optimizer's state_dict, deep-copied


@dataclass(frozen=True)
class Distributions:
    """The policy's next-token distributions at a micro-batch's N completion positions, no grad:
    the final hidden states where the LM head is plain (the logits recomputed from them a
    vocabulary block at a time), else the log-probs themselves."""

    temperature_N: torch.Tensor  # (N,) each position's sampling temperature
    hidden_ND: torch.Tensor | None = None  # (N, D)
    logp_NV: torch.Tensor | None = None  # (N, V)


@dataclass
class UpdateStats:
    loss: float = 0.0
    tokens: int = 0
    padded_tokens: int = 0
    clip_fraction: float = 0.0
    kl: float = 0.0
    entropy: float = 0.0
    grad_norm: float = 0.0
    mismatch_mean: float = 0.0
    mismatch_max: float = 0.0
    step_kl: float = 0.0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.padded_tokens / self.seconds if self.seconds else 0.0


# the update's sums over micro-batches that are summed over the ranks too (flywheel.learner.distributed)
_SUMMED = ("loss", "clipped", "kl", "entropy", "mismatch", "padded_tokens", "step_kl")


class PolicyTrainer:
    def __init__(self, model_dir: str, config: TrainerConfig = TrainerConfig(), loss: LossConfig = LossConfig(),
                 ranks: Ranks = Ranks()):
        """`model_dir`: the Hugging Face directory of the base model vLLM serves. `ranks`: under
        torchrun, this process's place among the ranks that run each update together."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.loss_config = loss
        self.ranks = ranks
        self.device = torch.device(config.device or default_device(ranks))
        dtype = torch.bfloat16 if resolve_dtype(config.dtype, self.device.type) == "bfloat16" else torch.float32
        # sharded: loaded in host memory, and only each rank's shards go to its device
        self.sharded = config.shard_base and ranks.world > 1
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention.register() if self.device.type == "cpu" else None)
        base.requires_grad_(False)
        if config.gradient_checkpointing:  # non-reentrant: needs no input that requires grad, replays autocast
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.sharded:
            shard_base_model(base, self.device)
        else:
            base.to(self.device)
        self.pad_id = base.config.pad_token_id or base.config.eos_token_id or 0
        if isinstance(self.pad_id, list):
            self.pad_id = self.pad_id[0]
        self.lora_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                      lora_dropout=config.lora_dropout, target_modules=list(config.target_modules),
                                      task_type="CAUSAL_LM")
        # peft puts each adapter on its base layer's device, in fp32 (AdamW steps of ~lr vanish in bf16's
        # 8-bit mantissa)
        self.model = get_peft_model(base, self.lora_config, adapter_name="_init")
        fused_lora.install(self.model)
        self.compiled = config.compile and not self.sharded and compile_blocks(self.model, self.device) > 0
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # Over a bf16 base the fp32 adapters run under bf16 autocast, with peft's cast of their input
        # to fp32 turned off: no fp32 copy of every activation. A LoRA layer then multiplies bf16
        # activations by fp32 weights, which only autocast on the model's device accepts, so every
        # forward (update, reference and score) runs under it, in completion_logprobs.
        self.autocast = dtype == torch.bfloat16
        if self.autocast:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module in self.model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = False
        self._lm_head_weight = self._plain_lm_head()

    # ---- adapters -----------------------------------------------------------

    def ensure_adapter(self, name: str, resume_from: str | None = None) -> None:
        """Create (or load from a saved version) the adapter `name` and its optimizer."""
        if name in self.optimizers:
            return
        if resume_from:
            self.model.load_adapter(resume_from, adapter_name=name, is_trainable=True, torch_device=str(self.device))
        else:
            self.model.add_adapter(name, self.lora_config)
        self.model.set_adapter(name)
        if "_init" in self.model.peft_config:  # get_peft_model needs an adapter to start from
            self.model.delete_adapter("_init")
        params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        state = Path(resume_from or "") / "optimizer.pt"
        if resume_from and state.is_file():
            optimizer.load_state_dict(torch.load(state, map_location=self.device))
            for group in optimizer.param_groups:  # keep the saved moments, not the saved lr and weight decay
                group.update(lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.optimizers[name] = optimizer

    def save(self, name: str, out_dir: Path) -> Path:
        """Write adapter `name` (and its optimizer state) atomically: a temporary dir, then rename."""
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), selected_adapters=[name])
        saved = tmp / name if (tmp / name / "adapter_config.json").is_file() else tmp
        torch.save(self.optimizers[name].state_dict(), saved / "optimizer.pt")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        saved.rename(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        return out_dir

    # ---- log-probs ----------------------------------------------------------

    def completion_logprobs(self, mb: MicroBatch, with_entropy: bool, keep: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor | None, Distributions | None]:
        """log pi(completion token | context) for every completion position: (B, T), their
        entropies when asked, and with `keep` the policy's whole next-token distributions there
        (`Distributions`, no grad: for the step's KL).

        Logits divided by the call's sampling temperature, as vLLM's processed logprobs are.
        """
        B, T = mb.completion_ids_BT.shape
        temperature_N = mb.temperature_B.repeat_interleave(T)
        head = self.model.base_model.model.get_output_embeddings()
        # the head checked at start, unless an adapter loaded since put LoRA layers on it
        if self._lm_head_weight is not None and type(head) is torch.nn.Linear:
            hidden_ND = self._completion_hidden(mb).reshape(B * T, -1)
            logp_N, entropy_N = token_logprobs(hidden_ND, self._lm_head_weight, mb.completion_ids_BT.reshape(-1),
                                               temperature_N, with_entropy)
            kept = Distributions(temperature_N, hidden_ND=hidden_ND.detach()) if keep else None
            return logp_N.view(B, T), entropy_N.view(B, T) if with_entropy else None, kept
        logits_BTV = self._completion_logits(mb)
        lse_BT = torch.logsumexp(logits_BTV, dim=-1)
        logp_BT = logits_BTV.gather(-1, mb.completion_ids_BT.unsqueeze(-1)).squeeze(-1) - lse_BT
        entropy_BT = kept = None
        with torch.no_grad():
            if with_entropy:
                probs_BTV = torch.exp(logits_BTV - lse_BT.unsqueeze(-1))
                entropy_BT = lse_BT - (probs_BTV * logits_BTV).sum(-1)
            if keep:
                kept = Distributions(temperature_N, logp_NV=(logits_BTV - lse_BT.unsqueeze(-1)).reshape(B * T, -1))
        return logp_BT, entropy_BT, kept

    def _step_kl_N(self, before: Distributions, after: Distributions) -> torch.Tensor:
        """Exact KL(before || after) at each position: how far the step moved the policy."""
        if before.hidden_ND is not None:
            return policy_kl_from_hidden(before.hidden_ND, after.hidden_ND, self._lm_head_weight, before.temperature_N)
        return policy_kl(before.logp_NV, after.logp_NV)

    def _predicting_T(self, mb: MicroBatch) -> torch.Tensor:
        """The positions whose next-token distributions predict the completion: P - 1 + t."""
        T = mb.completion_ids_BT.shape[1]
        return torch.arange(mb.prompt_len - 1, mb.prompt_len - 1 + T, device=mb.input_ids_BL.device)

    def _completion_hidden(self, mb: MicroBatch) -> torch.Tensor:
        """(B, T, D) final hidden states at the completion positions (the LM head's input)."""
        decoder = self.model.base_model.model.get_decoder()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden_BLD = decoder(input_ids=mb.input_ids_BL, attention_mask=mb.attention_mask_BL,
                                 position_ids=mb.position_ids_BL, use_cache=False).last_hidden_state
        return hidden_BLD[:, self._predicting_T(mb)]

    def _plain_lm_head(self) -> torch.Tensor | None:
        """The LM head's weight when the model's logits are exactly hidden @ W^T, so that
        `token_logprobs` may compute them: checked on a short input against the model's own
        forward (which may softcap or scale them: Gemma-2, Granite, Cohere). None when they
        differ, and when the base is sharded (its root's weights exist only inside its forward)."""
        inner = self.model.base_model.model
        head = inner.get_output_embeddings()
        if self.sharded or type(head) is not torch.nn.Linear or head.bias is not None:
            return None
        ids_BL = torch.arange(1, 9, device=self.device)[None]
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits_BLV = inner(input_ids=ids_BL, use_cache=False).logits.float()
            hidden_BLD = inner.get_decoder()(input_ids=ids_BL, use_cache=False).last_hidden_state
            plain_BLV = (hidden_BLD.to(head.weight.dtype) @ head.weight.t()).float()
        return head.weight if torch.equal(logits_BLV, plain_BLV) else None

    def _completion_logits(self, mb: MicroBatch) -> torch.Tensor:
        """(B, T, V) fp32 logits at the completion positions, divided by each call's temperature."""
        inner = self.model.base_model.model  # the causal LM with LoRA layers injected
        # logits_to_keep runs the LM head on the completion positions alone, inside the model's own
        # forward, so its logit processing (Gemma-2 softcapping, Granite and Cohere scaling) applies.
        # As positions, not a count: a count slices the hidden states to a strided view, for which
        # the CPU matmul copies the whole LM head once per row.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits_BTV = inner(input_ids=mb.input_ids_BL, attention_mask=mb.attention_mask_BL,
                               position_ids=mb.position_ids_BL, use_cache=False,
                               logits_to_keep=self._predicting_T(mb)).logits
        logits_BTV = logits_BTV.float()
        if bool((mb.temperature_B != 1).any()):
            logits_BTV = logits_BTV / mb.temperature_B[:, None, None]
        return logits_BTV

    def score(self, name: str, items: Sequence[Scored]) -> list[list[float]]:
        """The learner's log-probs of each item's completion under adapter `name` (no grad).
        With `shard_base` under torchrun, every rank must call it with the same items at once."""
        self.model.set_adapter(name)
        self.model.eval()  # no dropout: the policy's own log-probs
        out = []
        with torch.no_grad():
            for group in pack(items, self.config.micro_batch_tokens):
                logp_BT, _, _ = self.completion_logprobs(collate(group, self.pad_id).to(self.device),
                                                         with_entropy=False)
                for item, logps in zip(group, logp_BT.tolist()):
                    out.append((item, logps[:len(item.transition.completion_ids)]))
        order = {id(item): i for i, item in enumerate(items)}
        return [lp for _, lp in sorted(out, key=lambda pair: order[id(pair[0])])]

    # ---- the update ---------------------------------------------------------

    def snapshot(self, name: str) -> AdapterSnapshot:
        """A copy of adapter `name`'s weights and optimizer state (created first if new), for `restore`."""
        self.ensure_adapter(name)
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if f".{name}." in n}
        return AdapterSnapshot(weights, copy.deepcopy(self.optimizers[name].state_dict()))

    def restore(self, name: str, snapshot: AdapterSnapshot) -> None:
        """Adapter `name` exactly as it was at `snapshot`: an update that failed part-way leaves no trace."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in snapshot.weights:
                    p.copy_(snapshot.weights[n])
        self.optimizers[name].load_state_dict(snapshot.optimizer)

    def update(self, name: str, items: Sequence[Scored], progress=None, max_mismatch: float = 0.0) -> UpdateStats:
        """One GRPO update of adapter `name` on `items` (each with its advantage).

        Raises UpdateRefused, before any optimizer step, when the mean learner/vLLM logprob gap
        over the batch exceeds `max_mismatch` (0 = never).

        Under torchrun every rank calls this with the same `items` and trains on its share of
        the micro-batches; gradients and metrics are summed over the ranks, so every rank takes
        the same step and the stats are the whole batch's."""
        config, loss_config = self.config, self.loss_config
        self.ensure_adapter(name)
        self.model.set_adapter(name)
        self.model.train()
        optimizer = self.optimizers[name]
        started = time.perf_counter()
        whole = [collate(group, self.pad_id) for group in pack(items, config.micro_batch_tokens)]
        tokens = sum(int(mb.completion_mask_BT.sum()) for mb in whole)
        # the whole batch's sizes, so the ranks' shares of the loss add up to the batch's loss
        norm = Normalizer(sequences=len(items), tokens=tokens, max_completion_len=loss_config.dr_grpo_length)
        shares = shard([mb.padded_tokens for mb in whole], self.ranks.world)
        mine = shares[self.ranks.rank]
        # sharded, every forward and backward is a collective (each block's weights are gathered from all
        # ranks): a rank with fewer micro-batches than the busiest runs the batch's smallest again, weighted 0
        fillers = max(map(len, shares)) - len(mine) if self.sharded else 0
        smallest = min(range(len(whole)), key=lambda i: whole[i].padded_tokens)
        batches = [whole[i].to(self.device) for i in mine + [smallest] * fillers]
        stats, sums = UpdateStats(tokens=tokens), Counter()
        mismatch_max = 0.0
        old_logps: list[torch.Tensor] = []
        # the step's KL is measured on the batch's first micro-batch: its policy before the step is
        # kept from its first training forward, and after the step it is run once more (sharded, by
        # every rank, as every forward is a collective there)
        owns_probe = bool(mine) and mine[0] == 0
        probe = (batches[0] if owns_probe else whole[0].to(self.device)) if owns_probe or self.sharded else None
        before = None
        for epoch in range(config.ppo_epochs):
            for i, mb in enumerate(batches):
                mask_BT = mb.completion_mask_BT.bool()
                part, gap_max = Counter(), 0.0  # this micro-batch's sums, counted unless it is a filler
                logp_BT, entropy_BT, kept = self.completion_logprobs(mb, with_entropy=epoch == 0,
                                                                     keep=owns_probe and epoch == 0 and i == 0)
                before = kept or before
                if epoch == 0:
                    old_logps.append(logp_BT.detach())
                    gap_BT = (old_logps[i] - mb.behavior_logp_BT).abs()[mask_BT]
                    part["mismatch"] += float(gap_BT.sum())
                    gap_max = float(gap_BT.max())
                    part["entropy"] += float(entropy_BT[mask_BT].sum())
                    part["padded_tokens"] += mb.padded_tokens
                ref_BT = None
                if loss_config.beta:
                    with torch.no_grad(), self.model.disable_adapter():
                        ref_BT, _, _ = self.completion_logprobs(mb, with_entropy=False)
                    part["kl"] += float(k3_kl(logp_BT.detach(), ref_BT)[mask_BT].sum())
                is_weight_BT = (truncated_is_weight(old_logps[i], mb.behavior_logp_BT, loss_config.is_cap)
                                if loss_config.is_cap > 0 else None)
                loss_BT, clipped_BT = per_token_loss(logp_BT, old_logps[i], mb.advantages_B, loss_config,
                                                     is_weight_BT, ref_BT)
                loss = aggregate(loss_BT, mb.completion_mask_BT, loss_config.loss_type, norm)
                counted = i < len(mine)
                (loss if counted else loss * 0.0).backward()
                part["loss"] += float(loss.detach())
                part["clipped"] += float(clipped_BT[mask_BT].sum())
                if counted:
                    sums.update(part)
                    mismatch_max = max(mismatch_max, gap_max)
                if progress:
                    progress(epoch * len(batches) + i + 1, config.ppo_epochs * len(batches))
            if epoch == 0 and max_mismatch:  # the whole batch's gap, so every rank refuses alike
                gap = all_sum([sums["mismatch"]], self.ranks, self.device)[0] / max(tokens, 1)
                if gap > max_mismatch:
                    optimizer.zero_grad(set_to_none=True)
                    raise UpdateRefused(f"learner/vLLM logprob gap {gap:.3f} exceeds "
                                        f"max_logprob_mismatch {max_mismatch:g}")
            params = [p for group in optimizer.param_groups for p in group["params"]]
            sum_grads(params, self.ranks)
            stats.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if probe is not None:
            with torch.no_grad():
                _, _, after = self.completion_logprobs(probe, with_entropy=False, keep=True)
            if owns_probe:
                mask_N = probe.completion_mask_BT.reshape(-1).bool()
                sums["step_kl"] = float(self._step_kl_N(before, after)[mask_N].mean())
            del before, after
        sums = Counter(dict(zip(_SUMMED, all_sum([sums[key] for key in _SUMMED], self.ranks, self.device))))
        stats.mismatch_max = all_max(mismatch_max, self.ranks, self.device)
        stats.padded_tokens = int(sums["padded_tokens"])
        stats.step_kl = sums["step_kl"]
        passes = config.ppo_epochs
        stats.loss = sums["loss"] / passes
        stats.clip_fraction = sums["clipped"] / max(tokens * passes, 1)
        stats.kl = sums["kl"] / max(tokens * passes, 1)
        stats.entropy = sums["entropy"] / max(tokens, 1)
        stats.mismatch_mean = sums["mismatch"] / max(tokens, 1)
        stats.seconds = time.perf_counter() - started
        return stats

