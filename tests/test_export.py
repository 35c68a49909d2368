"""`flywheel export`: calls and episodes as Parquet / JSON Lines, through the proxy or from the file, read
back with DuckDB and `datasets` and checked against the store."""

import asyncio
import itertools
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import openai
import pytest

from flywheel.commands import main
from flywheel.export import ExportError, Paging, Selection, chat_body, export, run_export
from flywheel.learner.credit import CreditConfig
from flywheel.sql import file_fetcher
from flywheel.store.db import Store
from flywheel.store.records import CallRecord
from tests import postgres_server as server
from tests.conftest import read_db
from tests.fake_upstream import TOOL_ARGS
from tests.test_feedback import api

SYSTEM = {"role": "system", "content": "be brief"}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": CITY}}]
# a message as the export writes it: every key present
BLANK = {"role": None, "content": None, "reasoning_content": None, "name": None, "tool_call_id": None,
         "tool_calls": None}


def message(**fields) -> dict:
    return {**BLANK, **fields}


def episode_headers(episode: str, task: str) -> dict:
    return {"X-Flywheel-Episode": episode, "X-Flywheel-Task": task}


async def _traffic(proxy) -> dict[str, str]:
    """Two training episodes and an evaluation one, with a failed, a streamed tool and a completions call;
    returns call ids by name."""
    solver = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    writer = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/writer/v1", api_key="x", max_retries=0)
    ids = {}
    for name in ("first", "second"):
        raw = await solver.chat.completions.with_raw_response.create(
            model="base", messages=[SYSTEM, {"role": "user", "content": f"solve t1 {name}"}], max_tokens=3,
            temperature=0.7, extra_headers=episode_headers("ep-a", "t1"))
        ids[name] = raw.headers["X-Flywheel-Call"]
    with pytest.raises(openai.InternalServerError):
        await solver.chat.completions.create(model="fail-500", messages=[{"role": "user", "content": "x"}],
                                             extra_headers=episode_headers("ep-a", "t1"))
    await api(proxy, "POST", "/v1/episodes/ep-a/feedback", {"reward": 1.0})
    await api(proxy, "POST", "/v1/episodes/ep-a/feedback", {"reward": 0.5, "call_id": ids["second"]})
    await api(proxy, "POST", "/v1/episodes/ep-a/close")

    await asyncio.sleep(0.01)  # ep-b's calls come strictly later, for --since
    stream = await writer.chat.completions.with_raw_response.create(
        model="base", messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS, stream=True,
        extra_headers=episode_headers("ep-b", "t2"))
    ids["tool"] = stream.headers["X-Flywheel-Call"]
    async for _ in stream.parse():
        pass
    raw = await writer.completions.with_raw_response.create(model="base", prompt="write t2", max_tokens=2,
                                                            extra_headers=episode_headers("ep-b", "t2"))
    ids["completion"] = raw.headers["X-Flywheel-Call"]
    await api(proxy, "POST", "/v1/episodes/ep-b/feedback", {"reward": 0.0})
    await api(proxy, "POST", "/v1/episodes/ep-b/close")

    _, created = await api(proxy, "POST", "/v1/episodes", {"task": "t3", "metadata": {"eval": True}})
    ids["eval_episode"] = created["episode_id"]
    raw = await solver.chat.completions.with_raw_response.create(
        model="base", messages=[{"role": "user", "content": "held out"}],
        extra_headers={"X-Flywheel-Episode": created["episode_id"]})
    ids["eval"] = raw.headers["X-Flywheel-Call"]
    await api(proxy, "POST", f"/v1/episodes/{created['episode_id']}/feedback", {"reward": 1.0})
    return ids


def duck_rows(path: Path) -> list[dict]:
    """The file's rows, in file order, as DuckDB reads them."""
    reader = "read_parquet" if path.suffix == ".parquet" else "read_json_auto"
    con = duckdb.connect()
    try:
        cursor = con.execute(f"SELECT * FROM {reader}(?)", [str(path)])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        con.close()


def hf_rows(path: Path, cache: Path) -> list[dict]:
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "json"
    return list(datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache)))


def exported(out: Path, fmt: str = "parquet") -> tuple[Path, Path]:
    return out / f"calls.{fmt}", out / f"episodes.{fmt}"


def via_proxy(proxy, out: Path, fmt: str = "parquet", selection: Selection = Selection()):
    """`export` through the proxy's /v1/sql, off the event loop the proxy serves on."""
    return asyncio.to_thread(run_export, str(out), fmt, proxy.url, None, selection, CreditConfig())


