"""The hot-path HTTP/1.1 client to the upstream: a pool of keep-alive connections.

Every LLM call goes through here, so it does only what that needs: POST a JSON body to one
host, read the status and headers, then the body whole or chunk by chunk as it arrives
(SSE). Parsing is llhttp's (httptools), framing by Content-Length, chunked encoding or
close. aiohttp's client does far more per request (cookies, tracing, redirects, URL
objects) and was a third of the proxy's CPU time per call. Admin calls (adapter loading,
/v1/models) still use aiohttp.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 1 << 20  # stop reading from the socket while this much body is unconsumed


class UpstreamError(ConnectionError):
    """The upstream could not be reached, or broke the response off."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made: nothing was sent, so the request may go elsewhere."""


class UpstreamResponse:
    def __init__(self, connection: "_Connection"):
        self._connection = connection
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._wakeup: asyncio.Future | None = None
        self._error: Exception | None = None
        self.complete = False
        self.waited_s = 0.0  # time its reader spent waiting for body bytes: the upstream's, not the proxy's
        self.on_end = None  # called once when the response is complete, broken or abandoned (the pool's slot)

    @property
    def pool(self) -> "UpstreamPool":
        return self._connection.pool

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/octet-stream").split(";")[0].strip()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (chunked framing already removed).

        Everything already in is yielded as one block: one socket read often holds many
        HTTP chunks (one per SSE event), and relaying them one write each cost a syscall each.
        """
        while True:
            if self._chunks:
                block = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                self._connection.resume()
                yield block
                continue
            if self._error is not None:
                raise self._error
            if self.complete:
                return
            self._wakeup = asyncio.get_running_loop().create_future()
            waiting = time.perf_counter()
            await self._wakeup
            self.waited_s += time.perf_counter() - waiting

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER:
            self._connection.transport.pause_reading()
        self._wake()

    def _fail(self, error: Exception) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._wake()
        self._end()

    def _end(self) -> None:
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time."""

    def __init__(self, pool: "UpstreamPool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.headers_done: asyncio.Future | None = None
        self.closed = False
        self._header_name = b""

    # -- asyncio.Protocol --
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as bad:
            self._lose(UpstreamError(f"malformed HTTP response from the upstream: {bad}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(UpstreamError(f"upstream closed the connection{f': {exc}' if exc else ''}"))

    def _lose(self, error: Exception) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.headers_done is not None and not self.headers_done.done():
            self.headers_done.set_exception(error)
        if self.response is not None:
            self.response._fail(error)

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.response.status = self.parser.get_status_code()
        if not self.headers_done.done():
            self.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.response._feed(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        response.complete = True
        response._wake()
        response._end()
        if self.parser.should_keep_alive() and not self.closed:
            self.pool.release(self)
        else:
            self.transport.close()

    # -- used by the pool and the response --
    def resume(self) -> None:
        """The response's buffer was drained: read from the socket again."""
        if not self.closed:
            self.transport.resume_reading()

    async def send(self, head: bytes, body: bytes) -> UpstreamResponse:
        response = self.response = UpstreamResponse(self)
        self.headers_done = asyncio.get_running_loop().create_future()
        self.transport.write(head + body)
        try:
            await self.headers_done
        except asyncio.CancelledError:  # the caller gave up (its client left): the upstream must stop too
            self.transport.close()
            raise
        return response  # self.response is None again if the whole message is already in


class UpstreamPool:
    """Keep-alive connections to one upstream base URL (http or https)."""

    def __init__(self, base_url: str, connect_timeout_s: float = 10.0, max_connections: int = 1024):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"the upstream must be an http(s):// URL, not {base_url!r}")
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.host, self.port = parts.hostname, parts.port or (443 if self.tls else 80)
        self.host_header = f"{self.host}:{self.port}".encode()
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        # responses in progress at once; each holds one connection, so this caps the sockets
        # (and file descriptors) a burst can open upstream. A call beyond it waits for a slot
        self._slots = asyncio.Semaphore(max_connections)
        self.in_progress = 0  # requests waiting for a slot or sent, whose response has not ended

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send once a connection slot is free; return once the status line and headers are in.
        The slot is held until the response is complete, broken or aborted."""
        self.in_progress += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self.in_progress -= 1
            raise
        try:
            response = await self._post(path, body, headers)
        except BaseException:
            self._end_one()
            raise
        if response.complete or response._error is not None:
            self._end_one()
        else:
            response.on_end = self._end_one
        return response

    def _end_one(self) -> None:
        self._slots.release()
        self.in_progress -= 1

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """An idle connection that the upstream closed meanwhile is retried once on a fresh one
        (nothing was processed)."""
        head = [f"POST {self.base_path}{path} HTTP/1.1\r\nHost: ".encode(), self.host_header,
                f"\r\nContent-Length: {len(body)}\r\n".encode()]
        head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()]
        request_head = b"".join(head) + b"\r\n"
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            try:
                return await connection.send(request_head, body)
            except UpstreamError:
                if connection.response is not None and connection.response.status:
                    raise
        connection = await self._connect()
        return await connection.send(request_head, body)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.tls),
                self.connect_timeout_s)
        except OSError as refused:
            raise UpstreamUnreachable(f"cannot connect to {self.host}:{self.port}: {refused.strerror or refused}") from None
        except TimeoutError:
            raise UpstreamUnreachable(f"cannot connect to {self.host}:{self.port} within {self.connect_timeout_s:g} s") from None
        self._all.add(connection)
        return connection

    def release(self, connection: _Connection) -> None:
        self._idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def abort(self, response: UpstreamResponse) -> None:
        """Drop a response not read to its end (client gone, timeout): its connection cannot be reused."""
        if not response.complete:
            response._connection.transport.close()
        response._end()

    async def close(self) -> None:
        for connection in list(self._all):
            connection.transport.close()
        self._all.clear()
        self._idle.clear()
