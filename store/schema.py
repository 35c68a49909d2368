"""The store's schema, declared once, for DuckDB and PostgreSQL.

Each table is a tuple of `Column`s. From that one spec we render the DDL of either
database (`Dialect`: DuckDB's types as written in the spec, or their PostgreSQL
counterparts), the Arrow schema the DuckDB writer inserts with, the in-place upgrade
(`migrate`: tables and columns that a newer Flywheel adds are created on open) and the
mapping to the protobuf messages the proxy sends the learner (columns marked `proto`
travel in the same-named field; TIMESTAMPTZ as unix seconds). `SCHEMA_VERSION` is bumped
with every change to the spec. Drift fails a test: `tests/test_store.py` and
`tests/test_postgres.py` compare the spec with a freshly created database of each kind,
`tests/test_protos.py` with the protobuf messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa

SCHEMA_VERSION = 8


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # DuckDB type as written in DDL (`Dialect.types` maps it for PostgreSQL)
    doc: str
    primary_key: bool = False
    proto: bool = False  # carried to the learner in the same-named field of the table's message
    # SQL over the row's other columns that fills the column when an upgrade adds it. Backfills
    # of columns older than schema 7 use DuckDB's TRY_CAST: PostgreSQL support came with schema 7,
    # so a PostgreSQL store has those columns from its creation and never runs them; a newer
    # backfill must hold in both dialects.
    backfill: str = ""


@dataclass(frozen=True)
class Index:
    """An index PostgreSQL keeps, where several proxies write one store: the unique ones make
    the database refuse duplicates that two writers could otherwise both insert (ON CONFLICT
    targets them). DuckDB has one writer, which keeps these keys unique itself, and an index
    there would slow every insert; it gets none."""

    columns: tuple[str, ...]
    unique: bool = False
    where: str = ""  # a partial index: only rows matching this predicate

    def name(self, table: str) -> str:
        return f"{table}_{'_'.join(self.columns)}_{'key' if self.unique else 'idx'}"

    def ddl(self, table: str) -> str:
        return (f"CREATE {'UNIQUE ' if self.unique else ''}INDEX IF NOT EXISTS {self.name(table)} ON {table} "
                f"({', '.join(self.columns)}){f' WHERE {self.where}' if self.where else ''}")


@dataclass(frozen=True)
class Dialect:
    """What differs between the store's two databases, each difference named."""

    name: str
    types: dict[str, str]  # spec type -> this database's, as its information_schema reports it
    indexes: bool  # whether it creates the tables' `Index`es
    # SQL true when the JSON column {json}'s list under {key} holds any of the strings of the
    # statement's (VARCHAR[]) parameter
    json_list_has_any: str

    def column_type(self, column: Column) -> str:
        return self.types[column.sql_type]


DUCKDB = Dialect(
    "duckdb",
    types={t: t for t in ("VARCHAR", "JSON", "INTEGER", "BIGINT", "DOUBLE", "BOOLEAN", "TIMESTAMPTZ", "INTEGER[]",
                          "FLOAT[]")},
    indexes=False,
    json_list_has_any="list_has_any(json_extract_string({json}, '$.{key}[*]'), ?::VARCHAR[])",
)
POSTGRES = Dialect(
    "postgres",
    types={"VARCHAR": "text", "JSON": "jsonb", "INTEGER": "integer", "BIGINT": "bigint", "DOUBLE": "double precision",
           "BOOLEAN": "boolean", "TIMESTAMPTZ": "timestamp with time zone", "INTEGER[]": "integer[]",
           "FLOAT[]": "real[]"},
    indexes=True,
    json_list_has_any="jsonb_exists_any({json}->'{key}', ?::text[])",
)

_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "INTEGER[]": pa.list_(pa.int32()),
    "FLOAT[]": pa.list_(pa.float32()),
}


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    proto_message: str = ""  # message in protos/flywheel.proto that rows of this table map to
    indexes: tuple[Index, ...] = ()

    @property
    def proto_columns(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.proto)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def ddl(self, dialect: Dialect = DUCKDB) -> str:
        cols = ",\n  ".join(
            f"{c.name} {dialect.column_type(c)}{' PRIMARY KEY' if c.primary_key else ''}" for c in self.columns
        )
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  {cols}\n)"

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(c.name, _ARROW_TYPES[c.sql_type]) for c in self.columns])