async def test_one_row_matches_the_store_field_by_field_and_datasets_reads_it(start_proxy, db_path, tmp_path):
    proxy = await start_proxy()
    ids = await _traffic(proxy)
    done = await via_proxy(proxy, tmp_path / "out")
    await proxy.stop()
    calls_file, episodes_file = exported(tmp_path / "out")
    assert done.files == (calls_file, episodes_file) and (done.calls, done.episodes) == (5, 2)
    assert not list((tmp_path / "out").glob("*.partial"))

    rows = duck_rows(calls_file)
    assert [(r["episode_id"], r["seq"]) for r in rows] == [("ep-a", 0), ("ep-a", 1), ("ep-a", 2), ("ep-b", 0),
                                                            ("ep-b", 1)]
    [stored] = read_db(db_path, f"SELECT * FROM calls WHERE call_id = '{ids['second']}'")
    [row] = [r for r in rows if r["call_id"] == ids["second"]]
    assert row["prompt_token_ids"] == stored["prompt_token_ids"] and row["prompt_token_ids"]
    assert row["completion_token_ids"] == stored["completion_token_ids"] == [1000, 1001, 1002]
    assert row["completion_logprobs"] == stored["completion_logprobs"] == [-0.125, -0.25, -0.375]
    assert row["temperature"] == stored["temperature"] == 0.7 and row["finish_reason"] == stored["finish_reason"]
    assert row["created_at"] == datetime.fromisoformat(stored["created_at"])
    assert (row["agent"], row["task_id"], row["adapter"], row["model"], row["endpoint"], row["stream"]) == (
        "solver", "t1", stored["adapter"], "base", "chat.completions", False)
    assert row["prompt"] == [message(**SYSTEM), message(role="user", content="solve t1 second")]
    assert row["prompt"] == [message(**m) for m in stored["request"]["messages"]]
    assert row["completion"] == [message(role="assistant", content=" w0 w1 w2")]
    assert row["reward"] == 1.0 and row["credit"] == 1.5  # the episode's reward plus the call's own feedback
    assert row["status"] == 200 and row["error"] is None and row["tools"] is None

    by_call = {r["call_id"]: r for r in rows}
    assert by_call[ids["first"]]["credit"] == 1.0
    [failed] = [r for r in rows if r["status"] == 500]
    assert failed["credit"] is None and "fake failure 500" in failed["error"] and failed["completion"] == []
    assert ids["eval"] not in by_call  # evaluation episodes stay out by default

    episodes = duck_rows(episodes_file)
    assert [(e["episode_id"], e["task_id"], e["agent"], e["status"], e["reward"], e["calls"]) for e in episodes] == [
        ("ep-a", "t1", "solver", "closed", 1.0, 3), ("ep-b", "t2", "writer", "closed", 0.0, 2)]
    assert episodes[0]["closed_at"] >= episodes[0]["created_at"]

    hf = hf_rows(calls_file, tmp_path / "hf")
    assert len(hf) == 5 and hf[1]["call_id"] == ids["second"]
    assert hf[1]["prompt"] == row["prompt"] and hf[1]["completion"] == row["completion"]
    assert hf[1]["completion_logprobs"] == row["completion_logprobs"] and hf[1]["credit"] == 1.5
    assert hf_rows(episodes_file, tmp_path / "hf")[1]["episode_id"] == "ep-b"


