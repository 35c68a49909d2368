"""`flywheel export`: the store's LLM calls as a training dataset, one row per call, with an
episodes file beside it, in Parquet or JSON Lines, read through a running proxy or from a file.

`calls.<format>`, in episode order (the episode's created_at and id, then the call's seq):

- episode_id, seq, call_id, created_at, task_id, agent, adapter (the version that served
  it), model (what the client asked for), endpoint, stream;
- status and error: every generation call is exported, failed ones too (keep `status = 200`
  to train on answers only);
- `prompt` and `completion`, TRL's conversational columns. `prompt` is the chat messages
  sent: a chat call's `messages`; a completions call's `prompt` as one user message
  `{"role": "user", "content": prompt}` (its JSON text when it is not a string: a list of
  prompts or of token ids); a Responses call's request as the proxy translated it for the
  upstream (`flywheel.proxy.responses.chat_request`, whose messages are `chat_messages`).
  `completion` is `[choice 0's message]` with its tool calls (a completions call's text as
  the assistant's content), `[]` for a call that got no answer. Every message has the same
  keys (role, content, reasoning_content, name, tool_call_id, tool_calls; null where absent);
  content that is not text (content parts) is its JSON text; other keys are dropped;
- `tools`: the tool definitions sent, as JSON text (their schemas have no fixed shape), or null;
- prompt_token_ids, completion_token_ids, completion_logprobs (the sampling logprob of each
  completion token), temperature, finish_reason, as recorded;
- `reward`: the episode's latest reward; `credit`: what the learner's credit rule
  (`[learner.credit]`, `flywheel.learner.credit.assign`) gives the call, applied to the whole
  episode as the proxy feeds it to the learner, counting every agent as trained; null for a
  call the rule skips (an error, no token ids, greedy sampling, longer than its `max_tokens`, ...).

`episodes.<format>`: one row per episode with a call in the export: episode_id, task_id,
agent, created_at, closed_at, status, reward, metadata (JSON text) and calls (how many of
its calls are in the export).

Only generation calls are exported (endpoints chat.completions, completions, responses).
Episodes a data policy keeps from training (`episodes.train` false: X-Flywheel-Train: false,
a store level short of full, a key's or agent's rule) are never exported. Evaluation episodes
(metadata `{"eval": true}`) are left out unless asked for. `--since`
and `--agent` select calls; credit is still computed over each episode's calls.

Memory stays bounded on any store: episodes are read in batches and calls in pages, each
page starting after the last key of the one before (keyset pagination: a page the proxy's
`sql_max_rows` / `sql_max_bytes` caps cut short is simply followed by the next), and rows
are written as they come; one whole episode is held at a time, as credit needs it whole.
Both sources go through the same read-only queries and write the same bytes. A live store
is read page by page: what is written meanwhile may or may not be in the export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby, islice
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.learner.credit import CreditConfig, assign
from flywheel.proxy.capture import CHAT, COMPLETIONS
from flywheel.proxy.conversation import chat_body, completion_messages
from flywheel.proxy.responses import RESPONSES
from flywheel.sql import open_fetcher
from flywheel.store.proto_map import episode_proto
from flywheel.store.schema import CALLS, EPISODES, IS_EVAL_EPISODE, Table

Fetch = Callable[[str], dict]  # a read-only query -> {"columns", "types", "rows", "truncated"}

GENERATION_ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES)
FORMATS = ("parquet", "jsonl")
_TIMESTAMP = "TIMESTAMP WITH TIME ZONE"  # how a result names TIMESTAMPTZ columns


class ExportError(ValueError):
    """The export cannot be made as asked: a --since that is not a time, or a row larger than
    the proxy's reply cap."""


@dataclass(frozen=True)
class Selection:
    """Which calls are exported, beyond being generation calls."""

    since: datetime | None = None  # created at or after (timezone-aware)
    agent: str | None = None  # a regex matched against the whole agent name
    include_eval: bool = False  # evaluation episodes too


@dataclass(frozen=True)
class Paging:
    """How much is read at a time. In memory at once: one page of calls, one batch of episodes
    with their feedback, one whole episode's calls, one row group."""

    call_rows: int = 500  # calls (or feedback rows) per query
    episodes: int = 256  # episodes per batch; their ids go into the batch's queries
    row_group: int = 1024  # rows per Parquet row group, whatever the pages, so both sources write the same bytes


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    calls: int
    episodes: int
    files: tuple[Path, Path]  # the calls file, the episodes file


