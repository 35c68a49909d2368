"""Learnability up front: per agent, its groups, the share that teach nothing, the spread of its
rewards, and a warning (in `flywheel status` and the report) when its traffic cannot teach it."""

import asyncio
import json

import openai

from flywheel.store.summaries import LEARNABILITY
from tests.test_feedback import api


async def _episode(proxy, agent: str, task: str | None, reward: float) -> None:
    _, created = await api(proxy, "POST", "/v1/episodes", {"task": task} if task else {})
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}],
                                         extra_headers={"X-Flywheel-Episode": created["episode_id"]})
    await api(proxy, "POST", f"/v1/episodes/{created['episode_id']}/feedback", {"reward": reward})


async def test_each_agent_says_how_much_of_its_traffic_can_teach_it(proxy, capsys):
    from flywheel.commands import main

    for task, reward in (("t1", 1.0), ("t1", 1.0), ("t2", 1.0), ("t2", 1.0)):
        await _episode(proxy, "solved", task, reward)  # always right: no group teaches it
    for reward in (0.0, 1.0):
        await _episode(proxy, "loner", None, reward)  # one-off traffic only
    for task, reward in (("t3", 1.0), ("t3", 0.0), ("t4", 0.0), ("t4", 0.0)):
        await _episode(proxy, "learner", task, reward)
    await proxy.state.writer.flush()
    rows = {r["agent"]: r for r in await proxy.rows(LEARNABILITY)}
    assert {a: (r["episodes"], r["groups"], r["flat_group_share"]) for a, r in rows.items()} == {
        "learner": (4, 2, 0.5), "loner": (2, 0, None), "solved": (4, 2, 1.0)}
    assert rows["learner"]["warning"] is None and rows["learner"]["reward_std"] == 0.5
    assert rows["loner"]["warning"].startswith("no groups")
    assert rows["solved"]["warning"].startswith("every group's rewards are equal")
    assert await asyncio.to_thread(main, ["status", "--url", proxy.url]) == 0
    shown = json.loads(capsys.readouterr().out)["learnability"]
    assert [(r["agent"], r["warning"] is not None) for r in shown] == [("learner", False), ("loner", True),
                                                                      ("solved", True)]
