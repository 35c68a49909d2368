"""The proxy driven by the official openai SDK against the fake vLLM; each test checks DuckDB."""

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.conftest import Running
from tests.fake_upstream import make_app

MESSAGES = [{"role": "user", "content": "what is two plus two"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def sdk(proxy, path="/v1", sync=False, **kwargs):
    cls = openai.OpenAI if sync else openai.AsyncOpenAI
    return cls(base_url=proxy.url + path, api_key="sk-test", max_retries=0, **kwargs)


async def test_async_chat_records_exact_tokens_and_hides_them_from_the_client(proxy, upstream):
    client = sdk(proxy, "/agents/solver/episodes/ep-1/v1")
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, max_tokens=3)
    reply = raw.parse()
    assert reply.choices[0].message.content == " w0 w1 w2"
    assert reply.choices[0].logprobs is None
    assert "token_ids" not in reply.model_dump() and "prompt_token_ids" not in (reply.model_extra or {})
    assert raw.headers["X-Flywheel-Episode"] == "ep-1"
    call_id = raw.headers["X-Flywheel-Call"]
    assert upstream.received[-1]["return_token_ids"] is True and upstream.received[-1]["logprobs"] is True
    [row] = await proxy.rows("SELECT * FROM calls")
    assert row["call_id"] == call_id and row["episode_id"] == "ep-1" and row["agent"] == "solver"
    assert row["seq"] == 0 and row["status"] == 200 and row["stream"] is False
    assert row["prompt_token_ids"] == [1, 2, 3, 4, 5, 6]
    assert row["completion_token_ids"] == [1000, 1001, 1002]
    assert row["completion_logprobs"] == [-0.125, -0.25, -0.375]
    assert row["finish_reason"] == "length" and row["completion_tokens"] == 3 and row["prompt_tokens"] == 6
    assert row["request"]["messages"] == MESSAGES and row["request"]["max_tokens"] == 3
    assert row["response"]["choices"][0]["message"]["content"] == " w0 w1 w2"
    assert row["model"] == "m" and row["adapter"] == "m"
    assert row["latency_ms"] > 0 and row["error"] is None


async def test_sync_streaming_chat_is_relayed_chunk_by_chunk_and_assembled(proxy):
    client = sdk(proxy, sync=True, default_headers={"X-Flywheel-Agent": "writer", "X-Flywheel-Episode": "ep-s",
                                                     "X-Flywheel-Task": "t-7"})

    def run():
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True, max_tokens=5)
        return [c.choices[0].delta.content for c in stream if c.choices]

    deltas = await asyncio.to_thread(run)
    assert deltas == ["", " w0", " w1", " w2", " w3", " w4", None]
    [row] = await proxy.rows("SELECT * FROM calls")
    assert row["stream"] is True and row["agent"] == "writer" and row["episode_id"] == "ep-s"
    assert row["completion_token_ids"] == [1000, 1001, 1002, 1003, 1004]
    assert len(row["completion_logprobs"]) == 5 and row["ttft_ms"] is not None
    assert row["response"]["choices"][0]["message"]["content"] == " w0 w1 w2 w3 w4"
    [episode] = await proxy.rows("SELECT * FROM episodes")
    assert episode["task_id"] == "t-7" and episode["agent"] == "writer"


async def test_client_that_asks_for_logprobs_and_token_ids_keeps_them(proxy):
    client = sdk(proxy)
    reply = await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, max_tokens=2,
                                                 extra_body={"return_token_ids": True})
    assert [t.logprob for t in reply.choices[0].logprobs.content] == [-0.125, -0.25]
    assert reply.model_extra["prompt_token_ids"] == [1, 2, 3, 4, 5, 6]
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, max_tokens=2,
                                                  stream=True)
    logprobs = [c.choices[0].logprobs.content[0].logprob async for c in stream
                if c.choices and c.choices[0].logprobs]
    assert logprobs == [-0.125, -0.25]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls_pass_through_and_are_recorded(proxy, upstream, stream):
    client = sdk(proxy, default_headers={"X-Flywheel-Agent": "caller"})
    if stream:
        chunks = [c async for c in await client.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, tool_choice="auto", stream=True)]
        args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                       for tc in (c.choices[0].delta.tool_calls or ()))
    else:
        reply = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="auto")
        args = reply.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(args) == {"city": "Paris"}
    assert upstream.received[-1]["tools"] == TOOLS and upstream.received[-1]["tool_choice"] == "auto"
    [row] = await proxy.rows("SELECT * FROM calls")
    assert row["request"]["tools"] == TOOLS and row["finish_reason"] == "tool_calls"
    [call] = row["response"]["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert row["completion_token_ids"] == [1000, 1001, 1002, 1003]


@pytest.mark.parametrize("stream", [False, True])
async def test_completions_endpoint_sync_and_streaming(proxy, upstream, stream):
    client = sdk(proxy, "/agents/legacy/v1", sync=True)

    def run():
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(
                model="m", prompt="one two", max_tokens=3, stream=True))
        return client.completions.create(model="m", prompt="one two", max_tokens=3).choices[0].text

    assert await asyncio.to_thread(run) == " w0 w1 w2"
    assert upstream.received[-1]["logprobs"] == 1
    [row] = await proxy.rows("SELECT * FROM calls")
    assert row["endpoint"] == "completions" and row["agent"] == "legacy"
    assert row["prompt_token_ids"] == [1, 2, 3] and row["completion_token_ids"] == [1000, 1001, 1002]
    assert row["completion_logprobs"] == [-0.125, -0.25, -0.375]
    assert row["response"]["choices"][0]["text"] == " w0 w1 w2" and row["request"]["prompt"] == "one two"


