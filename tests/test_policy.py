"""Data policies: what the store keeps of a call (full, metadata, none) and what may be trained
on, per request header, per key and per agent; a request narrows, never widens."""

import secrets
from pathlib import Path

import openai
import pytest

from flywheel.learner.config import LearnerConfig
from flywheel.proxy.config import ProxyConfig
from flywheel.proxy.errors import ApiError
from flywheel.proxy.policy import AgentRule, CallPolicy, KeyRule, covering, narrowest, requested
from flywheel.settings import ConfigError, load_config
from tests.conftest import eventually, free_port, wait_buffered
from tests.test_feedback import api

KEY = "policy-key-0123456789"


def marker() -> str:
    return f"MARKER{secrets.token_hex(8)}"


def bytes_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


async def call(proxy, text: str, episode: str, agent: str = "solver", key: str = "x", **headers):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key=key, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", max_tokens=3, messages=[{"role": "user", "content": text}],
        extra_headers={"X-Flywheel-Episode": episode, **headers})
    return raw.headers


def test_the_narrowest_rule_wins_and_only_full_is_trainable():
    assert narrowest([]) == CallPolicy("full", True)
    assert narrowest([KeyRule(key=KEY, store="metadata"), CallPolicy("full", True)]) == CallPolicy("metadata", False)
    assert narrowest([AgentRule(match=".*", train=False), CallPolicy("full", True)]) == CallPolicy("full", False)
    assert narrowest([CallPolicy("none", True), KeyRule(key=KEY, store="metadata")]) == CallPolicy("none", False)
    rules = [AgentRule(match="support-.*", store="none"), AgentRule(match="support", rpm=5)]
    assert covering(None, rules, "support-7") == [rules[0]]
    assert covering(KeyRule(key=KEY), rules, "support") == [KeyRule(key=KEY), rules[1]]
    assert covering(None, rules, "a-support-7") == []  # the whole name must match


def test_policy_headers_are_checked():
    assert requested({}) == CallPolicy("full", True)
    assert requested({"X-Flywheel-Store": "Metadata", "X-Flywheel-Train": "false"}) == CallPolicy("metadata", False)
    assert requested({"X-Flywheel-Store": "none"}) == CallPolicy("none", True)  # narrowest() makes it untrainable
    for headers in ({"X-Flywheel-Store": "some"}, {"X-Flywheel-Train": "no"}):
        with pytest.raises(ApiError) as refused:
            requested(headers)
        assert refused.value.status == 400


def test_keys_and_agents_load_as_arrays_of_tables(tmp_path):
    path = tmp_path / "flywheel.toml"
    path.write_text(f'[proxy]\n[[proxy.keys]]\nkey = "{KEY}"\nstore = "metadata"\nrpm = 60\n'
                    '[[proxy.agents]]\nmatch = "support-.*"\ntrain = false\n')
    config = load_config(ProxyConfig, "proxy", str(path), {})
    assert config.keys == (KeyRule(key=KEY, store="metadata", rpm=60),)
    assert config.agents == (AgentRule(match="support-.*", train=False),)
    assert config.client_keys == (KEY,) and config.every_admin_key == ()
    for bad, message in (('[[proxy.agents]]\nmatch = "("', "not a regular expression"),
                         ('[[proxy.agents]]\nmatch = "a"\nstore = "some"', "must be one of"),
                         ('[[proxy.keys]]\nstore = "none"', "key"),
                         ('[[proxy.keys]]\nkey = "k"\nrpm = -1', "rpm must be >= 0")):
        path.write_text(f"[proxy]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(ProxyConfig, "proxy", str(path), {})


async def test_store_none_leaves_no_trace_of_the_prompt_in_the_store_or_the_learner(
        start_proxy, start_learner, tmp_path):
    address, state = f"127.0.0.1:{free_port()}", tmp_path / "state"
    server = await start_learner(LearnerConfig(listen=address, state_dir=str(state)), "unused")
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05)
    hidden, kept = marker(), marker()  # in the prompt and as the task id (what of an episode the learner gets)
    headers = await call(proxy, f"say {hidden}", "ep-none", **{"X-Flywheel-Store": "none", "X-Flywheel-Task": hidden})
    assert headers["X-Flywheel-Store"] == "none" and headers["X-Flywheel-Train"] == "false"
    await call(proxy, f"say {kept}", "ep-full", **{"X-Flywheel-Task": kept})
    for episode in ("ep-none", "ep-full"):
        await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1.0})
        await api(proxy, "POST", f"/v1/episodes/{episode}/close")
    await wait_buffered(server, 1)
    assert [r["episode_id"] for r in await proxy.rows("SELECT episode_id FROM calls")] == ["ep-full"]
    assert await proxy.rows("SELECT * FROM episodes WHERE episode_id = 'ep-none'") == []
    await proxy.stop()  # the store closes: its WAL checkpointed into the file
    found = bytes_under(tmp_path)  # the store's file and the learner's state directory
    assert kept.encode() in found and kept.encode() in bytes_under(state)  # the scan finds what was kept...
    assert hidden.encode() not in found  # ...and not what was not


