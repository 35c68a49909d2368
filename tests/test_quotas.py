"""Limits per key and per agent (rpm, tpm, max_concurrent) and Flywheel's reported overhead."""

import asyncio

import aiohttp
import openai
import pytest

from flywheel.proxy.policy import AgentRule, KeyRule
from flywheel.proxy.quotas import OverLimit, Quotas, limited

KEY = "quota-key-0123456789"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rpm_refuses_until_the_oldest_call_leaves_the_window():
    clock, rule = Clock(), AgentRule(match=".*", rpm=2)
    quotas = Quotas(clock)
    for _ in range(2):
        quotas.release(quotas.admit([(rule, "a")]), 0)
        clock.now += 10
    with pytest.raises(OverLimit) as over:
        quotas.admit([(rule, "a")])
    assert over.value.status == 429 and over.value.limit == "rpm" and over.value.headers == {"Retry-After": "40"}
    quotas.admit([(rule, "b")])  # another agent under the same rule has its own count
    clock.now += 40
    quotas.admit([(rule, "a")])


def test_tpm_counts_tokens_when_calls_end_and_max_concurrent_calls_in_progress():
    clock = Clock()
    quotas = Quotas(clock)
    tokens, concurrent = AgentRule(match=".*", tpm=100), KeyRule(key=KEY, max_concurrent=1)
    quotas.release(quotas.admit([(tokens, "a")]), 60)
    clock.now += 5
    quotas.release(quotas.admit([(tokens, "a")]), 60)  # admitted at 60 < 100; now at 120
    with pytest.raises(OverLimit, match="tpm limit of 100") as over:
        quotas.admit([(tokens, "a")])
    assert over.value.headers == {"Retry-After": "55"}  # when the first 60 leave, 60 < 100
    held = quotas.admit([(concurrent, "k")])
    with pytest.raises(OverLimit, match="max_concurrent"):
        quotas.admit([(tokens, "b"), (concurrent, "k")])
    quotas.admit([(tokens, "b")])  # the refusal above counted nothing against "b"...
    quotas.release(held, 0)
    quotas.admit([(concurrent, "k")])  # ...and a released call frees its slot


def test_only_rules_with_a_limit_count_keys_by_key_and_agents_by_name():
    key_rule, agent_rule, policy_only = KeyRule(key=KEY, rpm=1), AgentRule(match="a.*", tpm=5), AgentRule(match="a.*")
    assert limited([key_rule, agent_rule, policy_only], "0123abcd", "a1") == [
        (key_rule, "key 0123abcd"), (agent_rule, "agent 'a1'")]


async def test_a_burst_over_rpm_gets_429s_with_retry_after_and_service_recovers(start_proxy):
    proxy = await start_proxy(agents=(AgentRule(match="noisy", rpm=3),))
    clock = Clock()
    proxy.state.quotas.clock = clock
    noisy = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/noisy/v1", api_key="x", max_retries=0)
    quiet = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/quiet/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    outcomes = await asyncio.gather(*(noisy.chat.completions.with_raw_response.create(model="m", messages=messages)
                                      for _ in range(5)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(refused) == 2 and sum(not isinstance(o, Exception) for o in outcomes) == 3
    assert refused[0].response.headers["Retry-After"] == "60"
    assert refused[0].body["code"] == "rate_limit_exceeded" and "rpm limit of 3" in refused[0].body["message"]
    await quiet.chat.completions.create(model="m", messages=messages)  # the others are served meanwhile
    clock.now += 60
    await noisy.chat.completions.create(model="m", messages=messages)
    assert len(await proxy.rows("SELECT * FROM calls WHERE agent = 'noisy'")) == 4  # refusals are not calls
    _, text = await api_text(proxy, "/metrics")
    assert 'flywheel_over_limit_total{agent="noisy",limit="rpm"} 2.0' in text


async def api_text(proxy, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + path) as response:
            return response.status, await response.text()


@pytest.mark.parametrize("stream", [False, True])
async def test_every_call_reports_its_overhead_in_a_header_and_a_histogram(proxy, stream):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi there"}], stream=stream)
    if stream:
        [chunk async for chunk in raw.parse()]
    overhead_ms = float(raw.headers["X-Flywheel-Overhead-Ms"])
    [row] = await proxy.rows("SELECT latency_ms FROM calls")
    assert 0 < overhead_ms < row["latency_ms"]
    _, text = await api_text(proxy, "/metrics")
    assert 'flywheel_overhead_seconds_count{agent="default"} 1.0' in text


async def test_held_out_evaluation_calls_count_against_no_limit(start_proxy):
    proxy = await start_proxy(agents=(AgentRule(match=".*", rpm=1),))
    proxy.state.quotas.clock = Clock()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/episodes", json={"metadata": {"eval": True}}) as response:
            held_out = (await response.json())["episode_id"]
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(3):
        await client.chat.completions.create(model="m", messages=messages, extra_headers={"X-Flywheel-Episode": held_out})
    await client.chat.completions.create(model="m", messages=messages)  # the client's one call this minute
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="m", messages=messages)
