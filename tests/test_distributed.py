"""Data-parallel updates under torchrun (gloo, CPU): the split, two ranks = one process, the learner command."""

import contextlib
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from flywheel.learner.batching import collate, pack
from flywheel.learner.distributed import BadRankEnv, Ranks, shard
from flywheel.learner.loss import LossConfig
from flywheel.learner.trainer import PolicyTrainer, TrainerConfig, UpdateRefused
from flywheel.protos import flywheel_pb2 as pb
from flywheel.protos import flywheel_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.test_learner_service import tiny_model  # noqa: F401  (a fixture)
from tests.test_trainer import item, tiny_llama  # noqa: F401  (a fixture)
from tests.test_updates import _episode

ROOT = Path(__file__).resolve().parent.parent
# fp32 throughout: the two runs differ only in the order their float sums are taken
ATOL = 1e-5

# 3 to 5 micro-batches of unequal sizes, so both ranks train, on unequal shares
TRAINER = TrainerConfig(compile=False, lora_rank=4, lora_alpha=8, dtype="float32", lr=1e-2, micro_batch_tokens=24, ppo_epochs=2)
LOSS = LossConfig(beta=0.04)  # the reference pass and its KL too
BATCH = [item([1] + [5 + i] * (1 + i % 4), [3 + i, 9, 4, 12][: 1 + i % 4] + [7] * (i // 3),
              temperature=(0.7, 1.0, 1.3)[i % 3], advantage=(1.0, -1.0, 0.5, -0.5)[i % 4]) for i in range(10)]


def test_shard_deals_every_micro_batch_once_largest_first_to_the_least_loaded_rank():
    # 50 -> rank 0 (tie: the lower rank), 40 -> 1, 30 -> 1 (40 < 50), 20 -> 0 (50 < 70), 10 -> 0 (tie at 70)
    assert shard([10, 50, 20, 30, 40], 2) == [[0, 1, 2], [3, 4]]
    assert shard([5, 5, 5], 1) == [[0, 1, 2]]  # one process: everything, in order
    assert shard([7, 7], 4) == [[0], [1], [], []]  # fewer micro-batches than ranks; equal sizes: earlier first
    assert shard([], 3) == [[], [], []]
    rng = random.Random(0)
    for _ in range(200):
        sizes, world = [rng.randint(1, 1000) for _ in range(rng.randint(0, 40))], rng.randint(1, 8)
        shares = shard(sizes, world)
        assert shares == shard(list(sizes), world)  # deterministic: every rank computes the same split
        assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
        assert all(share == sorted(share) for share in shares)
        loads = [sum(sizes[i] for i in share) for share in shares]
        assert max(loads, default=0) <= sum(sizes) / world + max(sizes, default=0)  # the docstring's bound
    with pytest.raises(ValueError):
        shard([1], 0)


def test_ranks_come_from_torchruns_variables():
    assert Ranks.from_env({}) == Ranks() == Ranks.from_env({"WORLD_SIZE": "1"})
    assert Ranks.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    for bad in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"},
                {"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}):
        with pytest.raises(BadRankEnv):
            Ranks.from_env(bad)


def seeded_trainer(model_dir: str, ranks: Ranks = Ranks(), config: TrainerConfig = TRAINER) -> PolicyTrainer:
    """A trainer whose adapter has seeded, non-zero LoRA B (peft starts B at 0: no A gradients).
    Under torchrun only rank 0 builds one: the other ranks get its adapter with the first update."""
    trainer = PolicyTrainer(model_dir, config, LOSS, ranks)
    torch.manual_seed(1)
    trainer.ensure_adapter("tiny")
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B.tiny." in name:
                param.normal_(std=0.1)
    return trainer


def fixed_updates(trainer: PolicyTrainer, update, forget=lambda adapter: None) -> dict:
    """Three updates of BATCH, then one refused for its logprob gap: the stats, whether it was
    refused, and the LoRA weights before and after. Under torchrun the first update carries rank
    0's new adapter to rank 1; then rank 0 restores it (as after a failed update: to itself here)
    and `forget`s it, so the second carries it again with its AdamW moments; the third finds it
    in place on both ranks (a rank 1 that had taken the moments wrong would step differently); the
fourth is of one micro-batch, so rank 1 trains on none."""
    def lora() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}

    before = lora()
    stats = [dataclasses.asdict(update("tiny", BATCH, None, 100.0))]
    trainer.restore("tiny", trainer.snapshot("tiny"))
    forget("tiny")
    stats += [dataclasses.asdict(update("tiny", BATCH, None, 100.0)) for _ in range(2)]
    stats.append(dataclasses.asdict(update("tiny", BATCH[:1], None, 100.0)))  # one micro-batch: rank 1 has none
    held = base_elements(trainer)  # after an update, which ends in a forward (the step's KL)
    try:
        update("tiny", BATCH, None, 1e-6)
        refused = False
    except UpdateRefused:
        refused = True
    return {"stats": stats, "refused": refused, "before": before, "after": lora(), "base_elements": held}


# rank 0 runs the updates through Followers, as the learner does; rank 1 is the learner's `follow` loop
RANKS_SCRIPT = """
import dataclasses
import sys
from functools import partial

import torch

from flywheel.learner.config import LearnerConfig
from flywheel.learner.distributed import Followers, Ranks, process_group
from flywheel.learner.service import follow
from tests.test_distributed import LOSS, TRAINER, fixed_updates, seeded_trainer

model_dir, out, shard_base = sys.argv[1], sys.argv[2], sys.argv[3] == "shard_base"
ranks = Ranks.from_env()
config = dataclasses.replace(TRAINER, shard_base=shard_base)
with process_group(ranks, "gloo"):
    if ranks.rank == 0:
        followers = Followers(ranks)
        trainer = seeded_trainer(model_dir, ranks, config)
        torch.save(fixed_updates(trainer, partial(followers.update, trainer), followers.forget), out)
        followers.stop()
    else:
        follow(LearnerConfig(trainer=config, loss=LOSS), model_dir, ranks)
"""


def base_elements(trainer: PolicyTrainer) -> tuple[int, int]:
    """(held by this rank, in the whole model) of the base model's weights."""
    from torch.distributed.tensor import DTensor

    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    return (sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in base),
            sum(p.numel() for p in base))


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *args]


