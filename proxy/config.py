"""The proxy's settings: `[proxy]` in flywheel.toml, then FLYWHEEL_PROXY_* env vars, then CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.proxy.policy import AgentRule, KeyRule


@dataclass(frozen=True)
class ProxyConfig:
    # OpenAI-compatible servers to forward to, e.g. http://127.0.0.1:8000 (vLLM); /v1 is optional.
    # Several (a TOML list, comma-separated in FLYWHEEL_PROXY_UPSTREAM, --upstream repeated) are
    # replicas of one model: each episode sticks to one (rendezvous hashing), failing over to the next
    upstream: tuple[str, ...] = ("http://127.0.0.1:8000",)
    # address the proxy listens on; without keys only a loopback address is allowed (see `insecure`)
    host: str = "127.0.0.1"
    port: int = 8400
    # keys for agents: inference, /v1/models and episode routes (FLYWHEEL_PROXY_API_KEYS, comma-separated).
    # Sent as Authorization: Bearer KEY or X-Api-Key. No keys at all: every route is open, loopback only
    api_keys: tuple[str, ...] = ()
    # keys for everything, also /v1/sql (all prompts), /v1/adapters*, /v1/learner/*, /metrics
    admin_keys: tuple[str, ...] = ()
    # keys with their own data policy and limits, [[proxy.keys]] tables (TOML only): key, scope
    # (client or admin), store (full | metadata | none), train, rpm, tpm, max_concurrent
    # (flywheel.proxy.policy). Each is a key as if listed in api_keys or admin_keys
    keys: tuple[KeyRule, ...] = ()
    # data policy and limits per agent, [[proxy.agents]] tables (TOML only): match (a regex the
    # whole agent name must match) and the same settings; each matching agent is counted apart
    agents: tuple[AgentRule, ...] = ()
    # serve a non-loopback address without keys (anyone who reaches the port reads every prompt)
    insecure: bool = False
    # key the proxy sends the upstream (Authorization: Bearer); a client's own Authorization is never forwarded
    upstream_api_key: str = ""
    # token the learner's gRPC port requires ([learner] token); "" = none
    learner_token: str = ""
    # the store: a DuckDB file (this process is its only writer, others read through POST /v1/sql),
    # or a postgresql://user:password@host/db URL that several proxies share
    db: str = "flywheel.duckdb"
    # run the store in a child process of its own: DuckDB's commits and users' SQL take
    # milliseconds of CPU, much of it holding the GIL, which in the serving process would hold up
    # every call in flight (p99 latency many ms above p50); this one then only pickles ops and
    # results. false: the store runs in the serving process, as before
    store_process: bool = True
    # served name of the base model in vLLM; adapters apply to calls for it ("" = to any model)
    base_model: str = ""
    # serve every LLM call with this model, whatever model the client names (an app written for
    # "gpt-4.1" works unchanged; calls.model keeps the name it sent). "" = the client's model
    serve_model: str = ""
    # vLLM's --max-lora-rank: adapters of higher rank are refused at registration
    max_lora_rank: int = 16
    # directories adapters may be registered from (a path elsewhere gets a 403); none = registration
    # off. `flywheel up` sets the learner's state directory
    adapter_roots: tuple[str, ...] = ()
    # seconds between checks that vLLM still has the loaded adapters (it lost them if it restarted)
    adapter_check_s: float = 5.0
    # agent name for calls that name none
    default_agent: str = "default"
    # largest request body accepted, in bytes (413 above it)
    max_body_bytes: int = 32 * 1024 * 1024
    # a request body not fully received within this many seconds gets a 408 (a slow sender holds no slot)
    body_timeout_s: float = 30.0
    # requests handled at once; more get a 503 with Retry-After (each holds a client socket and,
    # for inference, an upstream one)
    max_in_flight: int = 4096
    # connections to the upstream at once; calls beyond it queue for a free one
    upstream_max_connections: int = 1024
    # bytes of records waiting for the writer (roughly: their text and token ids); when full,
    # handlers wait for room (back-pressure, never a drop)
    queue_max_bytes: int = 256 * 1024 * 1024
    # keep serving LLM calls when the store cannot write (disk full): their records are dropped
    # and counted (flywheel_records_dropped_total) instead of holding every agent up
    serve_without_store: bool = False
    # most records the writer commits in one transaction
    batch_max: int = 512
    # how long the writer lets a batch fill before committing, ms. A DuckDB commit costs a few ms
    # of CPU whatever its size, so longer batches are cheaper per call; nothing a client sees
    # waits for it (feedback commits at once, SQL reads flush first); a hard kill loses at most this
    batch_linger_ms: float = 1000.0
    # at shutdown, how long requests in progress (long streams) get to finish, seconds; then what
    # is queued is written. `flywheel up` waits this plus a minute before it kills the proxy
    shutdown_timeout_s: float = 30.0
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
    # most bytes of rows POST /v1/sql returns, as encoded JSON (the reply says when it truncated)
    sql_max_bytes: int = 32 * 1024 * 1024
    # a SQL query running longer than this is interrupted, seconds
    sql_timeout_s: float = 30.0
    # SQL queries run at once, each on its own thread, apart from the store's own reads (feed,
    # episodes), which they never hold up; more wait up to sql_timeout_s, then get a 429
    sql_concurrency: int = 2
    # DuckDB's memory_limit, threads and spill space (MB), shared by the writer and every query
    sql_memory_mb: int = 2048
    sql_threads: int = 2
    sql_temp_mb: int = 4096
    # how far the proxy's address space may grow past its size at start, MB (RLIMIT_AS; 0 = no cap).
    # DuckDB does not count every allocation against memory_limit (a query building huge strings
    # grows the process until the kernel kills it); under this cap the allocation fails instead,
    # and the query gets an out-of-memory error while the proxy serves on
    memory_headroom_mb: int = 6144
    # sampling values for fields a request leaves out, written into the forwarded body and recorded:
    # the model's generation config (`flywheel up` reads it and starts vLLM with --generation-config
    # vllm). With a vLLM you start yourself, start it with --generation-config vllm too, or set its
    # generation config's values here, so that what is recorded is what was sampled.
    # Fields: temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # detectors whose matches in a request's messages are replaced by placeholders (<EMAIL_1>) before
    # the model sees them, and so never stored or trained on: email, card (Luhn-checked), ipv4,
    # phone, regex:PATTERN (flywheel.proxy.redaction)
    redact: tuple[str, ...] = ()
    # put the originals back into the client's response where the model repeated a placeholder
    # (the store keeps the placeholders)
    redact_restore: bool = False
    # days an episode is kept (then deleted with its calls and feedback, from the learner's buffer
    # too); 0 = forever
    retention_days: float = 0.0
    # days a call's content (messages, completion, token ids, logprobs, error text) is kept; then
    # only its metadata stays and its episode is no longer trained on; 0 = as long as the episode
    content_retention_days: float = 0.0
    # seconds between looks for what retention has to remove
    retention_check_s: float = 3600.0
    # largest episode message the feed sends (and the learner accepts), bytes; a larger one is quarantined
    max_message_bytes: int = 64 * 1024 * 1024
    # OTLP/HTTP traces URL (e.g. http://collector:4318/v1/traces) for one GenAI span per LLM call;
    # "" = no spans (needs the `otel` extra: pip install 'flywheel-rl[otel]')
    otel_endpoint: str = ""
    # put prompts and completions into the spans (gen_ai.input.messages / gen_ai.output.messages)
    otel_content: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.upstream, str):  # ProxyConfig(upstream="http://...") from code: one replica
            object.__setattr__(self, "upstream", (self.upstream,))

    @property
    def client_keys(self) -> tuple[str, ...]:
        """api_keys and the client-scope [[proxy.keys]]."""
        return self.api_keys + tuple(rule.key for rule in self.keys if rule.scope == "client")

    @property
    def every_admin_key(self) -> tuple[str, ...]:
        """admin_keys and the admin-scope [[proxy.keys]]."""
        return self.admin_keys + tuple(rule.key for rule in self.keys if rule.scope == "admin")

    def upstream_headers(self) -> dict[str, str]:
        """What every LLM call sends upstream besides its body: the upstream's key, never a client's
        own (that one is Flywheel's to check)."""
        headers = {"Content-Type": "application/json"}
        if self.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.upstream_api_key}"
        return headers
