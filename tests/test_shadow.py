"""Shadow samples (fake upstream): one-off calls resampled off the client's path, on their exact
prompt tokens and adapter version, within the budget; graded with the original as one group;
pushed to the learner, whose comparison groups score each against the others."""

import asyncio

import openai
import pytest

from flywheel.learner.advantages import AdvantageConfig, compute_advantages
from flywheel.learner.credit import CreditConfig, agent_filter, assign
from flywheel.store.proto_map import episode_proto
from flywheel.store.summaries import LEARNABILITY
from tests.conftest import eventually
from tests.fake_upstream import LORA_CALLS, PRIORITY_SCHEDULING
from tests.test_adapters import adapter_dir
from tests.test_feedback import api
from tests.test_grader import _grader

SHADOWS = "SELECT * FROM calls WHERE shadow_of IS NOT NULL ORDER BY call_id"


async def _call(proxy, episode: str, agent: str = "solver", max_tokens: int = 5, **extra) -> str:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="x", max_retries=0)
    reply = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": f"q {episode}"}], max_tokens=max_tokens,
        temperature=0.8, extra_headers={"X-Flywheel-Episode": episode}, **extra)
    return reply.headers["X-Flywheel-Call"]


async def _episode(proxy, body: dict | None = None) -> str:
    return (await api(proxy, "POST", "/v1/episodes", body or {}))[1]["episode_id"]


async def _rows(proxy, sql: str, count: int) -> list[dict]:
    async def enough() -> bool:
        await proxy.state.writer.flush()
        return len(await proxy.rows(sql)) >= count

    await eventually(enough, 10, f"{count} rows of {sql}")
    return await proxy.rows(sql)


def _shadowing(service, **overrides):
    return _grader(service, **{"shadow_samples": 3, "shadow_budget": 100.0, "poll_s": 3600, **overrides})


async def test_a_one_off_call_gets_k_shadows_on_its_exact_prompt_graded_as_one_group(start_proxy, upstream, service):
    proxy = await start_proxy(grader=_shadowing(service))
    episode = await _episode(proxy)
    original = await _call(proxy, episode, seed=7, stop=["\n"])
    shadows = await _rows(proxy, SHADOWS, 3)
    [call] = await proxy.rows(f"SELECT * FROM calls WHERE call_id = '{original}'")
    [sent] = [body for body in upstream.received if body.get("n") == 3]
    assert sent["prompt"] == call["prompt_token_ids"] and sent["model"] == "m"  # the tokens, the model it served
    assert (sent["temperature"], sent["max_tokens"], sent["stop"], sent["priority"]) == (0.8, 5, ["\n"], 10)
    assert "seed" not in sent  # one seed would make K copies of one sample
    for shadow in shadows:
        assert (shadow["shadow_of"], shadow["episode_id"], shadow["seq"], shadow["agent"]) == (original, episode, 0,
                                                                                                  "solver")
        assert shadow["request"] == call["request"] and shadow["temperature"] == 0.8
        assert len(shadow["completion_token_ids"]) == len(shadow["completion_logprobs"]) > 0
    assert {len(s["completion_token_ids"]) for s in shadows} == {5, 4, 3}  # the three choices, each its own row

    await api(proxy, "POST", f"/v1/episodes/{episode}/close")
    await proxy.state.writer.flush()
    assert await proxy.state.grader.grade_due("1") == 1
    episode_request, group_request = service.requests
    assert [i["target_call"] for i in episode_request["items"]] == [None]
    assert [len(i["calls"]) for i in episode_request["items"]] == [1]  # shadows are not part of the episode
    targets = [i["target_call"] for i in group_request["items"]]
    assert targets[0] == original and sorted(targets[1:]) == [s["call_id"] for s in shadows]
    responses = {row["call_id"]: row["response"] for row in [call, *shadows]}
    for item in group_request["items"]:
        [called] = item["calls"]  # the episode up to the call compared: here, only it
        assert called["completion"]["content"] == responses[item["target_call"]]["choices"][0]["message"]["content"]
    [learnable] = await proxy.rows(LEARNABILITY)  # the call and its shadows: one group, and it teaches
    assert (learnable["groups"], learnable["flat_group_share"], learnable["warning"]) == (1, 0.0, None)
    grades = await proxy.rows("SELECT call_id, reward FROM feedback WHERE call_id IS NOT NULL")
    assert {g["call_id"]: g["reward"] for g in grades} == pytest.approx(
        {original: 1.5, **{s["call_id"]: len(s["completion_token_ids"]) * 0.3 for s in shadows}})

    [row] = proxy.state.writer.store.episodes_to_push(10, 0.0, ("endpoint:rules", "1", False))
    message = episode_proto(row)
    assert sorted(c.shadow_of for c in message.calls) == ["", original, original, original]
    transitions, skipped = assign(message, CreditConfig(), agent_filter("solver"))
    assert not skipped and {t.comparison for t in transitions} == {original}
    scored, stats = compute_advantages(transitions, AdvantageConfig(), {})
    assert stats.groups == 1 and len(scored) == 4
    best = max(scored, key=lambda s: s.advantage)
    assert best.transition.completion_ids == tuple(call["completion_token_ids"])  # the longest: the best graded