EPISODES = Table(
    "episodes",
    (
        Column("episode_id", "VARCHAR", "client-given or generated id", primary_key=True, proto=True),
        Column("task_id", "VARCHAR", "groups repeated attempts of one task (GRPO group)", proto=True),
        Column("agent", "VARCHAR", "agent that opened the episode, if named"),
        Column("created_at", "TIMESTAMPTZ", "first call or explicit creation"),
        Column("closed_at", "TIMESTAMPTZ", "set by POST /v1/episodes/{id}/close", proto=True),
        Column("status", "VARCHAR", "open | closed"),
        Column("reward", "DOUBLE", "latest episode-level feedback reward"),
        Column("metadata", "JSON", "free-form metadata from POST /v1/episodes"),
        Column("pushed_at", "TIMESTAMPTZ", "when the learner acknowledged it (NULL: not yet sent)"),
        Column("quarantined_at", "TIMESTAMPTZ", "when the feed gave up on it (never pushed after that)"),
        Column("push_error", "VARCHAR", "why it was quarantined"),
        Column("grade_failed_at", "TIMESTAMPTZ", "when the grader gave up on it (never graded again but by `flywheel grade`)"),
        Column("grade_error", "VARCHAR", "why the grader failed"),
        Column("infra_error", "VARCHAR", "why its outcome is not the model's doing (a call the upstream failed or "
               "timed out, or feedback \"infra_error\": true): never pushed to the learner"),
        Column("push_claimed_by", "VARCHAR", "the proxy that took it to push to the learner (PostgreSQL, where "
               "several proxies share the store: each episode goes out through one)"),
        Column("push_claimed_until", "TIMESTAMPTZ", "when that claim lapses: a proxy that died holding it is "
               "relieved of it then"),
        Column("train", "BOOLEAN", "false: a call of it was made under a policy that forbids training on it "
               "(X-Flywheel-Train: false, a store level short of full, or a key's or agent's rule): never pushed "
               "to the learner", backfill="TRUE"),
    ),
    proto_message="Episode",
    # the feed's scan: what is still to push
    indexes=(Index(("created_at",), where="pushed_at IS NULL"),),
)

