"""Run the example agents against a running Flywheel: `python -m examples.run --episodes 32`."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics

from examples.agents import Workflow
from examples.arithmetic import task_split


async def run_episodes(proxy_url: str, model: str, tasks, episodes: int, group_size: int, concurrency: int,
                       temperature: float, tag: str) -> list[float]:
    """`episodes` episodes: tasks in order, each attempted `group_size` times (a GRPO group)."""
    workflow = Workflow(proxy_url, model, temperature)
    limit = asyncio.Semaphore(concurrency)
    jobs = [(tasks[(i // group_size) % len(tasks)], i) for i in range(episodes)]

    async def one(task, i):
        async with limit:
            reward, _ = await workflow.run(task, f"{tag}-{i}-{random.getrandbits(32):08x}")
            return reward

    try:
        return await asyncio.gather(*(one(task, i) for task, i in jobs))
    finally:
        await workflow.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy", default="http://127.0.0.1:8400")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=4, help="attempts per task (GRPO group)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--split", choices=("train", "heldout"), default="train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, heldout = task_split(args.seed, 200, 100)
    rewards = asyncio.run(run_episodes(args.proxy, args.model, train if args.split == "train" else heldout,
                                       args.episodes, args.group_size, args.concurrency, args.temperature, args.split))
    print(f"{len(rewards)} episodes, mean reward {statistics.mean(rewards):.3f}")


if __name__ == "__main__":
    main()