@dataclass(frozen=True)
class Keyset:
    """A query read page by page: `key` (SQL expressions) orders its rows and tells each one
    apart; `key_columns` are the result columns holding the key's values."""

    columns: str
    source: str
    where: str
    key: tuple[str, ...]
    key_columns: tuple[str, ...]


def parse_since(text: str) -> datetime:
    """An ISO 8601 time as a timezone-aware datetime (UTC when it names no offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ExportError(f"--since {text!r} is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def sql_literal(value: str | int | datetime) -> str:
    """`value` as a DuckDB literal: a timezone-aware datetime as TIMESTAMPTZ (to the microsecond),
    an int as it is, anything else as quoted text."""
    if isinstance(value, datetime):
        return f"TIMESTAMPTZ '{value.isoformat()}'"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def call_filter(selection: Selection) -> str:
    """SQL true for a call (alias `c`) that is exported."""
    # shadow samples are the proxy's, never a client's: they stay out (their grades still shape the credit)
    where = [f"c.endpoint IN ({', '.join(map(sql_literal, GENERATION_ENDPOINTS))})", "c.shadow_of IS NULL"]
    if selection.since is not None:
        where.append(f"c.created_at >= {sql_literal(selection.since)}")
    if selection.agent is not None:
        # anchored: PostgreSQL's ~ searches, DuckDB's matches the whole string; so both match it whole
        where.append(f"c.agent ~ {sql_literal(f'^(?:{selection.agent})$')}")
    return " AND ".join(where)


def episode_filter(selection: Selection) -> str:
    """SQL true for an episode (alias `e`) with an exported call that may be trained on, not an
    evaluation unless asked."""
    has_call = f"e.train AND EXISTS (SELECT 1 FROM calls c WHERE c.episode_id = e.episode_id AND {call_filter(selection)})"
    return has_call if selection.include_eval else f"NOT {IS_EVAL_EPISODE} AND {has_call}"


def episodes_keyset(selection: Selection) -> Keyset:
    """The exported episodes, in export order."""
    columns = ("e.episode_id, e.task_id, e.agent, e.created_at, e.closed_at, e.status, e.reward, "
               "e.metadata::VARCHAR AS metadata")
    return Keyset(columns, "episodes e", episode_filter(selection), ("e.created_at", "e.episode_id"),
                  ("created_at", "episode_id"))


def calls_keyset(selection: Selection, episode_ids: str) -> Keyset:
    """Every call of these episodes (`episode_ids`: SQL literals), in export order, with the
    learner's fields (credit needs the whole episode) and, for exported calls, the request and
    choice 0 as JSON text."""
    exported = f"coalesce({call_filter(selection)}, false)"  # a NULL agent matches no regex
    learner_fields = ", ".join(f"c.{column.name}" for column in CALLS.proto_columns)
    columns = (f"c.episode_id, e.created_at AS episode_created_at, {learner_fields}, c.endpoint, c.stream, c.model, "
               f"c.error, {exported} AS exported, CASE WHEN {exported} THEN c.request::VARCHAR END AS request, "
               f"CASE WHEN {exported} THEN (c.response->'choices'->0)::VARCHAR END AS choice")
    return Keyset(columns, "calls c JOIN episodes e ON e.episode_id = c.episode_id",
                  f"c.episode_id IN ({episode_ids})", ("e.created_at", "c.episode_id", "c.seq", "c.call_id"),
                  ("episode_created_at", "episode_id", "seq", "call_id"))


def feedback_keyset(episode_ids: str) -> Keyset:
    """The feedback of these episodes (`episode_ids`: SQL literals), each episode's oldest first,
    dims as JSON text (as the store's own reads give it to `episode_proto`)."""
    columns = "f.feedback_id, f.episode_id, f.call_id, f.reward, f.dims::VARCHAR AS dims, f.source, f.created_at"
    return Keyset(columns, "feedback f", f"f.episode_id IN ({episode_ids})",
                  ("f.episode_id", "f.created_at", "f.feedback_id"), ("episode_id", "created_at", "feedback_id"))


def page_query(keyset: Keyset, after: tuple | None, rows: int) -> str:
    """The SQL of the page of up to `rows` rows after the row whose key is `after` (None: the first)."""
    key = ", ".join(keyset.key)
    later = "" if after is None else f" AND ({key}) > ({', '.join(map(sql_literal, after))})"
    return f"SELECT {keyset.columns} FROM {keyset.source} WHERE ({keyset.where}){later} ORDER BY {key} LIMIT {rows}"


def row_values(columns: list[str], types: list[str], row: list) -> dict[str, Any]:
    """A result row (as POST /v1/sql sends it) by column name, its timestamps as UTC datetimes."""
    return {name: datetime.fromisoformat(value).astimezone(timezone.utc) if kind == _TIMESTAMP and value is not None
            else value for name, kind, value in zip(columns, types, row)}


def read_rows(fetch: Fetch, keyset: Keyset, page_rows: int) -> Iterator[dict[str, Any]]:
    """Every row of `keyset`'s query in key order, one page in memory at a time. A page cut short
    by the proxy's caps is followed by the next one, from its last row."""
    after = None
    while True:
        result = fetch(page_query(keyset, after, page_rows))
        rows = [row_values(result["columns"], result["types"], row) for row in result["rows"]]
        yield from rows
        if len(rows) < page_rows and not result.get("truncated"):
            return
        if not rows:
            raise ExportError("a single row is larger than the proxy's reply cap (its sql_max_bytes): raise the "
                              "cap, or export from the file with --db while no proxy holds it")
        after = tuple(rows[-1][name] for name in keyset.key_columns)


def _every_agent(agent: str) -> bool:
    """Every agent's calls are credited: an export trains whichever agent one picks from it,
    whatever the learner's `train_agents` says."""
    return True


def call_credits(episode: dict, calls: list[dict], feedback: list[dict], config: CreditConfig) -> dict[str, float]:
    """call id -> credit, for the calls the learner's credit rule credits in this episode (every
    agent counted as trained)."""
    transitions, _ = assign(episode_proto({**episode, "calls": calls, "feedback": feedback}), config, _every_agent)
    return {transition.call_id: transition.reward for transition in transitions}


def _text(value: Any) -> str | None:
    """Text as it is; anything else (content parts, arguments given as an object) as its JSON text."""
    return value if value is None or isinstance(value, str) else json.dumps(value)


def tool_call_row(call: dict) -> dict:
    """A tool call in the export's fixed shape."""
    function = call.get("function") or {}
    return {"id": call.get("id"), "type": call.get("type"),
            "function": {"name": function.get("name"), "arguments": _text(function.get("arguments"))}}


def message_row(message: dict) -> dict:
    """A chat message in the export's fixed shape: role, content, reasoning_content, name,
    tool_call_id, tool_calls (null where absent; no tool calls is null, not [])."""
    return {"role": message.get("role"), "content": _text(message.get("content")),
            "reasoning_content": _text(message.get("reasoning_content")), "name": message.get("name"),
            "tool_call_id": message.get("tool_call_id"),
            "tool_calls": [tool_call_row(c) for c in message["tool_calls"]] if message.get("tool_calls") else None}


def call_row(call: dict, episode: dict, credit: float | None) -> dict:
    """One row of the calls file, from an exported call's row, its episode's and its credit."""
    chat = chat_body(call["endpoint"], json.loads(call["request"]))
    return {
        "episode_id": call["episode_id"], "seq": call["seq"], "call_id": call["call_id"],
        "created_at": call["created_at"], "task_id": episode["task_id"], "agent": call["agent"],
        "adapter": call["adapter"], "model": call["model"], "endpoint": call["endpoint"], "stream": call["stream"],
        "status": call["status"], "error": call["error"],
        "prompt": [message_row(m) for m in chat.get("messages") or ()],
        "completion": [message_row(m) for m in completion_messages({"choices": [json.loads(call["choice"])] if call["choice"] else []})],
        "tools": json.dumps(chat["tools"]) if chat.get("tools") else None,
        "prompt_token_ids": call["prompt_token_ids"], "completion_token_ids": call["completion_token_ids"],
        "completion_logprobs": call["completion_logprobs"], "temperature": call["temperature"],
        "finish_reason": call["finish_reason"], "reward": episode["reward"], "credit": credit,
    }


def episode_row(episode: dict, calls: int) -> dict:
    """One row of the episodes file."""
    return {name: episode[name] for name in EPISODE_SCHEMA.names[:-1]} | {"calls": calls}


def episode_exports(fetch: Fetch, selection: Selection, credit: CreditConfig,
                    paging: Paging) -> Iterator[tuple[dict, list[dict]]]:
    """(episode row, its call rows) for each exported episode, in export order."""
    episodes = read_rows(fetch, episodes_keyset(selection), paging.episodes)
    while batch := list(islice(episodes, paging.episodes)):
        by_id = {episode["episode_id"]: episode for episode in batch}
        ids = ", ".join(map(sql_literal, by_id))
        feedback: dict[str, list[dict]] = {}
        for row in read_rows(fetch, feedback_keyset(ids), paging.call_rows):
            feedback.setdefault(row["episode_id"], []).append(row)
        calls = read_rows(fetch, calls_keyset(selection, ids), paging.call_rows)
        for episode_id, group in groupby(calls, key=lambda call: call["episode_id"]):
            episode, episode_calls = by_id[episode_id], list(group)
            credits = call_credits(episode, episode_calls, feedback.get(episode_id, []), credit)
            rows = [call_row(c, episode, credits.get(c["call_id"])) for c in episode_calls if c["exported"]]
            yield episode_row(episode, len(rows)), rows


def _store_fields(table: Table, *names: str) -> list[pa.Field]:
    schema = table.arrow_schema()
    return [schema.field(name) for name in names]


_TOOL_CALL = pa.struct([("id", pa.string()), ("type", pa.string()),
                        ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())]))])