CALLS = Table(
    "calls",
    (
        Column("call_id", "VARCHAR", "id returned in X-Flywheel-Call", proto=True),
        Column("episode_id", "VARCHAR", "episode the call belongs to"),
        Column("agent", "VARCHAR", "agent that made the call", proto=True),
        Column("seq", "INTEGER", "0-based order of the call within its episode (a shadow sample: its original's)",
               proto=True),
        Column("created_at", "TIMESTAMPTZ", "when the proxy received the request", proto=True),
        Column("endpoint", "VARCHAR", "chat.completions | completions | responses (sent upstream as chat)"),
        Column("stream", "BOOLEAN", "client asked for SSE streaming"),
        Column("model", "VARCHAR", "model the client asked for"),
        Column("adapter", "VARCHAR", "model or adapter name the upstream served", proto=True),
        Column("request", "JSON", "request body as the client sent it, minus metadata"),
        Column("response", "JSON", "choices: text or message, tool calls, finish reasons"),
        Column("prompt_token_ids", "INTEGER[]", "exact prompt tokens from the upstream", proto=True),
        Column("completion_token_ids", "INTEGER[]", "exact sampled tokens of choice 0", proto=True),
        Column("completion_logprobs", "FLOAT[]", "behaviour logprob of each sampled token", proto=True),
        Column("finish_reason", "VARCHAR", "choice 0's finish reason", proto=True),
        Column("prompt_tokens", "INTEGER", "usage.prompt_tokens (or counted)"),
        Column("completion_tokens", "INTEGER", "usage.completion_tokens (or counted)"),
        Column("latency_ms", "DOUBLE", "request received to last byte sent"),
        Column("ttft_ms", "DOUBLE", "request received to first content chunk (streaming)"),
        Column("status", "INTEGER", "HTTP status returned to the client", proto=True),
        Column("error", "VARCHAR", "upstream or proxy error message"),
        Column("temperature", "DOUBLE", "sampling temperature vLLM used (request, else sampling_defaults, else 1)",
               proto=True, backfill="coalesce(TRY_CAST(request->>'temperature' AS DOUBLE), 1.0)"),
        Column("top_p", "DOUBLE", "nucleus sampling threshold used (1 = off)", proto=True,
               backfill="coalesce(TRY_CAST(request->>'top_p' AS DOUBLE), 1.0)"),
        Column("top_k", "INTEGER", "top-k used (-1 or 0 = off)", proto=True,
               backfill="coalesce(TRY_CAST(request->>'top_k' AS INTEGER), -1)"),
        Column("min_p", "DOUBLE", "min-p used (0 = off)", proto=True,
               backfill="coalesce(TRY_CAST(request->>'min_p' AS DOUBLE), 0.0)"),
        Column("presence_penalty", "DOUBLE", "presence penalty used", proto=True,
               backfill="coalesce(TRY_CAST(request->>'presence_penalty' AS DOUBLE), 0.0)"),
        Column("frequency_penalty", "DOUBLE", "frequency penalty used", proto=True,
               backfill="coalesce(TRY_CAST(request->>'frequency_penalty' AS DOUBLE), 0.0)"),
        Column("repetition_penalty", "DOUBLE", "repetition penalty used (1 = off)", proto=True,
               backfill="coalesce(TRY_CAST(request->>'repetition_penalty' AS DOUBLE), 1.0)"),
        Column("choices", "INTEGER", "n: choices asked for (the token columns hold choice 0's)", proto=True,
               backfill="coalesce(TRY_CAST(request->>'n' AS INTEGER), 1)"),
        Column("shadow_of", "VARCHAR", "a shadow sample of this call (same prompt tokens and adapter, never shown "
               "to a client; request is the original's); NULL for a client's call", proto=True),
        Column("redactions", "JSON", "matches replaced by placeholders before forwarding, per detector "
               "({\"email\": 2}); NULL: none"),
        Column("stored", "VARCHAR", "what its policy let the store keep: full, or metadata (request, response, "
               "token ids, logprobs and error text are NULL)", backfill="'full'"),
    ),
    proto_message="Call",
    # a call is written once, however often its batch is retried; two proxies appending to one
    # episode cannot give two client calls the same seq (shadow samples share their original's)
    indexes=(Index(("call_id",), unique=True), Index(("episode_id", "seq"), unique=True, where="shadow_of IS NULL"),
             Index(("episode_id",))),
)

FEEDBACK = Table(
    "feedback",
    (
        Column("feedback_id", "VARCHAR", "generated id", primary_key=True),
        Column("episode_id", "VARCHAR", "episode the outcome belongs to"),
        Column("call_id", "VARCHAR", "set when the reward is for one call"),
        Column("reward", "DOUBLE", "finite scalar reward", proto=True),
        Column("dims", "JSON", "named reward dimensions {name: number}"),
        Column("source", "VARCHAR", "who judged: grader, user, ...", proto=True),
        Column("created_at", "TIMESTAMPTZ", "when it was committed", proto=True),
        Column("idempotency_key", "VARCHAR", "a repeated key within an episode is applied once"),
        Column("grader_version", "VARCHAR", "the [grader] version that scored it (NULL: posted feedback)"),
    ),
    proto_message="Reward",
    indexes=(Index(("episode_id", "idempotency_key"), unique=True),),  # NULL keys never collide
)