async def test_a_streamed_tool_call_and_a_completions_call_have_the_right_completion(start_proxy, tmp_path):
    proxy = await start_proxy()
    ids = await _traffic(proxy)
    await via_proxy(proxy, tmp_path / "out", "jsonl")
    lines = exported(tmp_path / "out", "jsonl")[0].read_text().splitlines()
    by_call = {row["call_id"]: row for row in map(json.loads, lines)}

    tool = by_call[ids["tool"]]
    assert tool["stream"] is True and tool["finish_reason"] == "tool_calls" and tool["credit"] == 0.0
    assert tool["completion"] == [message(role="assistant", tool_calls=[
        {"id": "call_fake", "type": "function", "function": {"name": "get_weather", "arguments": "".join(TOOL_ARGS)}}])]
    assert json.loads(tool["tools"]) == TOOLS
    assert tool["completion_token_ids"] == [1000, 1001, 1002, 1003]

    completion = by_call[ids["completion"]]
    assert completion["endpoint"] == "completions"
    assert completion["prompt"] == [message(role="user", content="write t2")]
    assert completion["completion"] == [message(role="assistant", content=" w0 w1")]

    hf = {r["call_id"]: r for r in hf_rows(exported(tmp_path / "out", "jsonl")[0], tmp_path / "hf")}
    assert hf[ids["tool"]]["completion"][0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert hf[ids["completion"]]["prompt"][0]["content"] == "write t2"


async def test_the_file_and_the_proxy_give_the_same_bytes_whatever_the_pages(start_proxy, db_path, tmp_path):
    proxy = await start_proxy(sql_max_bytes=3000)  # most pages come back cut short by the byte cap
    await _traffic(proxy)
    for fmt in ("parquet", "jsonl"):
        await via_proxy(proxy, tmp_path / f"proxy-{fmt}", fmt, selection=Selection(include_eval=True))
    await proxy.stop()
    for fmt in ("parquet", "jsonl"):
        run_export(str(tmp_path / f"file-{fmt}"), fmt, None, db_path, Selection(include_eval=True), CreditConfig())
        with file_fetcher(db_path) as fetch:
            export(fetch, tmp_path / f"small-{fmt}", fmt, Selection(include_eval=True),
                   paging=Paging(call_rows=2, episodes=1))
        for a, b, c in zip(*(exported(tmp_path / f"{source}-{fmt}", fmt) for source in ("proxy", "file", "small"))):
            assert a.read_bytes() == b.read_bytes() == c.read_bytes(), a.name
    assert len(duck_rows(tmp_path / "file-parquet" / "calls.parquet")) == 6


async def test_evaluation_episodes_only_with_the_flag(start_proxy, db_path, tmp_path):
    proxy = await start_proxy()
    ids = await _traffic(proxy)
    await proxy.stop()
    plain, flagged = tmp_path / "plain", tmp_path / "flagged"
    assert await asyncio.to_thread(main, ["export", "--db", db_path, "--out", str(plain)]) == 0
    assert await asyncio.to_thread(main, ["export", "--db", db_path, "--out", str(flagged), "--include-eval"]) == 0
    assert ids["eval"] not in {r["call_id"] for r in duck_rows(exported(plain)[0])}
    [row] = [r for r in duck_rows(exported(flagged)[0]) if r["call_id"] == ids["eval"]]
    assert row["reward"] == 1.0 and row["credit"] == 1.0 and row["task_id"] == "t3"
    [episode] = [e for e in duck_rows(exported(flagged)[1]) if e["episode_id"] == ids["eval_episode"]]
    assert json.loads(episode["metadata"]) == {"eval": True} and episode["status"] == "open"


async def test_episodes_a_policy_keeps_from_training_are_never_exported(start_proxy, db_path, tmp_path):
    proxy = await start_proxy()
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    for episode, train in (("ep-ok", "true"), ("ep-private", "false")):
        await client.chat.completions.create(model="base", messages=[{"role": "user", "content": "q"}],
                                             extra_headers={"X-Flywheel-Episode": episode, "X-Flywheel-Train": train})
        await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1.0})
    await proxy.stop()
    assert await asyncio.to_thread(main, ["export", "--db", db_path, "--out", str(tmp_path / "out")]) == 0
    calls, episodes = exported(tmp_path / "out")
    assert [r["episode_id"] for r in duck_rows(calls)] == ["ep-ok"]
    assert [e["episode_id"] for e in duck_rows(episodes)] == ["ep-ok"]


async def test_agent_and_since_select_calls_while_credit_sees_the_whole_episode(start_proxy, db_path, tmp_path):
    proxy = await start_proxy()
    ids = await _traffic(proxy)
    await proxy.stop()

    runs = itertools.count()

    def call_ids(*flags: str) -> list[str]:
        out = tmp_path / f"out{next(runs)}"
        assert main(["export", "--db", db_path, "--out", str(out), *flags]) == 0
        return [r["call_id"] for r in duck_rows(exported(out)[0])]

    assert call_ids("--agent", "writer") == [ids["tool"], ids["completion"]]
    assert call_ids("--agent", "writ") == []  # the whole name must match
    assert call_ids("--agent", "solver|writer", "--include-eval") == call_ids("--include-eval")
    [since] = read_db(db_path, f"SELECT created_at FROM calls WHERE call_id = '{ids['tool']}'")
    later = read_db(db_path, "SELECT call_id FROM calls c JOIN episodes e USING (episode_id) "
                             f"WHERE c.created_at >= '{since['created_at']}' ORDER BY e.created_at, seq")
    assert call_ids("--since", since["created_at"], "--include-eval") == [r["call_id"] for r in later]
    assert call_ids("--since", since["created_at"]) == [ids["tool"], ids["completion"]]

    # ep-a's second call alone, credited by a discounted rule over all three calls of its episode
    (tmp_path / "flywheel.toml").write_text('[learner.credit]\nmode = "discounted"\ngamma = 0.5\n')
    out = tmp_path / "discounted"
    assert main(["export", "--db", db_path, "--out", str(out), "--agent", "solver",
                 "--config", str(tmp_path / "flywheel.toml")]) == 0
    credits = {r["call_id"]: r["credit"] for r in duck_rows(exported(out)[0])}
    assert credits[ids["first"]] == 0.25 and credits[ids["second"]] == 1.0  # 1 * 0.5 ** 1 + its own 0.5


