"""Data-parallel LoRA training under torchrun: every rank holds the whole model and all step together.

`torchrun --nproc-per-node N -m flywheel learner ...` starts N processes, each on its own
device (cuda:LOCAL_RANK with NCCL; the CPU with gloo). Rank 0 is the learner as in one
process: the gRPC server, the buffer, credit and advantages, choosing each batch, saving and
publishing adapters, recording train runs. For each update it sends the adapter's name and
its scored transitions (`Update`) to the other ranks, which wait for it in
`flywheel.learner.service.follow`. Then every rank packs the same micro-batches, trains on
its token-balanced share of them (`shard`), and the LoRA gradients are summed across ranks
(`sum_grads`) before clipping and AdamW, which then run identically everywhere: the
adapters stay equal on every rank, and equal, to float rounding, to one process's update on
the whole batch. The loss is normalised by the whole batch's sizes (every rank has all of
it), and the update's metrics are summed across ranks (`all_sum`), so rank 0 records what
one process would. An adapter's weights and AdamW state go from rank 0 with its first update
(and again after rank 0 restored it), so the ranks need no shared state directory. When rank
0 stops, it tells the others (`Stop`).

Each rank holds the whole base model unless `[learner.trainer] shard_base` is on: then its
frozen weights are sharded over the ranks with FSDP2 (`shard_base_model`), so each device
holds 1/N of them, for a base model that does not fit one device. Only the base is sharded:
the LoRA adapters, which come and go per agent, stay whole on every rank and keep the
gradient sum above. Every forward and backward then gathers each block's weights from all
ranks, so every rank must run as many of them as the busiest: a rank with fewer micro-batches
runs extra, zero-weighted ones (`PolicyTrainer.update`).

Without torchrun (WORLD_SIZE unset or 1) none of this runs: `Ranks()` is one process, and
every helper here returns its input unchanged without touching torch.distributed.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from flywheel.learner.advantages import Scored
    from flywheel.learner.trainer import AdapterSnapshot, PolicyTrainer, UpdateStats

T = TypeVar("T")

# How long a rank waits for rank 0's next message: updates may be hours or days apart, while a
# collective of the update itself keeps torch's default timeout (minutes), so a rank that died
# mid-update is still noticed
MESSAGE_TIMEOUT = timedelta(days=365)
_messages: list = []  # the job's message group (gloo, CPU), made by `process_group`, as torch keeps its default group


class BadRankEnv(ValueError):
    """torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK) are missing or inconsistent."""


class RanksOutOfStep(RuntimeError):
    """The ranks can no longer be trusted to hold the same adapters; the job must be restarted."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job: its rank among `world`, and its rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ranks:
        """The ranks torchrun set; one process (`Ranks()`) where WORLD_SIZE is unset or 1."""
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            if world == 1:
                return cls()
            ranks = cls(int(env["RANK"]), world, int(env["LOCAL_RANK"]))
        except (KeyError, ValueError) as bad:
            raise BadRankEnv(f"torchrun's WORLD_SIZE, RANK and LOCAL_RANK must be integers: {bad}") from None
        if not 0 <= ranks.rank < world or ranks.local_rank < 0:
            raise BadRankEnv(f"RANK {ranks.rank} / LOCAL_RANK {ranks.local_rank} outside WORLD_SIZE {world}")
        return ranks


def default_device(ranks: Ranks) -> str:
    """Where a rank trains when `[learner.trainer] device` is "": CUDA when available (this
    rank's own GPU, cuda:LOCAL_RANK, under torchrun), else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if ranks.world == 1 else f"cuda:{ranks.local_rank}"


def backend_for(device: str) -> str:
    """The process group's backend for `[learner.trainer] device`: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if (device or default_device(Ranks())).startswith("cuda") else "gloo"


