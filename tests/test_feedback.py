"""Episodes and outcomes: creation, feedback, idempotency, close, read-back, refusals."""

import contextlib
import json
import math

import aiohttp
import openai
import pytest

MESSAGES = [{"role": "user", "content": "hello"}]


async def api(proxy, method, path, payload=None, raw: bytes | None = None, key: str | None = None):
    """(status, JSON reply) of one request; POSTs say they are JSON, as the proxy requires."""
    headers = {"Content-Type": "application/json"} if method == "POST" else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
    async with aiohttp.ClientSession() as session:
        async with session.request(method, proxy.url + path, data=data, headers=headers) as response:
            return response.status, await response.json()


async def test_episode_lifecycle_with_calls_feedback_and_close(proxy):
    status, created = await api(proxy, "POST", "/v1/episodes", {"task": "t-1", "agent": "planner",
                                                                 "metadata": {"user": "u1"}})
    assert status == 201 and created["episode_id"].startswith("ep-")
    episode = created["episode_id"]
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/planner/episodes/{episode}/v1", api_key="x")
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    call_id = raw.headers["X-Flywheel-Call"]

    status, fb = await api(proxy, "POST", f"/v1/episodes/{episode}/feedback",
                           {"reward": 0.5, "dims": {"correct": 1, "style": 0}, "source": "grader"})
    assert status == 200 and fb["duplicate"] is False and fb["episode_reward"] == 0.5
    status, fb = await api(proxy, "POST", f"/v1/episodes/{episode}/feedback",
                           {"reward": -1, "call_id": call_id, "source": "critic"})
    assert status == 200 and fb["episode_reward"] == 0.5  # a call's reward leaves the episode's alone
    status, closed = await api(proxy, "POST", f"/v1/episodes/{episode}/close")
    assert status == 200 and closed["status"] == "closed"
    status, late = await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1})
    assert status == 200 and late["episode_reward"] == 1.0  # feedback may arrive after close; latest wins

    status, got = await api(proxy, "GET", f"/v1/episodes/{episode}")
    assert status == 200
    assert got["task_id"] == "t-1" and got["agent"] == "planner" and got["metadata"] == {"user": "u1"}
    assert got["status"] == "closed" and got["closed_at"] and got["reward"] == 1.0
    assert [c["call_id"] for c in got["calls"]] == [call_id]
    assert got["calls"][0]["completion_token_ids"] == [1000, 1001, 1002, 1003]
    assert [(f["reward"], f["call_id"], f["source"]) for f in got["feedback"]] == [
        (0.5, None, "grader"), (-1.0, call_id, "critic"), (1.0, None, None)]
    assert got["feedback"][0]["dims"] == {"correct": 1.0, "style": 0.0}


async def test_repeated_idempotency_key_is_applied_once(proxy):
    _, created = await api(proxy, "POST", "/v1/episodes", {})
    episode = created["episode_id"]
    first = await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1, "idempotency_key": "k"})
    again = await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 0, "idempotency_key": "k"})
    assert first[1]["duplicate"] is False and again[1]["duplicate"] is True
    assert again[1]["feedback_id"] == first[1]["feedback_id"] and again[1]["episode_reward"] == 1.0
    rows = await proxy.rows(f"SELECT reward FROM feedback WHERE episode_id = '{episode}'")
    assert rows == [{"reward": 1.0}]
    [ep] = await proxy.rows(f"SELECT reward FROM episodes WHERE episode_id = '{episode}'")
    assert ep["reward"] == 1.0


async def test_feedback_for_an_episode_known_only_from_a_just_queued_call(proxy):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/episodes/ep-fast/v1", api_key="x")
    await client.chat.completions.create(model="m", messages=MESSAGES)
    status, fb = await api(proxy, "POST", "/v1/episodes/ep-fast/feedback", {"reward": 2})
    assert status == 200 and fb["episode_reward"] == 2.0


@pytest.mark.parametrize("payload, raw, code", [
    ({"reward": "high"}, None, "invalid_reward"),
    ({"reward": True}, None, "invalid_reward"),
    ({}, None, "invalid_reward"),
    ({"reward": 1, "dims": {"x": "y"}}, None, "invalid_reward"),
    ({"reward": 1, "dims": [1]}, None, "invalid_field"),
    (None, b'{"reward": NaN}', "invalid_json"),  # what Python's json.dumps writes for nan
    (None, b'{"reward": -Infinity}', "invalid_json"),
    (None, b'{"reward": 1e999}', "invalid_json"),
    (None, b'{"reward": ', "invalid_json"),
])
async def test_bad_feedback_is_refused_and_nothing_is_written(proxy, payload, raw, code):
    _, created = await api(proxy, "POST", "/v1/episodes", {})
    status, body = await api(proxy, "POST", f"/v1/episodes/{created['episode_id']}/feedback", payload, raw)
    assert status == 400 and body["error"]["code"] == code and body["error"]["message"]
    if raw and (b"NaN" in raw or b"Infinity" in raw):
        assert "is not a JSON number" in body["error"]["message"]
    assert await proxy.rows("SELECT * FROM feedback") == []


