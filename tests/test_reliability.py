"""Nothing lost: every served call is recorded before its client can act on it, a client that
hangs up is recorded (499) and its generation cancelled; and the limits that keep one caller
from taking the proxy down."""

import asyncio

import aiohttp
import openai

from tests.test_feedback import api

MESSAGES = [{"role": "user", "content": "hello"}]


async def test_a_call_is_recorded_before_its_client_has_the_whole_response(proxy):
    # The default linger (1 s) leaves the writer a whole second to be late; the SQL route
    # flushes what is queued, so a call is visible there iff it was queued before the client
    # finished reading.
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/v1", api_key="x", max_retries=0)
    for n, stream in enumerate((False, True, False, True), start=1):
        if stream:
            async for _ in await client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
                pass
        else:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        status, body = await api(proxy, "POST", "/v1/sql", {"query": "SELECT count(*) FROM calls"})
        assert body["rows"] == [[n]], f"call {n} (stream={stream}) was not queued when its response ended"


async def _hang_up_after(url: str, body: dict, seconds: float) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as session:
        try:
            async with session.post(url, json=body) as response:
                async for _ in response.content:
                    pass
        except (asyncio.TimeoutError, aiohttp.ClientError):
            pass


async def test_a_client_that_hangs_up_is_recorded_as_499_and_its_upstream_request_closed(proxy, upstream):
    url = f"{proxy.url}/agents/a/v1/chat/completions"
    await _hang_up_after(url, {"model": "m", "messages": MESSAGES, "fake_delay_ms": 5000}, 0.3)
    for _ in range(100):
        rows = await proxy.rows("SELECT status, error, latency_ms FROM calls")
        if rows:
            break
        await asyncio.sleep(0.05)
    [row] = rows
    assert row["status"] == 499 and "disconnected" in row["error"] and row["latency_ms"] < 3000
    await asyncio.sleep(0.05)
    assert proxy.state.upstream.replicas[0].pool._all == set()  # the upstream connection was closed: vLLM aborts the request


async def test_deep_nesting_odd_names_and_headers_are_400s_and_record_nothing(proxy):
    deep = b'{"model": "m", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    status, body = await api(proxy, "POST", "/v1/chat/completions", raw=deep)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    async with aiohttp.ClientSession() as session:
        for headers in ({"X-Flywheel-Episode": "épisode"}, {"X-Flywheel-Agent": "a\tb"}, {"X-Flywheel-Task": "t" * 300}):
            async with session.post(f"{proxy.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES},
                                    headers=headers) as response:
                assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_name"
    status, body = await api(proxy, "POST", "/v1/episodes", {"agent": "x" * 257})
    assert status == 400
    assert await proxy.rows("SELECT * FROM calls") == [] and await proxy.rows("SELECT * FROM episodes") == []


def test_ids_come_from_the_os_not_from_a_seedable_generator():
    import random

    from flywheel.proxy.attribution import new_id

    random.seed(0)
    first = new_id("ep")
    random.seed(0)
    assert new_id("ep") != first and len(first) == len("ep-") + 32


async def test_a_body_that_never_arrives_gets_a_408(start_proxy):
    proxy = await start_proxy(body_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_requests_past_max_in_flight_get_a_503_and_the_rest_are_served(start_proxy):
    proxy = await start_proxy(max_in_flight=2)
    body = {"model": "m", "messages": MESSAGES, "fake_delay_ms": 400}
    replies = await asyncio.gather(*(api(proxy, "POST", "/v1/chat/completions", body) for _ in range(3)))
    assert sorted(status for status, _ in replies) == [200, 200, 503]
    assert (await api(proxy, "POST", "/v1/chat/completions", body))[0] == 200
    assert len(await proxy.rows("SELECT * FROM calls")) == 3


async def test_calls_beyond_the_upstream_pool_queue_for_a_connection(start_proxy):
    proxy = await start_proxy(upstream_max_connections=2)
    pool = proxy.state.upstream.replicas[0].pool
    most = 0

    async def watch():
        nonlocal most
        while True:
            most = max(most, len(pool._all))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    await asyncio.gather(*(client.chat.completions.create(model="m", messages=MESSAGES, stream=n % 2 == 0,
                                                          extra_body={"fake_delay_ms": 100}) for n in range(8)))
    watcher.cancel()
    assert most == 2 and len(await proxy.rows("SELECT * FROM calls WHERE status = 200")) == 8
