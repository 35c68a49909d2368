"""Load with keys and limits on: N concurrent streaming clients for T seconds against the proxy.

The fake upstream (tests/fake_upstream.py) and the proxy (`flywheel serve`, api and admin keys
set, default limits) run as their own processes on 127.0.0.1; this process is the load. Each
client streams chat completions in a loop, as its own agent and episode, and posts the
episode's reward every few calls. Beside the load, an admin runs a SQL query every second
and registers a new adapter version every 10 s (a hot swap under traffic). At the end it
prints requests completed, errors by kind, p50/p99 latency, SQL queries and swaps done, and
records written vs requests completed (every completed call must be in the store).

    python -m bench.load [--clients 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.proxy import free_port, spawn

CLIENT_KEY, ADMIN_KEY = "bench-client-key-0123456789", "bench-admin-key-0123456789"
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "load me"}], "max_tokens": 16, "stream": True}
FEEDBACK_EVERY = 4  # calls per episode before its reward is posted


class Tally:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.feedback = self.sql = self.swaps = 0
        self.side_errors: collections.Counter[str] = collections.Counter()


async def client(session: aiohttp.ClientSession, url: str, number: int, stop_at: float, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    body = json.dumps(BODY).encode()
    calls = 0
    while time.monotonic() < stop_at:
        episode = f"load-{number}-{calls // FEEDBACK_EVERY}"
        started = time.perf_counter()
        try:
            async with session.post(f"{url}/agents/load-{number % 50}/episodes/{episode}/v1/chat/completions",
                                    data=body, headers=headers) as response:
                text = await response.read()
                if response.status != 200 or not text.rstrip().endswith(b"data: [DONE]"):
                    tally.errors[f"HTTP {response.status}"] += 1
                    continue
        except (aiohttp.ClientError, asyncio.TimeoutError) as failure:
            tally.errors[type(failure).__name__] += 1
            continue
        tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        calls += 1
        if calls % FEEDBACK_EVERY == 0:
            async with session.post(f"{url}/v1/episodes/{episode}/feedback", json={"reward": 1.0},
                                    headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
                if response.status == 200:
                    tally.feedback += 1
                else:
                    tally.errors[f"feedback HTTP {response.status}"] += 1


async def admin_side(session: aiohttp.ClientSession, url: str, roots: Path, stop_at: float, tally: Tally) -> None:
    """A SQL query every second and an adapter version every 10 s, while the load runs."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    next_swap = time.monotonic() + 5
    while time.monotonic() < stop_at:
        async with session.post(f"{url}/v1/sql", headers=headers, json={
                "query": "SELECT agent, count(*) AS calls, avg(latency_ms) AS ms FROM calls GROUP BY agent"}) as r:
            tally.sql += r.status == 200
            tally.side_errors[f"sql HTTP {r.status}"] += r.status != 200
        if time.monotonic() >= next_swap:
            next_swap += 10
            directory = roots / f"v{tally.swaps + 1}"
            directory.mkdir()
            (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
            (directory / "adapter_model.safetensors").write_bytes(b"")
            async with session.post(f"{url}/v1/adapters", headers=headers,
                                    json={"agent": "load-0", "path": str(directory)}) as r:
                tally.swaps += r.status == 201
                tally.side_errors[f"swap HTTP {r.status}"] += r.status != 201
        await asyncio.sleep(1)


async def run(url: str, clients: int, seconds: float, roots: Path) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(admin_side(session, url, roots, stop_at, tally),
                             *(client(session, url, n, stop_at, tally) for n in range(clients)))
    return tally


def count_calls(url: str) -> int:
    import urllib.request

    request = urllib.request.Request(f"{url}/v1/sql", data=json.dumps({"query": "SELECT count(*) FROM calls WHERE status = 200"}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["rows"][0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per client
    up_port, proxy_port = free_port(), free_port()
    upstream = spawn(["-m", "tests.fake_upstream", "--port", str(up_port)], up_port, "/v1/models")
    with tempfile.TemporaryDirectory() as tmp:
        roots = Path(tmp, "adapters")
        roots.mkdir()
        os.environ.update(FLYWHEEL_PROXY_API_KEYS=CLIENT_KEY, FLYWHEEL_PROXY_ADMIN_KEYS=ADMIN_KEY,
                          FLYWHEEL_PROXY_ADAPTER_ROOTS=str(roots))
        proxy = spawn(["-m", "flywheel", "serve", "--upstream", f"http://127.0.0.1:{up_port}", "--port",
                       str(proxy_port), "--db", f"{tmp}/load.duckdb"], proxy_port, "/healthz")
        url = f"http://127.0.0.1:{proxy_port}"
        try:
            started = time.monotonic()
            tally = asyncio.run(run(url, args.clients, args.seconds, roots))
            elapsed = time.monotonic() - started
            recorded = count_calls(url)  # the SQL route flushes the writer first
        finally:
            proxy.terminate()
            proxy.wait(60)
            upstream.terminate()
            upstream.wait(30)
    done = len(tally.latencies_ms)
    quantiles = statistics.quantiles(tally.latencies_ms, n=100) if done > 1 else [0.0] * 99
    print(f"{args.clients} streaming clients for {args.seconds:g} s (keys on, default limits), "
          f"SQL and adapter swaps beside them")
    print(f"  streams completed {done} ({done / elapsed:.0f}/s), errors {sum(tally.errors.values())} "
          f"{dict(tally.errors) or ''}")
    print(f"  latency p50 {quantiles[49]:.0f} ms, p99 {quantiles[98]:.0f} ms")
    print(f"  feedback posted {tally.feedback}; SQL queries answered {tally.sql}; adapter swaps {tally.swaps}; "
          f"side errors {sum(tally.side_errors.values())} {dict(+tally.side_errors) or ''}")
    print(f"  records written (status 200) {recorded} vs streams completed {done}: "
          f"{'every completed call recorded' if recorded == done else f'{done - recorded} MISSING'}")


if __name__ == "__main__":
    main()
