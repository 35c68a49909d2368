"""Store write throughput, DuckDB against PostgreSQL, measured in one run.

CallRecord rows per second through `apply`, in batches of 512 (the proxy's `batch_max`), of
realistic calls: 300 prompt token ids, 300 completion token ids with their logprobs, a
request and a response of about a kilobyte each, two calls per episode per batch (so each
batch also opens or continues 256 episodes). DuckDB writes a file in a temporary directory;
PostgreSQL is a throwaway local server (tests/postgres_server.py) with its durable defaults
(fsync, synchronous commit), over TCP on 127.0.0.1. Timings are noisy on shared machines:
compare within a run, not runs.

    python -m bench.store [--batches N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ when run by path

from flywheel.store import open_store  # noqa: E402
from flywheel.store.records import CallRecord  # noqa: E402
from tests.postgres_server import PostgresServer  # noqa: E402

BATCH = 512
TOKENS = 300


def batches(count: int, seed: int = 0) -> list[list[CallRecord]]:
    rng = random.Random(seed)
    request = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 900}], "temperature": 1.0})
    response = json.dumps({"choices": [{"message": {"role": "assistant", "content": "y" * 900}}]})
    out = []
    for b in range(count):
        out.append([CallRecord(
            call_id=f"call-{b}-{i}", episode_id=f"ep-{b}-{i // 2}", agent="solver", created_at=datetime.now(timezone.utc),
            endpoint="chat.completions", stream=False, model="m", adapter="solver-v1", request=request, response=response,
            prompt_token_ids=[rng.randrange(50_000) for _ in range(TOKENS)],
            completion_token_ids=[rng.randrange(50_000) for _ in range(TOKENS)],
            completion_logprobs=[-rng.random() * 5 for _ in range(TOKENS)], finish_reason="stop", prompt_tokens=TOKENS,
            completion_tokens=TOKENS, latency_ms=120.0, ttft_ms=None, status=200, error=None) for i in range(BATCH)])
    return out


def rows_per_s(db: str, work: list[list[CallRecord]]) -> float:
    store = open_store(db)
    store.apply(work[0])  # warm-up: connections, prepared statements, staging tables
    started = time.perf_counter()
    for batch in work[1:]:
        results = store.apply(batch)
        assert not any(isinstance(r, Exception) for r in results), results
    elapsed = time.perf_counter() - started
    store.close()
    return BATCH * (len(work) - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=21, help="batches of 512 calls (the first warms up)")
    args = parser.parse_args()
    work = batches(args.batches)
    with tempfile.TemporaryDirectory() as tmp:
        duckdb_rate = rows_per_s(str(Path(tmp) / "bench.duckdb"), work)
    with PostgresServer(durable=True) as server:
        postgres_rate = rows_per_s(server.new_database(), work)
    print(f"calls of {TOKENS}+{TOKENS} tokens with logprobs, batches of {BATCH}, {BATCH * (args.batches - 1)} calls:")
    print(f"  DuckDB      {duckdb_rate:10,.0f} calls/s")
    print(f"  PostgreSQL  {postgres_rate:10,.0f} calls/s")
    print(f"  PostgreSQL / DuckDB: {postgres_rate / duckdb_rate:.2f}")


if __name__ == "__main__":
    main()