ADAPTERS = Table(
    "adapters",
    (
        Column("served_name", "VARCHAR", "name in vLLM and in calls.adapter: {agent}-v{version}", primary_key=True),
        Column("agent", "VARCHAR", "agent whose calls it serves"),
        Column("version", "INTEGER", "1, 2, ... per agent; never reused"),
        Column("path", "VARCHAR", "PEFT adapter directory vLLM loads it from"),
        Column("base_model", "VARCHAR", "served name of the base model it applies to"),
        Column("created_at", "TIMESTAMPTZ", "when it was registered"),
        Column("status", "VARCHAR", "candidate (on a canary slice) | active | standby (rollback target) | retired | "
               "rolled_back | rejected (a candidate that lost) | failed (would not load)"),
        Column("live_at", "TIMESTAMPTZ", "when it began serving the agent's traffic as active (NULL: never)"),
        Column("decided_at", "TIMESTAMPTZ", "when it was promoted, rejected or rolled back"),
        Column("reason", "VARCHAR", "why it was promoted, rejected or rolled back (by hand, or the test's outcome)"),
        Column("comparison", "JSON", "the latest canary comparison or post-promotion watch: episodes, mean reward "
               "and interval on each side, the difference's interval, look, basis (eval or live episodes)"),
        Column("updated_at", "TIMESTAMPTZ", "when the row was last written: the registry's change marker, which "
               "proxies sharing the store poll (`adapters_changed_at`)",
               backfill="coalesce(decided_at, live_at, created_at)"),
    ),
)

PASSTHROUGH = Table(
    "passthrough",
    (
        Column("call_id", "VARCHAR", "id returned in X-Flywheel-Call", primary_key=True),
        Column("agent", "VARCHAR", "agent that made the call"),
        Column("episode_id", "VARCHAR", "episode the client named (NULL: none; no episode is opened)"),
        Column("created_at", "TIMESTAMPTZ", "when the proxy received the request"),
        Column("method", "VARCHAR", "GET | POST"),
        Column("path", "VARCHAR", "upstream route: /v1/embeddings, /tokenize, /detokenize, /v1/models/{id}"),
        Column("status", "INTEGER", "HTTP status returned to the client"),
        Column("latency_ms", "DOUBLE", "request received to response sent"),
        Column("request_bytes", "BIGINT", "size of the request body"),
        Column("response_bytes", "BIGINT", "size of the response body"),
        Column("error", "VARCHAR", "upstream or proxy error message"),
    ),
)

TRAIN_RUNS = Table(
    "train_runs",
    (
        Column("run_id", "VARCHAR", "generated id", primary_key=True),
        Column("created_at", "TIMESTAMPTZ", "when the update was published (or held)"),
        Column("served_name", "VARCHAR", "adapter version it produced (NULL: held by a guard)"),
        Column("agent", "VARCHAR", "agent whose adapter was trained", proto=True),
        Column("version", "INTEGER", "adapter version number it produced", proto=True),
        Column("episodes", "INTEGER", "episodes the update learned from", proto=True),
        Column("transitions", "INTEGER", "LLM calls trained on", proto=True),
        Column("tokens", "BIGINT", "completion tokens trained on", proto=True),
        Column("loss", "DOUBLE", "mean policy loss", proto=True),
        Column("reward_mean", "DOUBLE", "mean reward of the transitions", proto=True),
        Column("advantage_mean", "DOUBLE", "mean advantage", proto=True),
        Column("advantage_std", "DOUBLE", "advantage standard deviation", proto=True),
        Column("clip_fraction", "DOUBLE", "share of tokens whose ratio was clipped", proto=True),
        Column("kl", "DOUBLE", "mean k3 KL to the base model (0 when beta = 0)", proto=True),
        Column("entropy", "DOUBLE", "mean token entropy of the policy", proto=True),
        Column("tokens_per_s", "DOUBLE", "training throughput, padded tokens per second", proto=True),
        Column("grad_norm", "DOUBLE", "gradient norm before clipping", proto=True),
        Column("logprob_mismatch_mean", "DOUBLE", "mean |learner - vLLM| logprob per token", proto=True),
        Column("logprob_mismatch_max", "DOUBLE", "largest |learner - vLLM| logprob", proto=True),
        Column("seconds", "DOUBLE", "wall time of the update", proto=True),
        Column("skipped", "JSON", "transitions not trained on, by reason", proto=True),
        Column("step_kl", "DOUBLE", "KL(policy before the step || after) per token, on the first micro-batch",
               proto=True),
        Column("held", "VARCHAR", "the [learner.guards] limits it crossed: kept by the learner, not published "
               "(served_name NULL); NULL: published; 'published by --force despite: ...': published by hand", proto=True),
    ),
    proto_message="UpdateMetrics",
)