async def test_metadata_attribution_is_stripped_before_forwarding(proxy, upstream):
    client = sdk(proxy)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, metadata={"agent": "planner", "episode": "ep-m", "task": "task-9"})
    assert raw.headers["X-Flywheel-Episode"] == "ep-m"
    assert "metadata" not in upstream.received[-1]
    [row] = await proxy.rows("SELECT c.agent, c.episode_id, e.task_id FROM calls c JOIN episodes e USING (episode_id)")
    assert row == {"agent": "planner", "episode_id": "ep-m", "task_id": "task-9"}


async def test_calls_without_an_episode_get_fresh_ones_and_seq_counts_within_an_episode(proxy):
    client = sdk(proxy)
    fresh = {(await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES))
             .headers["X-Flywheel-Episode"] for _ in range(2)}
    assert len(fresh) == 2
    same = sdk(proxy, "/agents/a/episodes/ep-seq/v1")
    await asyncio.gather(*(same.chat.completions.create(model="m", messages=MESSAGES) for _ in range(5)))
    rows = await proxy.rows("SELECT seq FROM calls WHERE episode_id = 'ep-seq' ORDER BY seq")
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4]


async def test_upstream_error_reaches_the_client_and_is_recorded(proxy):
    client = sdk(proxy)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="fail-400", messages=MESSAGES)
    assert "fake failure 400" in str(caught.value)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="fail-400", messages=MESSAGES, stream=True)
    rows = await proxy.rows("SELECT status, error, completion_token_ids FROM calls")
    assert len(rows) == 2 and all(r["status"] == 400 and "fake failure 400" in r["error"] for r in rows)
    assert all(r["completion_token_ids"] is None for r in rows)


async def test_a_non_json_success_is_relayed_as_it_came_and_recorded_with_an_error(proxy):
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/chat/completions",
                                json={"model": "not-json", "messages": MESSAGES}) as r:
            assert r.status == 200 and await r.text() == "upstream garbage"
            assert r.content_type == "text/plain" and r.headers["X-Flywheel-Call"]
    [row] = await proxy.rows("SELECT status, error, response, completion_token_ids FROM calls")
    assert row["status"] == 200 and "not a JSON object" in row["error"]
    assert row["response"] is None and row["completion_token_ids"] is None


async def test_unreachable_upstream_is_a_502_and_the_call_is_recorded(start_proxy):
    dead = await Running(make_app()).start()
    await dead.stop()  # a port nobody listens on
    proxy = await start_proxy(upstream=dead.url)
    client = sdk(proxy)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502 and "unreachable" in caught.value.message
    [row] = await proxy.rows("SELECT status, error FROM calls")
    assert row["status"] == 502 and "unreachable" in row["error"]


async def _post(url, data: bytes, headers=None):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


async def test_bad_requests_get_openai_shaped_errors_and_write_nothing(start_proxy):
    proxy = await start_proxy(max_body_bytes=10_000)
    status, body = await _post(proxy.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["message"]
    status, body = await _post(proxy.url + "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = await _post(proxy.url + "/v1/chat/completions",
                               json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 20_000}]}).encode())
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body = await _post(proxy.url + "/v1/no/such/route", b"{}")
    assert status == 404 and "unknown route" in body["error"]["message"]
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/v1/chat/completions") as r:
            assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
    assert await proxy.rows("SELECT * FROM calls") == []
    assert await proxy.rows("SELECT * FROM episodes") == []


async def test_models_are_forwarded(proxy):
    models = await sdk(proxy, "/agents/x/v1").models.list()
    assert [m.id for m in models.data] == ["fake-model"]


async def test_a_resource_that_fails_to_open_closes_the_ones_already_open(db_path):
    """The upstream pool refuses a non-http URL after the store writer has started: the writer
    is closed again (its threads gone, the file released) and the error reaches the caller."""
    import threading

    from flywheel.proxy.app import build_app
    from flywheel.proxy.config import ProxyConfig
    from flywheel.store.db import Store

    server = Running(build_app(ProxyConfig(upstream="ftp://127.0.0.1:1", db=db_path, port=0)))
    with pytest.raises(ValueError, match="http"):
        await server.start()
    await server.runner.cleanup()
    assert not [t for t in threading.enumerate() if t.name.startswith("flywheel-")]
    Store(db_path, read_only=True).close()  # the writer's connection is closed: the file opens read-only
