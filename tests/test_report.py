"""`flywheel report`: held-out reward per serving version, updates and agents, from the store alone."""

import asyncio

import pytest

from flywheel.commands import main
from tests import postgres_server as server
from tests.conftest import read_db
from tests.test_adapters import adapter_dir
from tests.test_feedback import api

postgres_server, postgres_url = server.postgres_server, server.postgres_url  # the fixtures


async def episode(proxy, agent: str, reward: float, evaluation: bool) -> None:
    _, created = await api(proxy, "POST", "/v1/episodes", {"task": "t", "metadata": {"eval": evaluation}})
    episode_id = created["episode_id"]
    status, _ = await api(proxy, "POST", f"/agents/{agent}/episodes/{episode_id}/v1/chat/completions",
                          {"model": "base", "messages": [{"role": "user", "content": "q"}]})
    assert status == 200
    await api(proxy, "POST", f"/v1/episodes/{episode_id}/feedback", {"reward": reward})


async def traffic(proxy, tmp_path) -> None:
    """Held-out episodes on the base model, one published update, held-out episodes on it, one training episode."""
    for reward in (1.0, 0.0, 0.0, 0.0):
        await episode(proxy, "solver", reward, evaluation=True)
    await episode(proxy, "solver", 0.5, evaluation=False)
    status, _ = await api(proxy, "POST", "/v1/adapters", {
        "agent": "solver", "path": adapter_dir(tmp_path), "canary": False,
        "train_run": {"agent": "solver", "loss": 0.25, "reward_mean": 0.5, "tokens": "40", "tokens_per_s": 9.5}})
    assert status == 201
    for reward in (1.0, 1.0, 1.0, 0.0):
        await episode(proxy, "solver", reward, evaluation=True)


def check_report(out, capsys) -> None:
    assert str(out / "report.md") in capsys.readouterr().out
    text = (out / "report.md").read_text()
    # 95% interval of the mean: 1.96 * sd / sqrt(n); sd of (1, 0, 0, 0) is 0.5
    assert "| base | 4 | 0.25 | 0.49 |" in text
    assert "| solver-v1 | 4 | 0.75 | 0.49 |" in text
    assert "| base | 1 | 0.5 | 0.0 |" in text  # training traffic, apart from the evaluation
    assert "| solver-v1 | solver | 0 | 0 | 40 | 0.5 | 0.25 | 0.0 |" in text  # the update's metrics
    for png in ("heldout_reward.png", "train_reward.png", "updates.png", "agents.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in text


async def test_report_from_the_store_file(start_proxy, db_path, tmp_path, capsys):
    proxy = await start_proxy(base_model="base")
    await traffic(proxy, tmp_path)
    await proxy.stop()

    out = tmp_path / "report"
    assert main(["report", "--db", db_path, "--out", str(out)]) == 0
    check_report(out, capsys)
    assert read_db(db_path, "SELECT count(*) AS n FROM calls") == [{"n": 9}]


@pytest.mark.postgres
async def test_report_on_a_postgres_store(start_proxy, postgres_url, tmp_path, capsys):
    """The same summaries on PostgreSQL: through the running proxy's /v1/sql, then from the database itself."""
    proxy = await start_proxy(base_model="base", db=postgres_url, adapter_roots=(str(tmp_path),))
    await traffic(proxy, tmp_path)
    await proxy.state.writer.flush()
    out = tmp_path / "via-proxy"
    assert await asyncio.to_thread(main, ["report", "--url", proxy.url, "--out", str(out)]) == 0
    check_report(out, capsys)
    await proxy.stop()

    out = tmp_path / "from-db"
    assert main(["report", "--db", postgres_url, "--out", str(out)]) == 0
    check_report(out, capsys)