_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning_content", pa.string()),
                      ("name", pa.string()), ("tool_call_id", pa.string()), ("tool_calls", pa.list_(_TOOL_CALL))])

CALL_SCHEMA = pa.schema([
    *_store_fields(CALLS, "episode_id", "seq", "call_id", "created_at"), *_store_fields(EPISODES, "task_id"),
    *_store_fields(CALLS, "agent", "adapter", "model", "endpoint", "stream", "status", "error"),
    pa.field("prompt", pa.list_(_MESSAGE)), pa.field("completion", pa.list_(_MESSAGE)), pa.field("tools", pa.string()),
    *_store_fields(CALLS, "prompt_token_ids", "completion_token_ids", "completion_logprobs", "temperature",
                   "finish_reason"),
    *_store_fields(EPISODES, "reward"), pa.field("credit", pa.float64()),
])
EPISODE_SCHEMA = pa.schema([
    *_store_fields(EPISODES, "episode_id", "task_id", "agent", "created_at", "closed_at", "status", "reward",
                   "metadata"),
    pa.field("calls", pa.int64()),
])


class Sink(Protocol):
    def write(self, row: dict) -> None: ...

    def close(self) -> None: ...


class ParquetSink:
    """Rows into a Parquet file in row groups of exactly `row_group` rows (the last one shorter)."""

    def __init__(self, path: Path, schema: pa.Schema, row_group: int):
        self.writer = pq.ParquetWriter(path, schema)
        self.schema, self.row_group, self.rows = schema, row_group, []

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) == self.row_group:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


