"""The hot-path upstream client: framing, keep-alive, broken and slow upstreams."""

import asyncio

import openai
import pytest

from flywheel.proxy.upstream import UpstreamError, UpstreamPool


class RawServer:
    """A TCP server on 127.0.0.1 that answers each request with the next scripted byte strings;
    `None` in a script closes the connection there, a number pauses that many seconds."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            while self.scripts:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                for part in self.scripts.pop(0):
                    if part is None:
                        writer.close()
                        return
                    if isinstance(part, float):
                        await asyncio.sleep(part)
                        continue
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # separate TCP segments
        except asyncio.IncompleteReadError:
            pass
        writer.close()


def ok(body: bytes) -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body), body]


async def test_content_length_and_chunked_bodies_over_one_kept_alive_connection():
    chunked = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
               b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2", b"\n\n\r\n", b"0\r\n\r\n"]
    async with RawServer([ok(b'{"a": 1}'), chunked, ok(b"{}")]) as server:
        pool = UpstreamPool(server.url)
        first = await pool.post("/chat/completions", b'{"x": 1}', {"Content-Type": "application/json"})
        assert (first.status, first.content_type, await first.read()) == (200, "application/json", b'{"a": 1}')
        second = await pool.post("/chat/completions", b"{}", {})
        blocks = [block async for block in second.iter_chunks()]
        assert b"".join(blocks) == b"data: 1\n\ndata: 2\n\n" and len(blocks) >= 2  # relayed as they came
        assert await (await pool.post("/completions", b"{}", {})).read() == b"{}"
        assert server.connections == 1
        assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert server.requests[0].endswith(b'\r\n\r\n{"x": 1}')
        await pool.close()


async def test_chunks_that_arrive_together_are_relayed_as_one_block():
    events = b"".join(b"9\r\ndata: %d\n\n\r\n" % i for i in range(5))
    burst = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", events, b"9\r\ndata: 5\n\n\r\n0\r\n\r\n"]
    async with RawServer([burst]) as server:
        pool = UpstreamPool(server.url)
        response = await pool.post("/chat/completions", b"{}", {})
        blocks = [block async for block in response.iter_chunks()]
        assert blocks == [b"".join(b"data: %d\n\n" % i for i in range(5)), b"data: 5\n\n"]
        await pool.close()


async def test_an_idle_connection_the_upstream_closed_is_replaced():
    async with RawServer([ok(b"1") + [None], ok(b"2")]) as server:
        pool = UpstreamPool(server.url)
        assert await (await pool.post("/completions", b"{}", {})).read() == b"1"
        await asyncio.sleep(0.05)
        assert await (await pool.post("/completions", b"{}", {})).read() == b"2"
        assert server.connections == 2
        await pool.close()


async def test_a_body_cut_short_or_no_upstream_is_an_upstream_error():
    cut = [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only this", None]
    async with RawServer([cut]) as server:
        pool = UpstreamPool(server.url)
        response = await pool.post("/completions", b"{}", {})
        with pytest.raises(UpstreamError, match="closed the connection"):
            await response.read()
        await pool.close()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await UpstreamPool(server.url).post("/completions", b"{}", {})


async def test_slow_upstream_is_a_504_and_the_proxy_serves_on(start_proxy):
    proxy = await start_proxy(upstream_timeout_s=0.2)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as slow:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             extra_body={"fake_delay_ms": 1000})
    assert slow.value.status_code == 504 and "did not answer within 0.2 s" in slow.value.message
    # the proxy still serves, on fresh connections
    reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    rows = await proxy.rows("SELECT status, error FROM calls ORDER BY created_at")
    assert [r["status"] for r in rows] == [504, 200] and "0.2 s" in rows[0]["error"]


async def test_a_stream_broken_midway_ends_with_an_error_event_and_is_recorded(start_proxy):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    event = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"token_ids":[5]}]}\n\n'
    async with RawServer([[head, b"%x\r\n%s\r\n" % (len(event), event), None]]) as server:
        proxy = await start_proxy(upstream=server.url)
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        with pytest.raises(openai.APIError, match="upstream stream broke"):
            async for _ in stream:
                pass
        [row] = await proxy.rows("SELECT status, error, response FROM calls")
        assert row["status"] == 502 and "closed the connection" in row["error"]


async def test_a_client_that_leaves_midstream_is_recorded_and_its_upstream_connection_dropped(start_proxy):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    event = b'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"token_ids":[5]}]}\n\n'
    chunk = b"%x\r\n%s\r\n" % (len(event), event)
    async with RawServer([[head, chunk, 0.3, chunk, 0.3, chunk, b"0\r\n\r\n"], ok(b"{}")]) as server:
        proxy = await start_proxy(upstream=server.url)
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        await anext(aiter(stream))
        await stream.close()
        for _ in range(100):
            rows = await proxy.rows("SELECT status, error FROM calls")
            if rows:
                break
            await asyncio.sleep(0.05)
        assert rows == [{"status": 499, "error": "client disconnected before the stream ended"}]
        assert proxy.state.upstream.replicas[0].pool._idle == []  # a half-read response's connection is never reused
