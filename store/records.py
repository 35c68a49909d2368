"""Records the proxy hands to the store. Frozen: once accepted, a record is what lands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class EpisodeOpen:
    """Create an episode if it does not exist yet (first call, or POST /v1/episodes)."""

    episode_id: str
    created_at: datetime
    task_id: str | None = None
    agent: str | None = None
    metadata: str | None = None  # JSON text


@dataclass(frozen=True)
class CallRecord:
    """One forwarded LLM call; `seq` is assigned by the store in arrival order (a shadow sample
    brings its original's)."""

    call_id: str
    episode_id: str
    agent: str | None
    created_at: datetime
    endpoint: str
    stream: bool
    model: str | None
    adapter: str | None
    request: str | None  # JSON text; None when its policy keeps metadata only
    response: str | None  # JSON text
    prompt_token_ids: list[int] | None
    completion_token_ids: list[int] | None
    completion_logprobs: list[float] | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    ttft_ms: float | None
    status: int
    error: str | None
    task_id: str | None = None  # goes to the episode row, not the call row
    # what vLLM sampled with: the request's values, else the proxy's sampling_defaults, else neutral
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    choices: int = 1  # n: only choice 0's tokens are recorded
    shadow_of: str | None = None  # a shadow sample: the call it resamples (proxy/shadow.py)
    seq: int | None = None  # a shadow sample's: its original's
    redactions: str | None = None  # JSON text {detector: matches replaced}; None: none
    stored: str = "full"  # full, or metadata: the content fields above are None (flywheel.proxy.policy)
    train: bool = True  # False: its episode is never trained on (episodes.train, like task_id the episode's)


# what the `metadata` policy and content retention take from a call (NULL), and the error text
# they leave in place of an error's own (which may quote the request)
CONTENT_FIELDS = ("request", "response", "prompt_token_ids", "completion_token_ids", "completion_logprobs")
WITHHELD_ERROR = "(withheld: metadata only)"


@dataclass(frozen=True)
class PassthroughRecord:
    """One call forwarded as it is (embeddings, tokenize, ...): logged, never trained on."""

    call_id: str
    agent: str
    episode_id: str | None
    created_at: datetime
    method: str
    path: str
    status: int
    latency_ms: float
    request_bytes: int
    response_bytes: int
    error: str | None


@dataclass(frozen=True)
class Feedback:
    """An outcome for an episode, or for one of its calls when `call_id` is set."""

    feedback_id: str
    episode_id: str
    reward: float
    created_at: datetime
    call_id: str | None = None
    dims: str | None = None  # JSON text {name: number}
    source: str | None = None
    idempotency_key: str | None = None
    grader_version: str | None = None  # set when a grader, not a client, produced it


@dataclass(frozen=True)
class InfraError:
    """The client says an episode failed for reasons outside the model (a tool down, a crash)."""

    episode_id: str
    reason: str


@dataclass(frozen=True)
class GradeFailed:
    """The grader gave up on an episode: its error stays visible and it is not graded again by itself."""

    episode_id: str
    failed_at: datetime
    error: str


@dataclass(frozen=True)
class Untrainable:
    """A call of this episode went unrecorded under the `none` policy: if the episode is stored,
    it is no longer trainable (nothing else is written)."""

    episode_id: str


@dataclass(frozen=True)
class EpisodeClose:
    episode_id: str
    closed_at: datetime


@dataclass(frozen=True)
class AdapterRow:
    """An adapter version's registry row, written whole on every change of status."""

    served_name: str
    agent: str
    version: int
    path: str
    base_model: str | None
    created_at: datetime
    status: str
    live_at: datetime | None = None
    decided_at: datetime | None = None
    reason: str | None = None
    comparison: str | None = None  # JSON text


@dataclass(frozen=True)
class ServedReward:
    """A rewarded episode, the one model or adapter that served an agent's calls in it, and when it began."""

    adapter: str
    reward: float
    is_eval: bool
    created_at: datetime


@dataclass(frozen=True)
class EpisodeQuarantined:
    """The feed could not send this episode (it failed to convert, or the learner refused it): it
    is kept out of every later push, with the error, and shown by SQL and `flywheel status`."""

    episode_id: str
    error: str
    quarantined_at: datetime


@dataclass(frozen=True)
class EpisodesPushed:
    """The learner acknowledged these episodes: they are durable there and not sent again."""

    episode_ids: tuple[str, ...]
    pushed_at: datetime


@dataclass(frozen=True)
class TrainRun:
    """One learner update, as published or held: a row of `train_runs` (columns in store/schema.py)."""

    run_id: str
    created_at: datetime
    served_name: str | None  # None: held by a guard
    agent: str
    version: int | None
    episodes: int
    transitions: int
    tokens: int
    loss: float
    reward_mean: float
    advantage_mean: float
    advantage_std: float
    clip_fraction: float
    kl: float
    entropy: float
    tokens_per_s: float
    grad_norm: float
    logprob_mismatch_mean: float
    logprob_mismatch_max: float
    seconds: float
    skipped: str  # JSON {reason: count}
    step_kl: float
    held: str | None  # the guards it crossed; None: published


@dataclass(frozen=True)
class FeedbackResult:
    feedback_id: str
    duplicate: bool  # the idempotency key was seen before; nothing new was applied
    episode_reward: float | None


@dataclass(frozen=True)
class AuditEntry:
    """An admin action, as `audit_log` keeps it: who, when, what, how many rows; never content."""

    logged_at: datetime
    key_id: str | None  # the caller's key: the first 12 hex digits of its SHA-256 (None: no keys configured)
    action: str
    target: str | None = None
    row_count: int | None = None
    detail: str | None = None  # JSON text: the action's parameters

    @classmethod
    def now(cls, key_id: str | None, action: str, target: str | None = None, row_count: int | None = None,
            detail: dict | None = None) -> AuditEntry:
        """The row for an action taken now by the holder of `key_id` (None: the proxy itself, or no
        keys configured)."""
        return cls(datetime.now(timezone.utc), key_id, action, target, row_count,
                   json.dumps(detail) if detail is not None else None)


@dataclass(frozen=True)
class Erase:
    """Remove these episodes, their calls, feedback and pass-through rows; `audit` is written in
    the same transaction, with the number of rows removed."""

    episode_ids: tuple[str, ...]
    audit: AuditEntry


@dataclass(frozen=True)
class StripContent:
    """Content retention: the calls of these episodes made before `before` keep their metadata and
    lose their content (as if stored under the `metadata` policy); the episodes are no longer
    trainable. `audit` is written with the number of calls stripped."""

    episode_ids: tuple[str, ...]
    before: datetime
    audit: AuditEntry


@dataclass(frozen=True)
class QuotaUsage:
    """A proxy's counts since its last report, (subject, second, calls, tokens) each, and its calls
    in progress now, (subject, calls); counts older than `since` and reports older than
    `reported_after` are dropped. Its result: the other proxies' (calls, tokens, in progress)
    by subject."""

    proxy: str
    counts: tuple[tuple[str, datetime, int, int], ...]
    in_progress: tuple[tuple[str, int], ...]
    at: datetime
    since: datetime
    reported_after: datetime


@dataclass(frozen=True)
class Erased:
    episodes: int  # the episodes asked for (and found)
    calls: int  # theirs, and those of the judge's episodes that quoted them
    feedback: int
    passthrough: int
    judge_episodes: int  # the LLM judge's episodes whose prompts quoted them

    @property
    def rows(self) -> int:
        return self.episodes + self.calls + self.feedback + self.passthrough + self.judge_episodes


class UnknownEpisode(LookupError):
    pass


class UnknownCall(LookupError):
    pass


class StoreUnavailable(RuntimeError):
    """The store cannot write now (out of memory, disk full, file unwritable). The first
    `len(committed)` ops of the batch were committed (their results); the rest were not, and
    are retried."""

    def __init__(self, message: str, committed: list | None = None):
        super().__init__(message)
        self.committed = committed or []


def approx_bytes(op: object) -> int:
    """What a queued record holds in memory, roughly: its text and its numbers (8 bytes each)."""
    size = 200
    for value in vars(op).values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, (list, tuple)):
            size += 8 * len(value)
    return size


StoreOp = (EpisodeOpen | CallRecord | Feedback | EpisodeClose | AdapterRow | EpisodesPushed | EpisodeQuarantined
           | TrainRun | PassthroughRecord | GradeFailed | InfraError | AuditEntry | Erase | StripContent | QuotaUsage
           | Untrainable)
