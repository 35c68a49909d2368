"""What is kept of a call and whether it may be trained on: per key, per agent and per request.

A call's policy is the narrowest of every rule that covers it: its key's `[[proxy.keys]]`
table, each `[[proxy.agents]]` table whose `match` regex takes its whole agent name, and its
own headers, `X-Flywheel-Store: full | metadata | none` and `X-Flywheel-Train: false`. A
request can narrow what configuration allows but never widen it.

    full      the request and response, token ids and logprobs, timings, counts
    metadata  timings, token counts, status, agent and episode; no messages, completions,
              token ids or error text. Not trainable (there are no tokens to train on)
    none      nothing in the store: the call shows in the metrics' counters only

An episode any of whose calls may not be trained on is never pushed to the learner
(`episodes.train`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Sequence

from flywheel.proxy.errors import ApiError
from flywheel.store.records import CONTENT_FIELDS, WITHHELD_ERROR, CallRecord

Store = Literal["full", "metadata", "none"]
_WIDTH = {"none": 0, "metadata": 1, "full": 2}
STORE_HEADER, TRAIN_HEADER = "X-Flywheel-Store", "X-Flywheel-Train"


@dataclass(frozen=True, kw_only=True)
class Rule:
    """What a `[[proxy.keys]]` or `[[proxy.agents]]` table sets for the calls it covers."""

    # what is stored of each call: full, metadata (no content) or none (counters only)
    store: Store = "full"
    # whether its episodes may be trained on
    train: bool = True
    # calls per minute; over it a 429 with Retry-After (0 = no limit)
    rpm: int = 0
    # prompt + completion tokens per minute, counted when each call ends (0 = no limit)
    tpm: int = 0
    # calls in progress at once (0 = no limit)
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def limits(self) -> bool:
        """Whether it sets any limit (so that its calls are counted)."""
        return bool(self.rpm or self.tpm or self.max_concurrent)


@dataclass(frozen=True, kw_only=True)
class KeyRule(Rule):
    """`[[proxy.keys]]`: a key, what it reaches, and its policy and limits."""

    # the key itself, as clients send it (Authorization: Bearer KEY or X-Api-Key)
    key: str
    # client: what agents need (as api_keys); admin: everything (as admin_keys)
    scope: Literal["client", "admin"] = "client"


@dataclass(frozen=True, kw_only=True)
class AgentRule(Rule):
    """`[[proxy.agents]]`: the policy and limits of every agent whose whole name matches a regex;
    each such agent's calls are counted apart from the others'."""

    # a regular expression the whole agent name must match, e.g. "support-.*"
    match: str

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            re.compile(self.match)
        except re.error as bad:
            raise ValueError(f"agents match {self.match!r} is not a regular expression: {bad}") from None

    def covers(self, agent: str) -> bool:
        return re.fullmatch(self.match, agent) is not None


@dataclass(frozen=True)
class CallPolicy:
    store: Store = "full"
    train: bool = True


def narrowest(rules: Sequence[Rule | CallPolicy]) -> CallPolicy:
    """The policy that keeps no more than any of `rules` does: the least store level and
    training only where all allow it. Anything short of `full` cannot be trained on."""
    store: Store = min((r.store for r in rules), key=_WIDTH.__getitem__, default="full")
    return CallPolicy(store, store == "full" and all(r.train for r in rules))


def requested(headers: Mapping[str, str]) -> CallPolicy:
    """The policy a request asks for in its headers (absent: the widest); a 400 for a bad value."""
    store = headers.get(STORE_HEADER, "full").strip().lower()
    if store not in _WIDTH:
        raise ApiError(400, f"{STORE_HEADER} must be full, metadata or none, not {store[:40]!r}", "invalid_policy")
    train = headers.get(TRAIN_HEADER, "true").strip().lower()
    if train not in ("true", "false"):
        raise ApiError(400, f"{TRAIN_HEADER} must be true or false, not {train[:40]!r}", "invalid_policy")
    return CallPolicy(store, train == "true")  # type: ignore[arg-type]


def covering(key_rule: KeyRule | None, agents: Sequence[AgentRule], agent: str) -> list[Rule]:
    """The configured rules that cover a call of `agent` made with the key whose rule is `key_rule`."""
    return ([key_rule] if key_rule is not None else []) + [rule for rule in agents if rule.covers(agent)]


def kept(record: CallRecord, policy: CallPolicy) -> CallRecord:
    """What the store may keep of `record` under `policy` (for `none`, what metrics and spans see)."""
    if policy.store == "full":
        return record if policy.train else replace(record, train=False)
    return replace(record, **dict.fromkeys(CONTENT_FIELDS), error=WITHHELD_ERROR if record.error else None,
                   stored="metadata", train=False)


class RecentIds:
    """The newest `limit` ids added, for a policy to remember across an episode's calls."""

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, episode_id: str) -> None:
        self._ids[episode_id] = None
        self._ids.move_to_end(episode_id)
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def __contains__(self, episode_id: object) -> bool:
        return episode_id in self._ids
