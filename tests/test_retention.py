"""Retention: old content goes first (metadata stays), old episodes go whole, from the store
and from the learner's buffer; time is moved by configuration (retention measured in seconds)."""

import openai

from flywheel.learner.config import LearnerConfig
from tests.conftest import eventually, free_port, wait_buffered
from tests.test_feedback import api
from tests.test_policy import bytes_under, marker

SECOND = 1 / 86400  # in days


async def episode(proxy, name: str, task: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", max_tokens=3, messages=[{"role": "user", "content": f"q {task}"}],
                                         extra_headers={"X-Flywheel-Episode": name, "X-Flywheel-Task": task})
    await api(proxy, "POST", f"/v1/episodes/{name}/feedback", {"reward": 1.0})
    await api(proxy, "POST", f"/v1/episodes/{name}/close")


async def test_content_then_episodes_expire_from_the_store_and_the_learner(start_proxy, start_learner, tmp_path):
    address, state = f"127.0.0.1:{free_port()}", tmp_path / "state"
    server = await start_learner(LearnerConfig(listen=address, state_dir=str(state)), "unused")
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05,
                              content_retention_days=3 * SECOND, retention_days=4.5 * SECOND, retention_check_s=0.1)
    old = marker()
    await episode(proxy, "ep-old", old)
    await wait_buffered(server, 1)
    assert old.encode() in bytes_under(state)

    async def stripped() -> bool:
        rows = await proxy.rows("SELECT stored, request, prompt_token_ids FROM calls WHERE episode_id = 'ep-old'")
        return rows == [{"stored": "metadata", "request": None, "prompt_token_ids": None}]

    await eventually(stripped, 10, "the old call's content dropped")
    rows = await proxy.rows("SELECT prompt_tokens, c.status, train FROM calls c JOIN episodes USING (episode_id)")
    assert rows[0]["prompt_tokens"] > 0 and rows[0]["status"] == 200 and rows[0]["train"] is False
    assert server.learner.buffer.pending == {} and old.encode() not in bytes_under(state)

    fresh = marker()
    await episode(proxy, "ep-fresh", fresh)

    async def deleted() -> bool:
        return await proxy.rows("SELECT * FROM episodes WHERE episode_id = 'ep-old'") == []

    await eventually(deleted, 10, "the old episode deleted")
    assert await proxy.rows("SELECT * FROM calls WHERE episode_id = 'ep-old'") == []
    [kept] = await proxy.rows("SELECT stored, request FROM calls WHERE episode_id = 'ep-fresh'")
    assert kept["stored"] == "full" and fresh in kept["request"]["messages"][0]["content"]  # younger than both limits
    actions = [r["action"] for r in await proxy.rows("SELECT action FROM audit_log ORDER BY logged_at")]
    assert actions[0] == "content_retention" and "retention" in actions
