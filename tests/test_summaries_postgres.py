"""Every SQL summary (store/summaries.py, the grader's failed episodes) answers alike on DuckDB and
PostgreSQL: the same records written into a store of each kind, each summary's columns, column
types and rows compared (numbers within 1e-9), also as the live page's one JSON reply."""

import dataclasses
import json
import math
import re
from datetime import datetime, timedelta, timezone

import pytest

from flywheel.proxy.routes.grading import _FAILED
from flywheel.store.db import Store
from flywheel.store.postgres import PostgresStore
from flywheel.store.records import (AdapterRow, CallRecord, EpisodeClose, EpisodeOpen, Feedback, GradeFailed,
                                    InfraError, TrainRun)
from flywheel.store.summaries import (AGENTS, CANDIDATES, DASHBOARD, HELDOUT_BY_VERSION, INFRA_ERRORS_BY_VERSION,
                                      LEARNABILITY, RECENT_EPISODES, TRAIN_BY_VERSION, TRAIN_RUNS)
from tests import postgres_server as server

postgres_server, postgres_url = server.postgres_server, server.postgres_url  # the fixtures

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 3, 1, 9, 30, 15, 250_000, tzinfo=timezone.utc)
SUMMARIES = {"heldout": HELDOUT_BY_VERSION, "train": TRAIN_BY_VERSION, "infra": INFRA_ERRORS_BY_VERSION,
             "learnability": LEARNABILITY, "train_runs": TRAIN_RUNS, "candidates": CANDIDATES, "agents": AGENTS,
             "recent": RECENT_EPISODES, "grade_failed": _FAILED}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def call(call_id: str, episode_id: str, second: float, **changes) -> CallRecord:
    record = CallRecord(
        call_id=call_id, episode_id=episode_id, agent="solver", created_at=at(second), endpoint="chat.completions",
        stream=False, model="base", adapter="base",
        request=json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": f"question {call_id}"}]}),
        response=json.dumps({"choices": [{"message": {"role": "assistant", "content": f"answer {call_id}"}}]}),
        prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5], completion_logprobs=[-0.5, -0.25],
        finish_reason="stop", prompt_tokens=3, completion_tokens=2, latency_ms=10.0 + second, ttft_ms=None,
        status=200, error=None)
    return dataclasses.replace(record, **changes)


def train_run(run_id: str, second: float, served_name: str | None, version: int | None, **changes) -> TrainRun:
    run = TrainRun(run_id=run_id, created_at=at(second), served_name=served_name, agent="solver", version=version,
                   episodes=8, transitions=16, tokens=640, loss=0.123456, reward_mean=0.0625, advantage_mean=0.0,
                   advantage_std=1.0, clip_fraction=0.03125, kl=0.0012345, entropy=1.23456, tokens_per_s=321.5,
                   grad_norm=0.98765, logprob_mismatch_mean=0.01, logprob_mismatch_max=0.1, seconds=2.25,
                   skipped='{"no_tokens": 1}', step_kl=0.000123456, held=None)
    return dataclasses.replace(run, **changes)