async def test_only_generation_calls_are_exported(start_proxy, db_path, tmp_path):
    proxy = await start_proxy()
    ids = await _traffic(proxy)
    await proxy.stop()
    store = Store(db_path)  # pass-through calls go to their own table; one in `calls` must still stay out
    try:
        store.apply([CallRecord(
            call_id="call-embed", episode_id="ep-a", agent="solver", created_at=datetime.now(timezone.utc),
            endpoint="embeddings", stream=False, model="base", adapter="base", request='{"input": "x"}',
            response=None, prompt_token_ids=None, completion_token_ids=None, completion_logprobs=None,
            finish_reason=None, prompt_tokens=None, completion_tokens=None, latency_ms=1.0, ttft_ms=None,
            status=200, error=None)])
    finally:
        store.close()
    done = run_export(str(tmp_path / "out"), "parquet", None, db_path, Selection(), CreditConfig())
    rows = duck_rows(exported(tmp_path / "out")[0])
    assert "call-embed" not in {r["call_id"] for r in rows} and done.calls == 5
    assert {r["call_id"]: r["credit"] for r in rows}[ids["second"]] == 1.5


async def test_a_held_file_and_an_oversize_row_fail_clearly(start_proxy, db_path, tmp_path):
    proxy = await start_proxy(sql_max_bytes=300)
    await _traffic(proxy)
    held = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "flywheel", "export", "--db", db_path, "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120)
    assert held.returncode == 2 and "--url" in held.stderr and "flywheel export:" in held.stderr
    with pytest.raises(ExportError, match="larger than the proxy's reply cap"):
        await via_proxy(proxy, tmp_path / "small")
    assert list((tmp_path / "small").iterdir()) == []  # nothing that looks like an export is left
    assert await asyncio.to_thread(main, ["export", "--url", proxy.url, "--out", str(tmp_path / "y"),
                                          "--since", "yesterday"]) == 2


def test_a_responses_request_exports_the_chat_messages_it_was_sent_as():
    request = {"model": "base", "instructions": "be brief", "tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}],
        "input": [{"role": "user", "content": "weather?"},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]}
    chat = chat_body("responses", request)
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    assert chat["tools"][0]["function"]["name"] == "get_weather"


async def test_a_responses_call_through_the_proxy(start_proxy, tmp_path):
    proxy = await start_proxy()
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    try:
        await client.responses.create(model="base", instructions="be brief", input="hi", max_output_tokens=2,
                                      extra_headers=episode_headers("ep-r", "t4"))
    except openai.NotFoundError:
        pytest.skip("the proxy does not route POST /v1/responses yet")
    await via_proxy(proxy, tmp_path / "out")
    [row] = duck_rows(exported(tmp_path / "out")[0])
    assert row["endpoint"] == "responses" and row["completion_token_ids"] == [1000, 1001]
    assert row["prompt"] == [message(role="system", content="be brief"), message(role="user", content="hi")]
    assert row["completion"] == [message(role="assistant", content=" w0 w1")]


postgres_server, postgres_url = server.postgres_server, server.postgres_url  # the fixtures


@pytest.mark.postgres
async def test_a_postgres_store_exports_what_a_duckdb_one_does(start_proxy, db_path, postgres_url, tmp_path):
    exports = {}
    for kind, db in (("duckdb", db_path), ("postgres", postgres_url)):
        proxy = await start_proxy(db=db)
        ids = await _traffic(proxy)
        await proxy.stop()
        for flags in ((), ("--include-eval",), ("--agent", "writer"), ("--agent", "writ")):
            out = tmp_path / f"{kind}-{len(exports)}"
            assert await asyncio.to_thread(main, ["export", "--db", db, "--out", str(out), *flags]) == 0
            names = {v: k for k, v in ids.items()}
            exports[kind, flags] = [names.get(r["call_id"], "unnamed") for r in duck_rows(exported(out)[0])]
    for (kind, flags), calls in exports.items():
        assert calls == exports["duckdb", flags], (kind, flags)
    assert "eval" not in exports["postgres", ()] and "eval" in exports["postgres", ("--include-eval",)]
    assert exports["postgres", ("--agent", "writer")] == ["tool", "completion"]
    assert exports["postgres", ("--agent", "writ")] == []