@contextlib.contextmanager
def process_group(ranks: Ranks, backend: str) -> Iterator[None]:
    """torch.distributed's default group for the job (torchrun's MASTER_ADDR/PORT), for the
    updates' collectives, and a gloo group for rank 0's messages, which wait for as long as it
    takes; both destroyed on exit."""
    if backend == "nccl":  # the gradients' all_reduce runs on the current device: this rank's
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world)
    try:
        _messages.append(dist.new_group(backend="gloo", timeout=MESSAGE_TIMEOUT))
        yield
    finally:
        _messages.clear()
        dist.destroy_process_group()


def lead_first(build: Callable[[], T]) -> T:
    """`build()` on rank 0, then on the others once rank 0 is done: for a cache rank 0 fills and
    the others then find (the embedded model), instead of every rank building it at once."""
    if dist.get_rank() == 0:
        result = build()
        dist.barrier(group=_messages[0])  # the message group's timeout: a first build may take long
        return result
    dist.barrier(group=_messages[0])
    return build()


# ---- the split and the reductions (the trainer's side) ----------------------


def shard(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Deal micro-batches to `world` ranks so each rank's tokens are about equal.

    `sizes[i]` is micro-batch i's padded token count (its compute). Largest first, each goes to
    the rank with the fewest tokens so far (ties: the lower rank; equal sizes: the earlier
    micro-batch), i.e. greedy LPT: with load_r = sum of sizes[i] over the micro-batches i of
    rank r,  max_r load_r <= sum(sizes) / world + max(sizes).
    Returns each rank's micro-batch indices, ascending. Deterministic: every rank computes the
    same split from the same sizes. With fewer micro-batches than ranks some ranks get none
    (they still take part in the reductions, with zero gradients).
    """
    if world < 1:
        raise ValueError(f"world must be at least 1, not {world}")
    loads = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(i)
        loads[rank] += sizes[i]
    return [sorted(share) for share in shares]


def sum_grads(params: Sequence[torch.Tensor], ranks: Ranks) -> None:
    """Replace each parameter's gradient by its sum over the ranks (in place).

    An all_reduce of the accumulated LoRA gradients, once per optimizer step, rather than DDP:
    DDP would wrap the model when it is built, while adapters come and go per agent after that,
    it reduces on every micro-batch's backward unless told `no_sync`, and it averages where we
    need the sum (each rank's loss is already divided by the whole batch's size, so the sum is
    one process's gradient). LoRA gradients are small (5M floats on SmolLM2-135M at rank 16),
    so losing DDP's overlap of the reduction with the backward costs little. A rank without
    micro-batches contributes zeros.
    """
    if ranks.world == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective, not one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, summed in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(summed.view_as(p))


def all_sum(values: Sequence[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Each value summed over the ranks (float64, so token counts stay exact); every rank must
    pass the same number of values, in the same order."""
    return _all_reduce(values, ranks, device, dist.ReduceOp.SUM) if ranks.world > 1 else list(values)


def all_max(value: float, ranks: Ranks, device: torch.device) -> float:
    """The largest of `value` over the ranks."""
    return _all_reduce([value], ranks, device, dist.ReduceOp.MAX)[0] if ranks.world > 1 else value


def _all_reduce(values: Sequence[float], ranks: Ranks, device: torch.device, op) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def shard_base_model(model: torch.nn.Module, device: torch.device) -> int:
    """Shard `model`'s weights over the job's ranks with FSDP2 (`fully_shard`): each block the
    model names unsplittable (`_no_split_modules`, its decoder layers, as accelerate wraps
    them) is one unit, gathered for its forward and backward and freed after; the rest
    (embeddings, final norm, LM head) is the root's unit. The shards move to `device`, so the
    whole model need only fit in host memory while it loads. Call it before peft injects the
    LoRA layers: they are then not FSDP's, and stay whole on every rank. Returns how many
    blocks were sharded."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    # from the default group: a mesh of its own would be a new group, which every rank must make
    # at once, while rank 0 builds its trainer long before the others build theirs
    mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_classes]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no blocks to shard (_no_split_modules)")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    # the root too is freed after its forward (by default it stays gathered for the backward): a
    # forward without one (the reference, the step's KL) would leave the embeddings and LM head whole
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return len(blocks)


# ---- the messages (rank 0 to the others) -------------------------------------


@dataclass(frozen=True)
class Update:
    """One update for every rank to run: what `PolicyTrainer.update` takes, and, where the other
    ranks may not hold the adapter exactly as rank 0 does (its first update, or after rank 0
    restored it), rank 0's adapter (`encode_state`) to start from."""

    adapter: str
    items: tuple[Scored, ...]
    max_mismatch: float
    state: bytes | None


@dataclass(frozen=True)
class Stop:
    """Rank 0 is stopping: so do the others."""


def send(message: Update | Stop) -> None:
    """From rank 0 to every other rank (collective: they are waiting in `receive`)."""
    dist.broadcast_object_list([message], src=0, group=_messages[0])


def receive() -> Update | Stop:
    """The next message from rank 0 (blocks until it sends one)."""
    box: list[Update | Stop | None] = [None]
    dist.broadcast_object_list(box, src=0, group=_messages[0])
    return box[0]


def encode_state(snapshot: AdapterSnapshot) -> bytes:
    """An adapter's weights and optimizer state as bytes, which each rank loads onto its own
    device (`decode_state`; pickled tensors would unpickle onto rank 0's GPU)."""
    buffer = io.BytesIO()
    torch.save({"weights": snapshot.weights, "optimizer": snapshot.optimizer}, buffer)
    return buffer.getvalue()


def decode_state(data: bytes, device: torch.device) -> dict:
    """`encode_state`'s bytes back: {"weights", "optimizer"}, the fields of an AdapterSnapshot."""
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


class Followers:
    """Rank 0's side of the other ranks: each update is sent to them, then run in step with them.

    Updates run on worker threads (the event loop keeps serving gRPC) and `stop` runs when the
    learner stops; one lock keeps the collectives of an update from interleaving with another
    update's or with the stop message, so `stop` waits for an update in flight to finish.
    """

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self._lock = threading.Lock()
        self._synced: set[str] = set()  # adapters the other ranks hold exactly as rank 0 does
        self._out_of_step = ""  # why they may not, for good
        self._stopped = False

    def update(self, trainer: PolicyTrainer, name: str, items: Sequence[Scored], progress=None,
               max_mismatch: float = 0.0) -> UpdateStats:
        """`trainer.update(name, items, ...)` on every rank. An update refused on rank 0 was
        refused on all (the logprob gap is summed over the ranks before the check); any other
        failure part-way leaves the ranks in unknown states: every later update raises
        RanksOutOfStep."""
        from flywheel.learner.trainer import UpdateRefused  # trainer.py imports this module

        with self._lock:
            if self._stopped or self._out_of_step:
                raise RanksOutOfStep(self._out_of_step or "the other ranks were told to stop")
            state = None if name in self._synced else encode_state(trainer.snapshot(name))
            send(Update(name, tuple(items), max_mismatch, state))
            self._synced.add(name)
            try:
                return trainer.update(name, items, progress, max_mismatch)
            except UpdateRefused:
                raise
            except BaseException as failure:
                self._out_of_step = (f"an update failed part-way on rank 0 ({type(failure).__name__}: {failure}); "
                                     "restart the job")
                raise

    def forget(self, name: str) -> None:
        """Rank 0 restored adapter `name`: its next update carries it to the other ranks.
        No lock: one set operation is atomic, and an update in flight must not block the caller."""
        self._synced.discard(name)

    def stop(self) -> None:
        """Tell the other ranks to stop, once the update in flight (if any) is done. Raises
        RanksOutOfStep where they cannot be told (they may be inside an update's collectives):
        rank 0 then exits with an error, and torchrun stops the others."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self._out_of_step:
                raise RanksOutOfStep(self._out_of_step)
            send(Stop())