def _scenario() -> list:
    """A deployment's history: the base model, then solver-v1, a canary solver-v2 rejected against it, a held
    update; held-out and training episodes (task groups, one flat), graded shadow samples, infra failures,
    a grader failure, tool calls, and a judge agent's calls."""
    ops: list = []
    # held-out episodes: base 1, 0, 0, 0; solver-v1 1, 1, 1, 0 (one eval spelt "yes"); one served by both
    for i, (adapter, reward) in enumerate([("base", 1.0), ("base", 0.0), ("base", 0.0), ("base", 0.0),
                                           ("solver-v1", 1.0), ("solver-v1", 1.0), ("solver-v1", 1.0),
                                           ("solver-v1", 0.0)]):
        episode = f"eval-{i}"
        ops += [EpisodeOpen(episode, at(i), metadata=json.dumps({"eval": "yes" if i == 5 else True})),
                call(f"e{i}", episode, i, adapter=adapter), Feedback(f"fe{i}", episode, reward, at(i + 0.5)),
                EpisodeClose(episode, at(i + 0.6))]
    ops += [EpisodeOpen("eval-mixed", at(9), metadata='{"eval": true}'), call("em0", "eval-mixed", 9),
            call("em1", "eval-mixed", 9.1, adapter="solver-v1"), Feedback("fem", "eval-mixed", 0.5, at(9.2))]
    # training episodes: task t1 attempts with different rewards, task t2's all equal (flat)
    for i, (task, adapter, reward) in enumerate([("t1", "base", 0.2), ("t1", "base", 0.7), ("t1", "solver-v1", 0.9),
                                                 ("t2", "solver-v1", 1.0), ("t2", "solver-v1", 1.0),
                                                 (None, "solver-v2", 0.1)]):
        episode, second = f"train-{i}", 20 + i
        ops += [EpisodeOpen(episode, at(second), task_id=task, metadata='{"eval": false, "user": "u"}'),
                call(f"t{i}", episode, second, adapter=adapter, latency_ms=12.5 + i),
                call(f"t{i}b", episode, second + 0.1, adapter=adapter, prompt_tokens=None),
                Feedback(f"ft{i}", episode, reward, at(second + 0.5), source="user")]
        if i < 5:
            ops.append(EpisodeClose(episode, at(second + 0.6)))
    # a call graded with its shadow samples (one group that teaches), the later grade counting
    ops += [call("t0-s1", "train-0", 20.2, shadow_of="t0", seq=0),
            call("t0-s2", "train-0", 20.3, shadow_of="t0", seq=0, latency_ms=6.5),
            Feedback("g0-old", "train-0", 0.0, at(30), call_id="t0", source="grader", grader_version="g1"),
            Feedback("g0", "train-0", 0.25, at(31), call_id="t0", source="grader", grader_version="g1"),
            Feedback("g1", "train-0", 0.75, at(31), call_id="t0-s1", source="grader", grader_version="g1"),
            Feedback("g2", "train-0", 0.5, at(31), call_id="t0-s2", source="grader", grader_version="g1")]
    # infra failures, a tool call, a legacy completion, the judge agent, an episode without calls
    ops += [EpisodeOpen("infra-0", at(40), task_id="t1"),
            call("i0", "infra-0", 40, adapter="solver-v1", status=502, error="bad gateway",
                 response=None, latency_ms=30000.0),
            Feedback("fi0", "infra-0", 0.0, at(40.5)), InfraError("infra-0", "upstream 502"),
            EpisodeOpen("tools", at(41)),
            call("tool0", "tools", 41, adapter="solver-v1", request='{"input": "use the tool"}', response=json.dumps(
                {"choices": [{"message": {"content": None, "tool_calls": [{"id": "c1", "type": "function"}]}}]})),
            Feedback("ftool", "tools", 1.0, at(41.5)),
            EpisodeOpen("legacy", at(42)),
            call("leg0", "legacy", 42, endpoint="completions", request='{"prompt": "once upon"}',
                 response='{"choices": [{"text": " a time"}]}'),
            call("judge0", "legacy", 42.5, agent="flywheel-judge"), Feedback("fleg", "legacy", 0.5, at(43)),
            EpisodeClose("legacy", at(43)), GradeFailed("legacy", at(44), "judge said nothing"),
            EpisodeOpen("empty", at(45), metadata='{"eval": true}')]
    # the registry: solver-v1 active, solver-v2 a rejected canary with its comparison; a watch only
    canary = {"kind": "canary", "basis": "live", "against": "solver-v1", "looks_done": 1,
              "new": {"episodes": 12, "mean_reward": 0.1357, "interval": [0.0123, 0.2591]},
              "old": {"episodes": 14, "mean_reward": 0.8, "interval": [0.61, 0.99]},
              "difference_interval": [-0.9, -0.4], "outcome": "reject"}
    ops += [AdapterRow("solver-v1", "solver", 1, "/a/1", "base", at(10), "active", live_at=at(10.5),
                       comparison='{"watch": {"new": {"episodes": 3}}}'),
            AdapterRow("solver-v2", "solver", 2, "/a/2", "base", at(25), "rejected", live_at=None,
                       decided_at=at(25 + 3661.6), reason="rejected at look 1 on live episodes",
                       comparison=json.dumps({"canary": canary})),
            AdapterRow("solver-v3", "solver", 3, "/a/3", "base", at(46), "candidate",
                       comparison='{"canary": {"against": "solver-v1", "basis": "eval", "new": {"episodes": 0}}}')]
    ops += [train_run("run-1", 10, "solver-v1", 1), train_run("run-2", 25, "solver-v2", 2, loss=-0.0005),
            train_run("run-3", 46, None, None, step_kl=math.nan, entropy=math.inf, held="step KL nan > max_kl 0.1")]
    return ops


@pytest.fixture
def stores(postgres_url, tmp_path):
    """A DuckDB store and a PostgreSQL one holding the same records."""
    duck = Store(str(tmp_path / "f.duckdb"))
    pg = PostgresStore(postgres_url)
    for each in (duck, pg):
        assert not [r for r in each.apply(_scenario()) if isinstance(r, Exception)]
    yield duck, pg
    duck.close()
    pg.close()


