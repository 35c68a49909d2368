"""Sampling parameters: checked at the proxy, made explicit upstream, recorded as sampled, handled by the learner."""

import json

import aiohttp
import openai
import pytest

from flywheel.learner.credit import CreditConfig, agent_filter, assign
from flywheel.protos import flywheel_pb2 as pb
from flywheel.proxy.errors import ApiError
from flywheel.proxy.sampling import checked_defaults, resolve
from flywheel.store.proto_map import episode_proto
from flywheel.vllm_server import VllmSettings, command, sampling_defaults

MESSAGES = [{"role": "user", "content": "hello there"}]


def test_omitted_fields_take_the_defaults_and_are_written_into_the_forwarded_body():
    body = {"temperature": 0.5, "n": 2}
    sampled = resolve(body, {"temperature": 0.9, "top_p": 0.95})
    assert body == {"temperature": 0.5, "n": 2, "top_p": 0.95}  # the client's value wins, the default is explicit
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.choices) == (0.5, 0.95, -1, 2)
    neutral = resolve({"temperature": None}, {})
    assert (neutral.temperature, neutral.repetition_penalty, neutral.min_p) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("body, message", [
    ({"temperature": "hot"}, "'temperature' must be a finite number, got 'hot'"),
    ({"temperature": -0.1}, "'temperature' must be in [0, inf]"),
    ({"top_p": 0}, "'top_p' must be in (0, 1]"),
    ({"top_k": 2.5}, "'top_k' must be an integer in [-1, 2147483647]"),
    ({"n": 0}, "'n' must be an integer in [1, 2147483647]"),
    ({"n": True}, "'n' must be an integer"),
    ({"max_tokens": "16"}, "'max_tokens' must be an integer in [1, 2147483647]"),
    ({"n": 2**40}, "'n' must be an integer in [1, 2147483647]"),
    ({"stream": "false"}, "'stream' must be true or false"),
    ({"presence_penalty": 3}, "'presence_penalty' must be in [-2, 2]"),
])
def test_bad_values_are_refused_with_what_is_allowed(body, message):
    with pytest.raises(ApiError) as refused:
        resolve(body, {})
    assert refused.value.status == 400 and message in refused.value.message


def test_configured_defaults_are_checked_and_top_k_is_whole():
    assert checked_defaults({"temperature": 0.7, "top_k": 20.0}) == {"temperature": 0.7, "top_k": 20}
    with pytest.raises(ValueError, match="unknown field"):
        checked_defaults({"temprature": 0.7})
    with pytest.raises(ValueError, match="top_p"):
        checked_defaults({"top_p": 1.5})


async def test_a_bad_sampling_value_is_a_400_that_reaches_neither_upstream_nor_store(proxy, upstream):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/chat/completions",
                                json={"model": "m", "messages": MESSAGES, "temperature": "hot"}) as response:
            body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "invalid_field"
    assert "temperature" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert upstream.received == [] and await proxy.rows("SELECT * FROM calls") == []


async def test_what_is_recorded_and_pushed_is_what_was_sampled(start_proxy, upstream):
    proxy = await start_proxy(sampling_defaults={"temperature": 0.6, "top_k": 40})
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/episodes/ep-s/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=MESSAGES)
    await client.chat.completions.create(model="m", messages=MESSAGES, temperature=0.0, top_p=0.5, n=2)
    first, second = upstream.received
    assert (first["temperature"], first["top_k"]) == (0.6, 40)  # vLLM is told, not left to guess
    assert (second["temperature"], second["top_p"], second["top_k"]) == (0.0, 0.5, 40)
    rows = await proxy.rows("SELECT temperature, top_p, top_k, choices, request FROM calls ORDER BY seq")
    assert [(r["temperature"], r["top_p"], r["top_k"], r["choices"]) for r in rows] == [(0.6, 1.0, 40, 1),
                                                                                       (0.0, 0.5, 40, 2)]
    assert "temperature" not in rows[0]["request"]  # the request column stays as the client sent it
    async with aiohttp.ClientSession() as session:
        await session.post(f"{proxy.url}/v1/episodes/ep-s/feedback", json={"reward": 1})
    writer = proxy.state.writer
    [row] = await writer.read(writer.store.episodes_to_push, 10, 0.0)
    calls = episode_proto(row).calls
    assert [(c.temperature, c.top_k, c.choices) for c in calls] == [(pytest.approx(0.6), 40, 1), (0.0, 40, 2)]


def _call(**sampling):
    return pb.Call(call_id="c", agent="a", status=200, prompt_token_ids=[1], completion_token_ids=[2],
                   completion_logprobs=[-0.1], finish_reason="stop", choices=1,
                   **{"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, **sampling})


@pytest.mark.parametrize("sampling, reason", [
    ({"temperature": 0.0}, "greedy"),
    ({"top_p": 0.9}, "unsupported_sampling"),
    ({"top_k": 40}, "unsupported_sampling"),
    ({"repetition_penalty": 1.1}, "unsupported_sampling"),
    ({"temperature": 0.7, "top_k": 0}, None),  # top_k 0 is off, as -1
])
def test_the_learner_skips_calls_it_cannot_weigh_and_says_why(sampling, reason):
    episode = pb.Episode(episode_id="e", calls=[_call(**sampling)], rewards=[pb.Reward(reward=1.0)])
    transitions, skipped = assign(episode, CreditConfig(), agent_filter(".*"))
    assert (dict(skipped) == {reason: 1}) if reason else (len(transitions) == 1 and not skipped)


def test_flywheel_up_hides_no_defaults_in_vllm_and_hands_the_models_to_the_proxy(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": 2}))
    assert sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20.0}
    assert sampling_defaults(str(tmp_path / "missing")) == {}
    argv = command(VllmSettings(model=str(tmp_path), served_name="m"))
    assert argv[argv.index("--generation-config") + 1] == "vllm"
