"""Pass-through routes: forwarded as they are, logged in `passthrough`, never an episode or a call."""

import aiohttp
import openai
import pytest

from tests.test_proxy import sdk


async def test_embeddings_are_forwarded_and_logged_with_the_named_episode(proxy, upstream):
    client = sdk(proxy, "/agents/retriever/v1", default_headers={"X-Flywheel-Episode": "ep-rag"})
    raw = await client.embeddings.with_raw_response.create(model="fake-model", input=["a b", "c"])
    vectors = raw.parse()
    assert [d.embedding for d in vectors.data] == [[3.0, 0.5], [1.0, 0.5]]
    [row] = await proxy.rows("SELECT * FROM passthrough")
    assert (row["agent"], row["episode_id"], row["method"], row["path"], row["status"]) == (
        "retriever", "ep-rag", "POST", "/v1/embeddings", 200)
    assert row["call_id"] == raw.headers["X-Flywheel-Call"] and row["latency_ms"] > 0
    assert row["request_bytes"] > 0 and row["response_bytes"] > 0 and row["error"] is None
    # not an LLM call: no episode opened, nothing for the learner
    assert await proxy.rows("SELECT * FROM calls") == [] and await proxy.rows("SELECT * FROM episodes") == []


async def test_tokenize_and_detokenize_relay_the_upstreams_answer_and_errors(proxy):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/tokenize", json={"model": "m", "prompt": "one two three"}) as r:
            assert r.status == 200 and (await r.json())["tokens"] == [1, 2, 3]
        async with session.post(f"{proxy.url}/agents/a/detokenize", json={"model": "m", "tokens": [4, 5]}) as r:
            assert r.status == 200 and (await r.json())["prompt"] == "w4 w5"
        async with session.post(f"{proxy.url}/tokenize", json={"model": "m", "prompt": 7}) as r:
            assert r.status == 400
    rows = await proxy.rows("SELECT agent, episode_id, path, status, error FROM passthrough ORDER BY created_at")
    assert [(r["path"], r["status"]) for r in rows] == [("/tokenize", 200), ("/detokenize", 200), ("/tokenize", 400)]
    assert rows[1]["agent"] == "a" and rows[0]["episode_id"] is None and "must be a string" in rows[2]["error"]


async def test_a_model_is_retrieved_by_id(proxy):
    client = sdk(proxy)
    model = await client.models.retrieve("fake-model")
    assert model.id == "fake-model" and model.owned_by == "fake"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client.models.retrieve("no-such-model")


async def test_policies_limits_and_redaction_apply_to_pass_through_calls(start_proxy):
    from flywheel.proxy.policy import AgentRule

    proxy = await start_proxy(redact=("email",), agents=(AgentRule(match="private", store="none"),
                                                         AgentRule(match="limited", rpm=1)))
    embedded = await sdk(proxy, "/agents/retriever/v1").embeddings.create(model="fake-model", input=["mail a@b.co"])
    assert embedded.data[0].embedding[0] == len("mail <EMAIL_1>")  # the upstream embedded the placeholder
    await sdk(proxy, "/agents/private/v1").embeddings.create(model="fake-model", input="x")
    limited = sdk(proxy, "/agents/limited/v1")
    await limited.embeddings.create(model="fake-model", input="x")
    with pytest.raises(openai.RateLimitError):
        await limited.embeddings.create(model="fake-model", input="x")
    rows = await proxy.rows("SELECT agent FROM passthrough ORDER BY created_at")
    assert [r["agent"] for r in rows] == ["retriever", "limited"]  # "private" keeps nothing; a 429 is no call