def _same(a, b) -> bool:
    """Values as a reply holds them, alike: numbers within 1e-9 (NaN equal to NaN), lists and objects throughout."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, str) and isinstance(b, str) and a[:1] == "[" and b[:1] == "[":  # JSON text, as each writes it
        return json.loads(a) == json.loads(b)
    return type(a) is type(b) and a == b


_CLOCKS = {"first_call", "published", "started", "failed_at"}  # times as text, in the session's time zone
_CLOCK = re.compile(r"^(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d$")


def _normal(reply: dict, utc: bool) -> list[list]:
    """The rows, times as text kept only where DuckDB reads them in UTC as PostgresStore does
    (its zone is the machine's), else only their form."""
    if utc:
        return reply["rows"]
    clocks = [i for i, c in enumerate(reply["columns"]) if c in _CLOCKS]
    return [[bool(_CLOCK.match(v)) if i in clocks and v is not None else v for i, v in enumerate(row)]
            for row in reply["rows"]]


def _utc(duck: Store) -> bool:
    return duck.query("SELECT current_setting('TimeZone') AS tz", 1, 10)["rows"][0][0] in ("UTC", "Etc/UTC")


@pytest.mark.parametrize("name", SUMMARIES)
def test_each_summary_answers_alike_on_both_stores(stores, name):
    duck, pg = stores
    sql = SUMMARIES[name]
    expected, found = (json.loads(s.query_json(sql, 1000, 10_000_000, 30)) for s in (duck, pg))
    assert found["columns"] == expected["columns"]
    assert found["types"] == expected["types"]
    assert expected["rows"], "the scenario gives every summary rows"
    utc = _utc(duck)
    assert _same(_normal(found, utc), _normal(expected, utc)), (found["rows"], expected["rows"])


def test_the_live_pages_reply_is_alike(stores):
    duck, pg = stores
    expected, found = (json.loads(s.summaries_json(DASHBOARD, 1000, 10_000_000, 30)) for s in (duck, pg))
    assert found.keys() == expected.keys() == DASHBOARD.keys()
    utc = _utc(duck)
    assert _same({k: _normal(v, utc) for k, v in found.items()}, {k: _normal(v, utc) for k, v in expected.items()})


def test_what_the_summaries_say(stores):
    """A few values checked by hand, so that agreeing is not agreeing on nothing."""
    duck, _ = stores
    rows = lambda sql: [dict(zip(r["columns"], row)) for r in [duck.query(sql, 1000, 30)] for row in r["rows"]]  # noqa: E731
    heldout = {r["served_by"]: r for r in rows(HELDOUT_BY_VERSION)}
    assert heldout["base"]["mean_reward"] == 0.25 and heldout["base"]["ci95"] == 0.49
    assert heldout["solver-v1"]["episodes"] == 4 and heldout["base + solver-v1"]["first_call"] == "09:30:24"
    [v2, v3] = rows(CANDIDATES)  # solver-v1's comparison is a watch
    assert (v2["against"], v2["candidate_episodes"], v2["candidate_low"], v2["decided_after_s"]) == \
        ("solver-v1", 12, 0.0123, 3662.0)
    assert v3["candidate_episodes"] == 0 and v3["candidate_mean"] is None and v3["basis"] == "eval"
    held = rows(TRAIN_RUNS)[-1]
    assert held["served_name"] is None and held["step_kl"] == "nan" and held["entropy"] == "inf"
    assert rows(TRAIN_RUNS)[0]["reward_mean"] == 0.063 and rows(TRAIN_RUNS)[1]["loss"] == -0.0005
    learn = {r["agent"]: r for r in rows(LEARNABILITY)}
    assert learn["solver"]["groups"] == 3 and learn["solver"]["flat_group_share"] == 0.333
    [episode] = [r for r in rows(RECENT_EPISODES) if r["episode_id"] == "train-0"]
    assert [(c["agent"], c["shadow"], c["credit"]) for c in episode["calls"]] == \
        [("solver", False, 0.25), ("solver", True, 0.75), ("solver", True, 0.5), ("solver", False, 0.2)]
    assert episode["calls"][0]["prompt"] == "question t0" and episode["calls"][0]["completion"] == "answer t0"
    assert episode["calls"][2]["latency_ms"] == 7  # half away from zero, as DuckDB's round (PostgreSQL's: to even)
    assert rows(_FAILED) == [{"episode_id": "legacy", "task_id": None, "failed_at": "2026-03-01 09:30:59",
                              "grade_error": "judge said nothing"}]