async def test_store_metadata_keeps_counts_and_timings_and_no_content(start_proxy, db_path):
    proxy = await start_proxy()
    hidden = marker()
    await call(proxy, f"say {hidden} {hidden}", "ep-meta", **{"X-Flywheel-Store": "metadata"})
    [row] = await proxy.rows("SELECT * FROM calls")
    assert row["stored"] == "metadata" and row["status"] == 200 and row["agent"] == "solver"
    assert row["episode_id"] == "ep-meta" and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["latency_ms"] > 0
    assert all(row[c] is None for c in ("request", "response", "prompt_token_ids", "completion_token_ids",
                                        "completion_logprobs", "error"))
    assert (await proxy.rows("SELECT train FROM episodes"))[0]["train"] is False
    await proxy.stop()
    assert hidden.encode() not in bytes_under(Path(db_path).parent)


async def test_a_keys_policy_holds_whatever_the_request_asks_and_an_agents_narrows_it(start_proxy):
    proxy = await start_proxy(keys=(KeyRule(key=KEY, store="metadata"),),
                              agents=(AgentRule(match="secret-.*", store="none"),))
    await call(proxy, "hello", "ep-key", key=KEY, **{"X-Flywheel-Store": "full"})  # cannot widen the key's
    await call(proxy, "hello", "ep-secret", agent="secret-1", key=KEY)
    rows = await proxy.rows("SELECT episode_id, stored, request FROM calls")
    assert rows == [{"episode_id": "ep-key", "stored": "metadata", "request": None}]
    status, _ = await api(proxy, "POST", "/v1/chat/completions", {"model": "m", "messages": []}, key="wrong-key-0123456789")
    assert status == 401  # a [[proxy.keys]] key is a key: the proxy is keyed now


async def test_episodes_that_may_not_be_trained_on_never_reach_the_learner(start_proxy, start_learner, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    server = await start_learner(LearnerConfig(listen=address, state_dir=str(state)), "unused")
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05,
                              agents=(AgentRule(match="private", train=False),))
    hidden, trained = marker(), marker()  # as task ids: what of an episode's text reaches the learner
    await call(proxy, "a", "ep-train", **{"X-Flywheel-Task": trained})
    await call(proxy, "b", "ep-header", **{"X-Flywheel-Task": hidden})
    await call(proxy, "c", "ep-header", **{"X-Flywheel-Train": "false"})  # one call is enough
    await call(proxy, "d", "ep-agent", agent="private", **{"X-Flywheel-Task": hidden})
    for episode in ("ep-train", "ep-header", "ep-agent"):
        await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1.0})
        await api(proxy, "POST", f"/v1/episodes/{episode}/close")
    await wait_buffered(server, 1)

    async def pushed() -> bool:
        return (await proxy.rows("SELECT count(*) AS n FROM episodes WHERE pushed_at IS NOT NULL"))[0]["n"] == 1

    await eventually(pushed, 10, "the trainable episode acknowledged")
    rows = await proxy.rows("SELECT episode_id, train, pushed_at IS NOT NULL AS pushed FROM episodes ORDER BY 1")
    assert rows == [{"episode_id": "ep-agent", "train": False, "pushed": False},
                    {"episode_id": "ep-header", "train": False, "pushed": False},
                    {"episode_id": "ep-train", "train": True, "pushed": True}]
    assert sorted(server.learner.buffer.pending) == ["ep-train"]
    assert trained.encode() in bytes_under(state) and hidden.encode() not in bytes_under(state)


async def test_an_episode_with_a_call_under_none_is_not_trained_on_whatever_the_order(start_proxy):
    proxy = await start_proxy()
    await call(proxy, "a", "ep-none-first", **{"X-Flywheel-Store": "none"})
    await call(proxy, "b", "ep-none-first")  # stored, but its episode had a call nobody may keep
    await call(proxy, "c", "ep-none-last")
    await call(proxy, "d", "ep-none-last", **{"X-Flywheel-Store": "none"})
    await call(proxy, "e", "ep-plain")
    rows = await proxy.rows("SELECT episode_id, train FROM episodes ORDER BY episode_id")
    assert rows == [{"episode_id": "ep-none-first", "train": False}, {"episode_id": "ep-none-last", "train": False},
                    {"episode_id": "ep-plain", "train": True}]
    assert len(await proxy.rows("SELECT * FROM calls")) == 3
