"""The proxy's settings: `[proxy]` in flywheel.toml, then FLYWHEEL_PROXY_* env vars, then CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProxyConfig:
    # OpenAI-compatible server to forward to, e.g. http://127.0.0.1:8000 (vLLM); /v1 is optional
    upstream: str = "http://127.0.0.1:8000"
    # address the proxy listens on; without keys only a loopback address is allowed (see `insecure`)
    host: str = "127.0.0.1"
    port: int = 8400
    # keys for agents: inference, /v1/models and episode routes (FLYWHEEL_PROXY_API_KEYS, comma-separated).
    # Sent as Authorization: Bearer KEY or X-Api-Key. No keys at all: every route is open, loopback only
    api_keys: tuple[str, ...] = ()
    # keys for everything, also /v1/sql (all prompts), /v1/adapters*, /v1/learner/*, /metrics
    admin_keys: tuple[str, ...] = ()
    # serve a non-loopback address without keys (anyone who reaches the port reads every prompt)
    insecure: bool = False
    # key the proxy sends the upstream (Authorization: Bearer); a client's own Authorization is never forwarded
    upstream_api_key: str = ""
    # token the learner's gRPC port requires ([learner] token); "" = none
    learner_token: str = ""
    # DuckDB file; this process is its only writer, others read through POST /v1/sql
    db: str = "flywheel.duckdb"
    # served name of the base model in vLLM; adapters apply to calls for it ("" = to any model)
    base_model: str = ""
    # vLLM's --max-lora-rank: adapters of higher rank are refused at registration
    max_lora_rank: int = 16
    # agent name for calls that name none
    default_agent: str = "default"
    # largest request body accepted, in bytes (413 above it)
    max_body_bytes: int = 32 * 1024 * 1024
    # records waiting for the writer; when full, handlers wait (back-pressure, never a drop)
    queue_size: int = 10_000
    # most records the writer commits in one transaction
    batch_max: int = 512
    # how long the writer lets a batch fill before committing, ms. A DuckDB commit costs a few ms
    # of CPU whatever its size, so longer batches are cheaper per call; nothing a client sees
    # waits for it (feedback commits at once, SQL reads flush first); a hard kill loses at most this
    batch_linger_ms: float = 1000.0
    # total time allowed for one upstream call, seconds (504 beyond it)
    upstream_timeout_s: float = 600.0
    # the learner's gRPC address, e.g. 127.0.0.1:8401 ("" = no learner: nothing is pushed)
    learner: str = ""
    # an open episode is pushed once it is rewarded and this many seconds passed since its last feedback
    push_after_s: float = 30.0
    # episodes per PushEpisodes stream
    push_batch: int = 64
    # seconds between looks for episodes to push when there were none
    push_interval_s: float = 1.0
    # most rows POST /v1/sql returns (the reply says when it truncated)
    sql_max_rows: int = 10_000
    # a SQL query running longer than this is interrupted, seconds
    sql_timeout_s: float = 30.0
    # sampling values for fields a request leaves out, written into the forwarded body and recorded:
    # the model's generation config (`flywheel up` reads it and starts vLLM with --generation-config
    # vllm). With a vLLM you start yourself, start it with --generation-config vllm too, or set its
    # generation config's values here, so that what is recorded is what was sampled.
    # Fields: temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # largest episode message the feed sends (and the learner accepts), bytes; a larger one is quarantined
    max_message_bytes: int = 64 * 1024 * 1024