async def test_task_episodes_eval_episodes_greedy_forced_tools_and_other_agents_are_not_resampled(start_proxy, upstream, service):
    proxy = await start_proxy(grader=_shadowing(service, shadow_agents="solver"))
    await _call(proxy, await _episode(proxy, {"task": "t1"}))  # its task's attempts group it
    await _call(proxy, await _episode(proxy, {"metadata": {"eval": True}}))  # held out
    await _call(proxy, await _episode(proxy), agent="helper")  # not an agent being resampled
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], temperature=0)
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], tools=[tool],
                                         tool_choice={"type": "function", "function": {"name": "add"}})
    sampled = await _call(proxy, await _episode(proxy))
    await _rows(proxy, SHADOWS, 3)
    assert {r["shadow_of"] for r in await proxy.rows(SHADOWS)} == {sampled}
    counts = {"skipped_task": 1, "skipped_eval": 1, "skipped_forced_tool": 1, "sampled": 1}
    assert proxy.state.shadows.counts == counts
    status, grader = await api(proxy, "GET", "/v1/grader")
    assert status == 200 and grader["shadows"] == {"samples": 3, "queued": 0, "in_flight": 0, "priority": 10,
                                                   **counts}


async def test_shadows_wait_for_quiet_and_keep_the_adapter_version_that_served_loaded(start_proxy, upstream,
                                                                                      service, tmp_path):
    proxy = await start_proxy(grader=_shadowing(service, shadow_busy=1))
    await api(proxy, "POST", "/v1/adapters", {"agent": "solver", "path": adapter_dir(tmp_path, "v1")})
    episode = await _episode(proxy)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    slow = asyncio.create_task(_drain(client))  # a client call in flight: shadows wait
    await eventually(lambda: _in_flight(proxy), 5, "the slow call upstream")
    original = await _call(proxy, episode)
    await proxy.state.writer.flush()
    await asyncio.sleep(0.2)
    assert not any(body.get("n") == 3 for body in upstream.received)  # held back behind the client's call
    for n in (2, 3):  # v1 retires: still loaded, its shadows are to come
        await api(proxy, "POST", "/v1/adapters", {"agent": "solver", "path": adapter_dir(tmp_path, f"v{n}")})
    assert ("unload", "solver-v1") not in upstream.app[LORA_CALLS]
    assert proxy.state.grader.busy() == [episode]  # nor graded nor pushed before its shadows are in
    await slow
    shadows = await _rows(proxy, SHADOWS, 3)
    assert {s["adapter"] for s in shadows} == {"solver-v1"} and {s["shadow_of"] for s in shadows} == {original}
    await eventually(lambda: _unloaded(upstream, "solver-v1"), 5, "solver-v1 unloaded after its shadows")
    assert proxy.state.grader.busy() == []


async def _drain(client) -> None:
    """A slow streamed call (of a task's episode: not resampled itself)."""
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "slow"}], max_tokens=40, stream=True,
        extra_body={"fake_chunk_delay_ms": 25}, extra_headers={"X-Flywheel-Task": "busy"})
    async for _ in stream:
        pass


async def _in_flight(proxy) -> bool:
    return proxy.state.upstream.in_progress > 0


async def _unloaded(upstream, name: str) -> bool:
    return ("unload", name) in upstream.app[LORA_CALLS]


