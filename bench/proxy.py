"""Proxy overhead, measured in one run: direct to a fake vLLM vs through Flywheel.

The fake upstream (tests/fake_upstream.py) and the proxy (`flywheel serve`) run as their own
processes on 127.0.0.1; this process is the load generator. For an upstream that answers at
once and one that takes 50 ms, at concurrency 1, 16 and 64, streaming and not, it prints
throughput and p50/p99 latency direct and proxied, their ratios, and the proxy's CPU time
per request (from /proc: the proxy and its store process), counted until the calls' records are committed. Beside it, the fake upstream's CPU per request in the same
interval: one aiohttp server answering from memory, the cost of one HTTP hop on this
machine at that rate. Then, with the upstream at 50 ms, client latency with shadow samples off
and on (K = 3, a budget of 50 requests/s): the shadows the proxy sent while the clients ran and
what that did to their p50/p99. Timings are noisy on shared machines: compare within a run, not runs.

    python bench/proxy.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "benchmark me please"}], "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], port: int, probe: str = "/v1/models") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "FLYWHEEL_LOG_LEVEL": "WARNING"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{args} exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    raise SystemExit(f"{args} did not start")


def cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` and of its live children (the proxy's store process among them)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    return own + sum(cpu_seconds(child) for child in children if Path(f"/proc/{child}").exists())


async def load(url: str, concurrency: int, total: int, stream: bool) -> tuple[float, list[float]]:
    """Send `total` requests from `concurrency` workers; returns (requests/s, latencies in ms)."""
    body = json.dumps({**BODY, "stream": stream}).encode()
    latencies: list[float] = []
    remaining = min(3, total)  # warm-up: open connections, fill caches
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker():
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(remaining)))
        latencies.clear()
        remaining = total
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return total / elapsed, latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


# Requests per cell: enough for a few seconds of load each, so CPU time averages over many writer batches.
REQUESTS = {0: {1: 3000, 16: 6000, 64: 9000}, 50: {1: 200, 16: 1600, 64: 6400}}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    rows = []
    for delay_ms in (0, 50):
        up_port, proxy_port = free_port(), free_port()
        upstream = spawn(["-m", "tests.fake_upstream", "--port", str(up_port), "--delay-ms", str(delay_ms)], up_port)
        with tempfile.TemporaryDirectory() as tmp:
            proxy = spawn(["-m", "flywheel", "serve", "--upstream", f"http://127.0.0.1:{up_port}",
                           "--port", str(proxy_port), "--db", f"{tmp}/bench.duckdb"], proxy_port)
            proxy_url = f"http://127.0.0.1:{proxy_port}"
            marker = post(f"{proxy_url}/v1/episodes", {})["episode_id"]

            def committed() -> None:
                """Feedback is acknowledged after its commit, and the writer commits in order:
                once it returns, every call before it is in DuckDB and its CPU time spent."""
                post(f"{proxy_url}/v1/episodes/{marker}/feedback", {"reward": 0})

            try:
                for concurrency in (1, 16, 64):
                    for stream in (False, True):
                        total = max(20, int(scale * REQUESTS[delay_ms][concurrency]))
                        direct = asyncio.run(load(f"http://127.0.0.1:{up_port}/v1/chat/completions",
                                                  concurrency, total, stream))
                        committed()
                        cpu0, up_cpu0 = cpu_seconds(proxy.pid), cpu_seconds(upstream.pid)
                        proxied = asyncio.run(load(f"{proxy_url}/agents/bench/v1/chat/completions",
                                                   concurrency, total, stream))
                        committed()
                        requests = total + min(3, total)
                        cpu_us = (cpu_seconds(proxy.pid) - cpu0) / requests * 1e6
                        up_cpu_us = (cpu_seconds(upstream.pid) - up_cpu0) / requests * 1e6
                        rows.append((delay_ms, concurrency, stream, direct, proxied, cpu_us, up_cpu_us))
                        print_row(rows[-1])
            finally:
                proxy.terminate()
                proxy.wait(30)
                upstream.terminate()
                upstream.wait(30)
    shadow_section(scale)


SHADOW_SETTINGS = """\
[grader]
kind = "endpoint"
url = "http://127.0.0.1:9/grade"
shadow_samples = 3
shadow_budget = 50.0
"""


def shadow_section(scale: float) -> None:
    """Client latency through the proxy with shadow samples off and on, the upstream at 50 ms;
    how many shadow requests went out during the load (the rest wait for a quiet upstream)."""
    up_port = free_port()
    upstream = spawn(["-m", "tests.fake_upstream", "--port", str(up_port), "--delay-ms", "50"], up_port)
    print(f"\n{'shadows':>8} {'conc':>4} | {'rps':>6} {'p50':>9} {'p99':>9} | shadow requests sent during the load")
    try:
        for shadows in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "flywheel.toml").write_text(SHADOW_SETTINGS if shadows else "")
                proxy_port = free_port()
                proxy = spawn(["-m", "flywheel", "serve", "--upstream", f"http://127.0.0.1:{up_port}", "--port",
                               str(proxy_port), "--db", f"{tmp}/bench.duckdb", "--config", f"{tmp}/flywheel.toml"],
                              proxy_port)
                try:
                    for concurrency in (1, 16):
                        before = shadows_sent(proxy_port)
                        rps, latencies = asyncio.run(load(f"http://127.0.0.1:{proxy_port}/agents/bench/v1/chat/"
                                                          "completions", concurrency,
                                                          max(20, int(scale * REQUESTS[50][concurrency])), False))
                        sent = shadows_sent(proxy_port) - before
                        print(f"{'on' if shadows else 'off':>8} {concurrency:>4} | {rps:>6.0f} "
                              f"{pct(latencies, 50):>7.2f}ms {pct(latencies, 99):>7.2f}ms | "
                              f"{sent if shadows else '-'}", flush=True)
                finally:
                    proxy.terminate()
                    proxy.wait(30)
    finally:
        upstream.terminate()
        upstream.wait(30)


def shadows_sent(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('flywheel_shadow_samples_total{outcome="sampled"}'):
                return int(float(line.split()[-1]))
    return 0


def print_row(row) -> None:
    delay_ms, concurrency, stream, (d_rps, d_lat), (p_rps, p_lat), cpu_us, up_cpu_us = row
    if not hasattr(print_row, "header"):
        print_row.header = True
        print(f"{'upstream':>8} {'conc':>4} {'stream':>6} | {'direct rps':>10} {'proxy rps':>10} {'ratio':>6} | "
              f"{'p50 direct':>10} {'p50 proxy':>10} {'added':>7} | {'p99 direct':>10} {'p99 proxy':>10} {'added':>7} | {'proxy CPU/req':>13} {'upstream CPU/req':>16}")
    print(f"{delay_ms:>6}ms {concurrency:>4} {str(stream):>6} | {d_rps:>10.0f} {p_rps:>10.0f} {p_rps / d_rps:>6.2f} | "
          f"{pct(d_lat, 50):>8.2f}ms {pct(p_lat, 50):>8.2f}ms {pct(p_lat, 50) - pct(d_lat, 50):>5.2f}ms | "
          f"{pct(d_lat, 99):>8.2f}ms {pct(p_lat, 99):>8.2f}ms {pct(p_lat, 99) - pct(d_lat, 99):>5.2f}ms | {cpu_us:>10.0f} µs {up_cpu_us:>13.0f} µs", flush=True)


if __name__ == "__main__":
    main()