async def test_unknown_episode_or_call_is_404(proxy):
    status, body = await api(proxy, "POST", "/v1/episodes/ep-nope/feedback", {"reward": 1})
    assert status == 404 and "ep-nope" in body["error"]["message"]
    assert (await api(proxy, "POST", "/v1/episodes/ep-nope/close"))[0] == 404
    assert (await api(proxy, "GET", "/v1/episodes/ep-nope"))[0] == 404
    _, created = await api(proxy, "POST", "/v1/episodes", {})
    status, body = await api(proxy, "POST", f"/v1/episodes/{created['episode_id']}/feedback",
                             {"reward": 1, "call_id": "call-nope"})
    assert status == 404 and "call-nope" in body["error"]["message"]
    assert await proxy.rows("SELECT * FROM feedback") == []
    assert await proxy.rows("SELECT * FROM episodes WHERE episode_id = 'ep-nope'") == []


def test_reward_must_be_finite_even_if_python_parses_it():
    from flywheel.proxy.routes.episodes import _finite_number
    from flywheel.proxy.errors import ApiError

    with pytest.raises(ApiError):
        _finite_number(math.inf, "reward")
    assert _finite_number(3, "reward") == 3.0


async def test_an_upstream_failure_mid_episode_marks_it_infra_error_and_it_is_never_pushed(proxy):
    from flywheel.store.summaries import INFRA_ERRORS_BY_VERSION

    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    episodes = []
    for second_model in ("m", "fail-500"):  # the second episode's second call meets a failing upstream
        _, created = await api(proxy, "POST", "/v1/episodes", {})
        episode = created["episode_id"]
        ids = {"X-Flywheel-Episode": episode}
        await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers=ids)
        with contextlib.suppress(openai.InternalServerError):
            await client.chat.completions.create(model=second_model, messages=MESSAGES, extra_headers=ids)
        await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 0.0})
        await api(proxy, "POST", f"/v1/episodes/{episode}/close")
        episodes.append(episode)
    await proxy.state.writer.flush()
    [ok, failed] = [(await proxy.rows(f"SELECT infra_error FROM episodes WHERE episode_id = '{e}'"))[0]["infra_error"]
                    for e in episodes]
    assert ok is None and failed.startswith("the upstream failed call call-") and " 500 " in failed
    pushable = proxy.state.writer.store.episodes_to_push(10, 0.0)
    assert [e["episode_id"] for e in pushable] == [episodes[0]]  # the model is not blamed for the outage
    [row] = await proxy.rows(INFRA_ERRORS_BY_VERSION)
    assert (row["episodes"], row["infra_errors"], row["infra_error_share"]) == (2, 1, 0.5)


async def test_a_client_reports_an_infra_error_with_or_without_a_reward(proxy):
    _, first = await api(proxy, "POST", "/v1/episodes", {})
    _, second = await api(proxy, "POST", "/v1/episodes", {})
    status, reply = await api(proxy, "POST", f"/v1/episodes/{first['episode_id']}/feedback",
                              {"infra_error": True, "source": "search tool down"})
    assert status == 200 and reply["infra_error"] is True and reply["feedback_id"] is None
    status, reply = await api(proxy, "POST", f"/v1/episodes/{second['episode_id']}/feedback",
                              {"infra_error": True, "reward": 0.0})
    assert status == 200 and reply["episode_reward"] == 0.0
    rows = await proxy.rows("SELECT infra_error FROM episodes ORDER BY created_at")
    assert [r["infra_error"] for r in rows] == ["reported by the client (search tool down)", "reported by the client"]
    for body, status in (({"infra_error": "yes"}, 400), ({"infra_error": False}, 400)):
        got, reply = await api(proxy, "POST", f"/v1/episodes/{first['episode_id']}/feedback", body)
        assert got == status and "error" in reply
    got, _ = await api(proxy, "POST", "/v1/episodes/ep-nope/feedback", {"infra_error": True})
    assert got == 404