AUDIT_LOG = Table(
    "audit_log",
    (
        Column("logged_at", "TIMESTAMPTZ", "when the action was taken"),
        Column("key_id", "VARCHAR", "the caller's key: the first 12 hex digits of its SHA-256 (NULL: no keys "
               "configured)"),
        Column("action", "VARCHAR", "erase | retention | content_retention | sql | adapter_register | "
               "adapter_promote | adapter_reject | adapter_rollback | train | config_reload"),
        Column("target", "VARCHAR", "what it acted on: an episode id, an agent, an adapter version"),
        Column("row_count", "BIGINT", "rows the query returned (sql) or the erasure removed"),
        Column("detail", "JSON", "the action's parameters (sql: the query's text), never stored content"),
    ),
    indexes=(Index(("logged_at",)),),
)

QUOTA_USAGE = Table(
    "quota_usage",
    (
        Column("subject", "VARCHAR", "what a limit counts: a key, or an agent under an agents rule"),
        Column("proxy", "VARCHAR", "the proxy that counted it"),
        Column("counted_at", "TIMESTAMPTZ", "the second it was counted in"),
        Column("calls", "BIGINT", "calls admitted"),
        Column("tokens", "BIGINT", "prompt + completion tokens of calls that ended"),
    ),
    # on PostgreSQL, where proxies share limits; each adds to its own rows
    indexes=(Index(("subject", "proxy", "counted_at"), unique=True),),
)

QUOTA_IN_PROGRESS = Table(
    "quota_in_progress",
    (
        Column("subject", "VARCHAR", "what a max_concurrent limit counts: a key, or an agent under an agents rule"),
        Column("proxy", "VARCHAR", "the proxy whose calls these are"),
        Column("in_progress", "BIGINT", "its calls in progress at `reported_at`"),
        Column("reported_at", "TIMESTAMPTZ", "when it said so (a proxy silent for a few seconds no longer counts)"),
    ),
    indexes=(Index(("subject", "proxy"), unique=True),),
)

META = Table(
    "flywheel_meta",
    (
        Column("key", "VARCHAR", "setting name", primary_key=True),
        Column("value", "VARCHAR", "setting value"),
    ),
)

TABLES: tuple[Table, ...] = (META, EPISODES, CALLS, FEEDBACK, ADAPTERS, TRAIN_RUNS, PASSTHROUGH, AUDIT_LOG,
                             QUOTA_USAGE, QUOTA_IN_PROGRESS)

# SQL true for an evaluation episode (alias `e`), in both databases: metadata {"eval": true}. The
# proxy never pushes these to the learner; `flywheel report` scores versions on them. It spells
# out the values DuckDB's TRY_CAST(... AS BOOLEAN) takes for true: PostgreSQL has no TRY_CAST.
EVAL_TRUE = ("true", "t", "yes", "y", "1")  # metadata "eval" values (lower-cased text) that mark a held-out episode
IS_EVAL_EPISODE = f"coalesce(lower(e.metadata->>'eval') IN ({', '.join(repr(v) for v in EVAL_TRUE)}), false)"

Run = Callable[[str, Sequence], list[tuple]]  # statement with `?` parameters, values -> rows


def migrate(run: Run, dialect: Dialect) -> None:
    """Create missing tables, columns (filled by their backfill) and indexes, then record
    SCHEMA_VERSION, all through `run`. Refuses a database written by a newer Flywheel."""
    run(META.ddl(dialect), [])
    row = run("SELECT value FROM flywheel_meta WHERE key = 'schema_version'", [])
    found = int(row[0][0]) if row else 0
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"store schema version {found} is newer than this Flywheel's {SCHEMA_VERSION}; upgrade Flywheel"
        )
    for table in TABLES:
        run(table.ddl(dialect), [])
        have = {r[0] for r in run("SELECT column_name FROM information_schema.columns "
                                  "WHERE table_name = ? AND table_schema = current_schema()", [table.name])}
        for column in table.columns:
            if column.name not in have:
                run(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {dialect.column_type(column)}", [])
                if column.backfill:  # rows written before the column existed
                    run(f"UPDATE {table.name} SET {column.name} = {column.backfill}", [])
        for index in table.indexes if dialect.indexes else ():
            run(index.ddl(table.name), [])
    run("INSERT INTO flywheel_meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [str(SCHEMA_VERSION)])