def child_env(**extra: str) -> dict[str, str]:
    """This environment without any torchrun variables of its own, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.parametrize("base", ["whole on each rank", "shard_base"])
def test_two_ranks_take_the_same_steps_and_report_the_same_metrics_as_one_process(tiny_llama, tmp_path,  # noqa: F811
                                                                                  base):
    """Also with the base model's weights sharded over the ranks (FSDP2): each holds half of them,
    and the steps are the same. The last update has one micro-batch: sharded, rank 1 runs a
    zero-weighted one in step with rank 0's."""
    sizes = [collate(group, 0).padded_tokens for group in pack(BATCH, TRAINER.micro_batch_tokens)]
    assert len(sizes) >= 3 and all(shard(sizes, 2))  # both ranks train, on unequal shares

    started = time.perf_counter()
    alone = fixed_updates(seeded := seeded_trainer(tiny_llama), seeded.update)
    one_s = time.perf_counter() - started
    script, out = tmp_path / "ranks.py", tmp_path / "ranks.pt"
    script.write_text(RANKS_SCRIPT)
    started = time.perf_counter()
    run = subprocess.run(torchrun(str(script), tiny_llama, str(out), base), env=child_env(), capture_output=True,
                         text=True, timeout=180, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"one process {one_s:.2f} s in the test; torchrun with 2 ranks {time.perf_counter() - started:.2f} s "
          f"(start included); update seconds on rank 0: {[round(s['seconds'], 3) for s in torch.load(out)['stats']]}")
    ranks = torch.load(out)
    held, whole = ranks["base_elements"]
    assert held == (whole if base == "whole on each rank" else whole // 2), (held, whole)  # its dims are even

    assert alone["refused"] and ranks["refused"]  # refused alike on every rank, and nothing stepped
    assert alone["after"].keys() == ranks["after"].keys() and len(alone["after"]) == 2 * 2 * 7
    moved = max(float((alone["after"][n] - alone["before"][n]).abs().max()) for n in alone["after"])
    differ = max(float((alone["after"][n] - ranks["after"][n]).abs().max()) for n in alone["after"])
    print(f"LoRA weights: moved by up to {moved:.3g}, two ranks vs one process differ by up to {differ:.3g}")
    assert moved > 100 * ATOL
    for name, weight in alone["after"].items():
        torch.testing.assert_close(ranks["after"][name], weight, atol=ATOL, rtol=0)
    for one, two in zip(alone["stats"], ranks["stats"]):
        assert (two["tokens"], two["padded_tokens"]) == (one["tokens"], one["padded_tokens"])
        for key in ("loss", "clip_fraction", "kl", "entropy", "grad_norm", "mismatch_mean", "mismatch_max", "step_kl"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=ATOL), key
    assert alone["stats"][1]["clip_fraction"] > 0 and alone["stats"][0]["kl"] > 0  # the sums summed are non-zero


def _status(address: str) -> pb.LearnerStatus | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return pb_grpc.LearnerStub(channel).Status(pb.StatusRequest(), timeout=2)
        except grpc.RpcError:
            return None


def _ranks_of(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun `launcher` started (they run in sessions of their own)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == launcher:
                env = dict(v.split("=", 1) for v in (stat.parent / "environ").read_text().split("\0") if "=" in v)
                ranks[int(env["RANK"])] = int(stat.parent.name)
        except (OSError, IndexError, KeyError, ValueError):  # gone meanwhile, or not a rank
            continue
    return ranks


@pytest.mark.parametrize(("stop", "shard_base"), [("ctrl-c to torchrun", "0"), ("sigterm to rank 0", "1")])
def test_the_learner_command_under_torchrun_trains_on_two_ranks_and_stops_cleanly(tiny_model, tmp_path,  # noqa: F811
                                                                                  stop, shard_base):
    address, log, rank_logs = f"127.0.0.1:{free_port()}", tmp_path / "torchrun.log", tmp_path / "ranks"
    env = child_env(FLYWHEEL_LEARNER_TRAINER_LORA_RANK="4", FLYWHEEL_LEARNER_TRAINER_LORA_ALPHA="8",
                    FLYWHEEL_LEARNER_TRAINER_DTYPE="float32", FLYWHEEL_LEARNER_TRAINER_DEVICE="cpu",
                    FLYWHEEL_LEARNER_TRAINER_COMPILE="false",
                    FLYWHEEL_LEARNER_TRAINER_SHARD_BASE=shard_base)
    command = torchrun("--log-dir", str(rank_logs), "--redirects", "3", "-m", "flywheel", "learner",
                       "--model", tiny_model, "--listen", address, "--state-dir", str(tmp_path / "state"),
                       "--proxy", f"http://127.0.0.1:{free_port()}")  # nobody there: publishing fails
    proc = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 90
        while _status(address) is None:  # rank 0 serves once both ranks joined the process group
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        ranks = _ranks_of(proc.pid)
        assert sorted(ranks) == [0, 1]
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.LearnerStub(channel)
            assert stub.PushEpisodes(iter([_episode("t-0", "t", 0.0), _episode("t-1", "t", 1.0)]),
                                     timeout=10).accepted == 2
            events = list(stub.Train(pb.TrainRequest(wait=True), timeout=90))
        metrics = [e.metrics for e in events if e.HasField("metrics")]
        assert len(metrics) == 1 and metrics[0].transitions == 2 and metrics[0].tokens == 4, events
        assert metrics[0].grad_norm > 0
        assert [e for e in events if e.HasField("error")], events  # publishing to nobody failed: the version waits

        stopping = time.monotonic()
        if stop == "ctrl-c to torchrun":  # torchrun passes it to both ranks, and exits with its SignalException
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=25)  # sooner than torchrun's 30 s before it SIGKILLs ranks still running
        else:  # rank 0 alone is stopped: it stops rank 1, and torchrun sees two ranks exit 0
            os.kill(ranks[0], signal.SIGTERM)
            assert proc.wait(timeout=25) == 0, log.read_text()
        print(f"{stop}: stopped in {time.monotonic() - stopping:.1f} s")
    finally:
        for pid in [proc.pid, *ranks.values()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert "SIGKILL" not in log.read_text(), log.read_text()
    outputs = {path: path.read_text() for path in rank_logs.rglob("*.log")}
    assert len(outputs) == 4 and not any("Traceback" in text for text in outputs.values()), outputs