async def test_calls_waiting_too_long_are_dropped_and_counted_and_their_episode_is_graded(start_proxy, upstream,
                                                                                         service):
    proxy = await start_proxy(grader=_shadowing(service, shadow_busy=1, shadow_max_wait_s=0.2))
    episode = await _episode(proxy)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    slow = asyncio.create_task(_drain(client))
    await eventually(lambda: _in_flight(proxy), 5, "the slow call upstream")
    await _call(proxy, episode)
    await eventually(lambda: _counted(proxy, "dropped_waited"), 5, "the call dropped")
    await slow
    await api(proxy, "POST", f"/v1/episodes/{episode}/close")
    await proxy.state.writer.flush()
    assert await proxy.state.grader.grade_due("1") == 1
    assert await proxy.rows(SHADOWS) == []


async def _counted(proxy, outcome: str) -> bool:
    return proxy.state.shadows.counts[outcome] > 0


async def test_an_upstream_without_priority_scheduling_gets_shadow_requests_without_one(start_proxy, upstream,
                                                                                       service):
    upstream.app[PRIORITY_SCHEDULING][0] = False
    proxy = await start_proxy(grader=_shadowing(service))
    for _ in range(2):
        await _call(proxy, await _episode(proxy))
    await _rows(proxy, SHADOWS, 6)
    assert [body.get("priority") for body in upstream.received if body.get("n") == 3] == [10, None, None]
    assert proxy.state.shadows.priority == 0


async def test_shadow_samples_need_a_grader(start_proxy):
    from flywheel.proxy.app import build_app
    from flywheel.proxy.config import ProxyConfig
    from flywheel.proxy.grader import GraderConfig

    with pytest.raises(ValueError, match="needs a grader"):
        build_app(ProxyConfig(), GraderConfig(shadow_samples=3))


async def test_the_newest_calls_go_first_and_a_full_queue_drops_the_oldest(start_proxy, upstream, service):
    proxy = await start_proxy(grader=_shadowing(service, shadow_busy=1, shadow_queue=2, shadow_budget=1000.0))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    slow = asyncio.create_task(_drain(client))
    await eventually(lambda: _in_flight(proxy), 5, "the slow call upstream")
    # the first waits in the sampler for a quiet upstream; of the three queued behind it, the oldest is dropped
    first, oldest, older, newest = [await _call(proxy, await _episode(proxy)) for _ in range(4)]
    assert proxy.state.shadows.counts == {"dropped_queue_full": 1}
    await slow
    shadows = await _rows(proxy, "SELECT shadow_of FROM calls WHERE shadow_of IS NOT NULL ORDER BY created_at", 9)
    assert [s["shadow_of"] for s in shadows[::3]] == [first, newest, older]


@pytest.mark.parametrize("setting, value", [("shadow_queue", 0), ("shadow_busy", 0), ("shadow_max_wait_s", 0),
                                            ("shadow_budget", 0), ("shadow_max_tokens", 0), ("shadow_agents", "(")])
def test_shadow_settings_that_cannot_work_are_refused_at_start(setting, value):
    from flywheel.proxy.app import build_app
    from flywheel.proxy.config import ProxyConfig
    from flywheel.proxy.grader import GraderConfig

    with pytest.raises(ValueError, match=setting):
        build_app(ProxyConfig(), GraderConfig(kind="endpoint", url="http://x", shadow_samples=3, **{setting: value}))
    build_app(ProxyConfig(), GraderConfig(**{setting: value}))  # off: nothing to check


async def test_a_store_error_preparing_one_call_does_not_stop_the_sampler(start_proxy, upstream, service,
                                                                          monkeypatch):
    proxy = await start_proxy(grader=_shadowing(service))
    store, calls = proxy.state.writer.store, []
    original = store.shadow_origin

    def flaky(call_id):
        calls.append(call_id)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return original(call_id)

    monkeypatch.setattr(store, "shadow_origin", flaky)
    first = await _call(proxy, await _episode(proxy))
    await eventually(lambda: _counted(proxy, "failed"), 5, "the first call's failure")
    second = await _call(proxy, await _episode(proxy))
    shadows = await _rows(proxy, SHADOWS, 3)
    assert {s["shadow_of"] for s in shadows} == {second} and first in calls
    assert proxy.state.shadows.busy_episodes() == []