class JsonlSink:
    """Rows into a JSON Lines file, one object a line; times as ISO 8601 text."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False, default=datetime.isoformat) + "\n")

    def close(self) -> None:
        self.file.close()


def open_sink(path: Path, fmt: str, schema: pa.Schema, paging: Paging) -> Sink:
    """A writer of `fmt` rows into `path`."""
    return ParquetSink(path, schema, paging.row_group) if fmt == "parquet" else JsonlSink(path)


def export(fetch: Fetch, out_dir: Path, fmt: str = "parquet", selection: Selection = Selection(),
           credit: CreditConfig = CreditConfig(), paging: Paging = Paging()) -> Exported:
    """Write `calls.<fmt>` and `episodes.<fmt>` into `out_dir` from the store `fetch` reads. Each
    file is written beside its name (`.partial`) and renamed when everything is written, so a
    failed export leaves no file that looks whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = (out_dir / f"calls.{fmt}", out_dir / f"episodes.{fmt}")
    partial = [path.with_name(path.name + ".partial") for path in files]
    calls_out = open_sink(partial[0], fmt, CALL_SCHEMA, paging)
    episodes_out = open_sink(partial[1], fmt, EPISODE_SCHEMA, paging)
    calls = episodes = 0
    try:
        try:
            for episode, rows in episode_exports(fetch, selection, credit, paging):
                for row in rows:
                    calls_out.write(row)
                episodes_out.write(episode)
                calls, episodes = calls + len(rows), episodes + 1
        finally:
            calls_out.close()
            episodes_out.close()
    except BaseException:
        for path in partial:
            path.unlink(missing_ok=True)
        raise
    for written, final in zip(partial, files):
        os.replace(written, final)
    return Exported(calls, episodes, files)


def run_export(out: str, fmt: str, url: str | None, db: str | None, selection: Selection,
               credit: CreditConfig) -> Exported:
    """`export` from the file `db` (opened read-only) if given, else through the proxy at `url`."""
    with open_fetcher(url, db) as fetch:
        return export(fetch, Path(out), fmt, selection, credit)
