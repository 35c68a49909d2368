"""Erasure requests (one episode, or every episode of a user) and the audit trail of admin actions."""

import asyncio
import hashlib
import json

import aiohttp
import openai
import pytest

from flywheel.client import KEY_VARIABLE
from flywheel.learner.config import LearnerConfig
from tests.conftest import eventually, free_port, wait_buffered
from tests.test_feedback import api
from tests.test_policy import bytes_under, marker

ADMIN = "admin-key-for-erasure-0123"


async def user_episode(proxy, user: str, text: str) -> str:
    """An episode of `user` whose prompt and task id carry `text` (the learner gets token ids, and the task id)."""
    _, created = await api(proxy, "POST", "/v1/episodes", {"agent": "solver", "task": f"task-{text}",
                                                          "metadata": {"user": user}}, key=ADMIN)
    episode = created["episode_id"]
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key=ADMIN, max_retries=0)
    await client.chat.completions.create(model="m", max_tokens=3, messages=[{"role": "user", "content": text}],
                                         extra_headers={"X-Flywheel-Episode": episode})
    await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1.0}, key=ADMIN)
    await api(proxy, "POST", f"/v1/episodes/{episode}/close", key=ADMIN)
    return episode


async def calls_mentioning(proxy, text: str) -> int:
    rows = await proxy.rows(f"SELECT count(*) AS n FROM calls WHERE request LIKE '%{text}%' OR response LIKE '%{text}%'")
    return rows[0]["n"]


async def test_erasing_a_user_removes_their_data_from_the_store_and_the_learner_and_nothing_else(
        start_proxy, start_learner, tmp_path, capsys, monkeypatch):
    from flywheel.commands import main

    address, state = f"127.0.0.1:{free_port()}", tmp_path / "state"
    server = await start_learner(LearnerConfig(listen=address, state_dir=str(state)), "unused")
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05, admin_keys=(ADMIN,))
    theirs, others = marker(), marker()
    for _ in range(2):
        await user_episode(proxy, "u-17", f"about {theirs}")
    kept = await user_episode(proxy, "u-18", f"about {others}")
    await wait_buffered(server, 3)
    assert theirs.encode() in bytes_under(state)  # the learner's spool holds it, so the scan below can fail

    status, counts = await api(proxy, "POST", "/v1/erase", {"metadata": {"user": "u-17"}}, key=ADMIN)
    assert status == 200
    assert counts == {"episodes": 2, "calls": 2, "feedback": 2, "passthrough": 0, "judge_episodes": 0,
                      "learner_episodes": 2}
    assert sorted(server.learner.buffer.pending) == [kept]
    assert theirs.encode() not in bytes_under(state) and others.encode() in bytes_under(state)
    assert await calls_mentioning(proxy, theirs) == 0 and await calls_mentioning(proxy, others) == 1
    for table in ("episodes", "calls", "feedback"):
        rows = await proxy.rows(f"SELECT episode_id FROM {table}")
        assert {r["episode_id"] for r in rows} == {kept}

    status, again = await api(proxy, "POST", "/v1/erase", {"metadata": {"user": "u-17"}}, key=ADMIN)
    assert status == 200 and again["episodes"] == 0  # repeating an erasure is harmless
    status, one = await api(proxy, "DELETE", f"/v1/episodes/{kept}", key=ADMIN)
    assert status == 200 and one["episodes"] == 1 and one["learner_episodes"] == 1
    assert server.learner.buffer.pending == {}
    status, _ = await api(proxy, "POST", "/v1/erase", {"metadata": {}}, key=ADMIN)
    assert status == 400

    await api(proxy, "POST", "/v1/sql", {"query": "SELECT episode_id FROM episodes"}, key=ADMIN)
    await proxy.state.writer.flush()
    audit = await proxy.rows("SELECT action, key_id, target, row_count, detail FROM audit_log ORDER BY logged_at")
    assert [(a["action"], a["target"], a["row_count"]) for a in audit] == [
        ("erase", None, 6), ("erase", None, 0), ("erase", kept, 3), ("sql", None, 0)]
    assert {a["key_id"] for a in audit} == {hashlib.sha256(ADMIN.encode()).hexdigest()[:12]}
    assert audit[0]["detail"] == {"metadata": {"user": "u-17"}, "episodes": 2}
    assert audit[3]["detail"] == {"query": "SELECT episode_id FROM episodes"}
    assert theirs not in json.dumps(audit)  # who, what and how many; never the content

    monkeypatch.setenv(KEY_VARIABLE, ADMIN)
    await asyncio.to_thread(main, ["status", "--url", proxy.url, "--audit", "10"])
    shown = json.loads(capsys.readouterr().out)["audit"]
    assert [a["action"] for a in shown][-4:] == ["sql", "erase", "erase", "erase"]  # newest first


async def test_nothing_is_erased_while_the_learner_cannot_be_reached(start_proxy):
    proxy = await start_proxy(learner=f"127.0.0.1:{free_port()}", push_after_s=3600)  # nothing listens there
    _, created = await api(proxy, "POST", "/v1/episodes", {"metadata": {"user": "u-1"}})
    status, body = await api(proxy, "DELETE", f"/v1/episodes/{created['episode_id']}")
    assert status == 503 and body["error"]["code"] == "learner_unreachable"
    assert len(await proxy.rows("SELECT * FROM episodes")) == 1

    async def no_erase_audited() -> bool:
        return await proxy.rows("SELECT * FROM audit_log WHERE action = 'erase'") == []

    await eventually(no_erase_audited, 1, "no erasure audited")


async def test_erasure_and_the_audit_trail_need_an_admin_key(start_proxy):
    proxy = await start_proxy(api_keys=("client-key-0123456789",), admin_keys=(ADMIN,))
    for method, path, payload in (("DELETE", "/v1/episodes/e1", None), ("POST", "/v1/erase", {"metadata": {"a": "b"}})):
        status, body = await api(proxy, method, path, payload, key="client-key-0123456789")
        assert status == 403 and body["error"]["code"] == "admin_key_required"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/openapi.json") as response:
            spec = await response.json()
    assert "delete" in spec["paths"]["/v1/episodes/{episode}"] and "post" in spec["paths"]["/v1/erase"]


async def test_a_stream_in_flight_when_its_episode_is_erased_is_not_recorded(start_proxy):
    proxy = await start_proxy()
    _, created = await api(proxy, "POST", "/v1/episodes", {"metadata": {"user": "u-5"}})
    episode = created["episode_id"]
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=8,
        extra_headers={"X-Flywheel-Episode": episode}, extra_body={"fake_chunk_delay_ms": 100})
    status, counts = await api(proxy, "POST", "/v1/erase", {"metadata": {"user": "u-5"}})
    assert status == 200 and counts["episodes"] == 1
    [chunk async for chunk in stream]  # the stream ends after the erasure
    await proxy.state.writer.flush()
    assert await proxy.rows("SELECT * FROM episodes") == [] and await proxy.rows("SELECT * FROM calls") == []


async def test_a_client_key_cannot_open_an_evaluation_episode_outside_its_limits(start_proxy):
    from flywheel.proxy.policy import AgentRule

    proxy = await start_proxy(api_keys=("client-key-0123456789",), admin_keys=(ADMIN,),
                              agents=(AgentRule(match=".*", rpm=1),))
    status, created = await api(proxy, "POST", "/v1/episodes", {"metadata": {"eval": True}},
                                key="client-key-0123456789")
    assert status == 201
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="client-key-0123456789", max_retries=0)
    headers = {"X-Flywheel-Episode": created["episode_id"]}
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], extra_headers=headers)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}],
                                             extra_headers=headers)
