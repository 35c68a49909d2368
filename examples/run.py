"""Run the example agents against a running Flywheel: `python -m examples.run --episodes 32`."""

from __future__ import annotations

import argparse
import asyncio
import statistics

from examples.agents import Workflow
from examples.arithmetic import Task, task_split


async def attempt(workflow: Workflow, runs: list[Task], concurrency: int, evaluation: bool = False,
                  grouped: bool = True) -> list[float]:
    """One episode per entry of `runs` (a task listed G times is a GRPO group when `grouped`),
    `concurrency` at once; the rewards in that order."""
    limit = asyncio.Semaphore(concurrency)

    async def one(task: Task) -> float:
        async with limit:
            reward, _ = await workflow.run(task, evaluation, grouped)
            return reward

    return await asyncio.gather(*(one(task) for task in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy", default="http://127.0.0.1:8400")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=4, help="attempts per task (GRPO group)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--split", choices=("train", "heldout"), default="train",
                        help="heldout episodes are marked eval and never trained on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, heldout = task_split(args.seed, 200, 100)
    tasks = (train if args.split == "train" else heldout)[: -(-args.episodes // args.group_size)]

    async def go() -> list[float]:
        workflow = Workflow(args.proxy, args.model, args.temperature)
        try:
            runs = [task for task in tasks for _ in range(args.group_size)]
            return await attempt(workflow, runs, args.concurrency, args.split == "heldout")
        finally:
            await workflow.close()

    rewards = asyncio.run(go())
    print(f"{len(rewards)} episodes, mean reward {statistics.mean(rewards):.3f}")


if __name__ == "__main__":
    main()
