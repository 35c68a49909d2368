"""One GRPO update step of Flywheel's learner on the fixed batch TRL was timed on.

The batch is ../shared/bench/grpo_batch.npz (64 completions of SmolLM2-135M-Instruct;
format in ../shared/bench/README.md): LoRA r=16, alpha=32 on all linear layers, dapo
loss, epsilon 0.2 on both sides, beta 0, ratio 1, AdamW, grad-norm clip 1. Prints seconds
per step (median of 3 after a warm-up), padded tokens/s, and achieved FLOP/s against
this machine's bf16 matmul peak measured in the same run (6 x params x tokens per step).
With --trl it also times TRL's GRPOTrainer loss + backward + optimizer step on the same
batch, back to back (TRL is a test extra of this project), in the configuration a TRL user
picks on this CPU: micro-batches of 8 rows, 8 accumulation steps (one pass over all 64 rows
is much slower: ../shared/bench/README.md).

    python bench/learner.py [--npz PATH] [--trl] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel.learner.advantages import Scored  # noqa: E402
from flywheel.learner.credit import Transition  # noqa: E402
from flywheel.learner.loss import LossConfig  # noqa: E402
from flywheel.learner.prepare_model import prepare  # noqa: E402
from flywheel.learner.trainer import PolicyTrainer, TrainerConfig  # noqa: E402

DEFAULT_NPZ = ROOT.parent / "shared" / "bench" / "grpo_batch.npz"
TRL_MICRO_BATCH = 8  # rows per TRL forward/backward (the reference configuration in shared/bench)


def matmul_peak(seconds: float = 3.0) -> float:
    """bf16 FLOP/s of a 2048^3 torch.matmul, best of repeated runs."""
    a, b = torch.randn(2048, 2048, dtype=torch.bfloat16), torch.randn(2048, 2048, dtype=torch.bfloat16)
    a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048 ** 3 / best


def items_from_npz(path: Path) -> list[Scored]:
    data = np.load(path)
    items = []
    for row in range(data["prompt_ids"].shape[0]):
        prompt = data["prompt_ids"][row][data["prompt_mask"][row] == 1]
        completion = data["completion_ids"][row][data["completion_mask"][row] == 1]
        transition = Transition(
            episode_id=str(row), task_id=str(int(data["group"][row])), agent="bench", seq=0, adapter="bench",
            prompt_ids=tuple(int(t) for t in prompt), completion_ids=tuple(int(t) for t in completion),
            behavior_logprobs=tuple(0.0 for _ in completion), temperature=1.0, reward=float(data["rewards"][row]))
        items.append(Scored(transition, float(data["advantages"][row])))
    return items


def time_steps(step, steps: int) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def trl_step_fn(model_dir: str, npz: Path):
    """TRL's own GRPOTrainer loss on the batch: _compute_loss, backward, clip, AdamW step."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    data = {k: torch.from_numpy(v) for k, v in np.load(npz).items()}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    args = GRPOConfig(output_dir="/tmp/flywheel-trl-bench", per_device_train_batch_size=TRL_MICRO_BATCH,
                      gradient_accumulation_steps=64 // TRL_MICRO_BATCH, num_generations=8,
                      max_completion_length=64, loss_type="dapo", epsilon=0.2, beta=0.0, bf16=True, use_cpu=True,
                      report_to=[], logging_steps=1000, max_grad_norm=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "x"}] * 64),
                          processing_class=AutoTokenizer.from_pretrained(model_dir),
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    # num_items_in_batch is the whole batch's token count: TRL's dapo loss divides each micro-batch's
    # sum by it, so the micro-batches' losses add up to the batch's
    micro_batches = [{"prompt_ids": data["prompt_ids"][rows], "prompt_mask": data["prompt_mask"][rows],
                      "completion_ids": data["completion_ids"][rows], "completion_mask": data["completion_mask"][rows],
                      "advantages": data["advantages"][rows], "num_items_in_batch": data["completion_mask"].sum()}
                     for rows in (slice(i, i + TRL_MICRO_BATCH) for i in range(0, 64, TRL_MICRO_BATCH))]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # Trainer.training_step's, bypassed
    optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        for inputs in micro_batches:
            trainer._compute_loss(trainer.model, inputs).backward()
        torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer loss step, back to back")
    parser.add_argument("--micro-batch-tokens", type=int, default=TrainerConfig.micro_batch_tokens)
    args = parser.parse_args()
    if not args.npz.is_file():
        raise SystemExit(f"{args.npz} not found (it lives in the steering repo's shared/bench/)")
    model_dir = str(prepare())
    items = items_from_npz(args.npz)
    config = TrainerConfig(lora_rank=16, lora_alpha=32, micro_batch_tokens=args.micro_batch_tokens)
    trainer = PolicyTrainer(model_dir, config,
                            LossConfig(epsilon=0.2, epsilon_high=0.2, loss_type="dapo", beta=0.0, is_cap=0.0))
    trainer.ensure_adapter("bench")
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    padded_tokens = 64 * 160
    peak = matmul_peak()
    stats = {}

    def ours():
        stats["last"] = trainer.update("bench", items)

    ours_s = time_steps(ours, args.steps)
    step_s = statistics.median(ours_s)
    flops = 6 * n_params * padded_tokens / step_s
    print(f"threads {torch.get_num_threads()}, params {n_params / 1e6:.1f}M ({trainable:,} trainable), "
          f"{padded_tokens} padded tokens per step")
    print(f"bf16 matmul peak (2048^3): {peak / 1e12:.2f} TFLOP/s")
    print(f"flywheel: {step_s:.2f} s/step (runs {', '.join(f'{t:.2f}' for t in ours_s)}), "
          f"{padded_tokens / step_s:.0f} tokens/s, {flops / 1e12:.3f} TFLOP/s = {flops / peak:.1%} of peak; "
          f"loss {stats['last'].loss:.4f}")
    if args.trl:
        del trainer
        trl_s = time_steps(trl_step_fn(model_dir, args.npz), args.steps)
        trl_step = statistics.median(trl_s)
        trl_flops = 6 * n_params * padded_tokens / trl_step
        print(f"TRL GRPOTrainer: {trl_step:.2f} s/step (runs {', '.join(f'{t:.2f}' for t in trl_s)}), "
              f"{trl_flops / peak:.1%} of peak")
        print(f"flywheel is {trl_step / step_s:.2f}x faster than TRL on the same batch")


if __name__ == "__main__":
    main()
