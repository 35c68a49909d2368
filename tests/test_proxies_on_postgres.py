"""Two proxies on one PostgreSQL store (a throwaway server, started here): calls of the same
episodes through both, feedback through either, SQL through either sees everything, each
episode pushed to the learner once, an adapter registered on one served through the other,
once-only work (the rollout) on one of them."""

import asyncio
from collections import Counter

import grpc
import openai
import pytest

from flywheel.protos import flywheel_pb2 as pb
from flywheel.protos import flywheel_pb2_grpc as pb_grpc
from tests import postgres_server as server
from tests.conftest import eventually, free_port
from tests.test_adapters import adapter_dir
from tests.test_feedback import api

pytestmark = pytest.mark.postgres
postgres_server, postgres_url = server.postgres_server, server.postgres_url  # the fixtures


class RecordingLearner(pb_grpc.LearnerServicer):
    """Acknowledges every episode pushed and remembers how often each id came."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()

    async def PushEpisodes(self, request_iterator, context):
        ids = [episode.episode_id async for episode in request_iterator]
        self.received.update(ids)
        return pb.PushAck(accepted=len(ids), episode_ids=ids)


async def _chat(proxy, episode: str, agent: str = "solver"):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="x", max_retries=0)
    return await client.chat.completions.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}],
                                                extra_headers={"X-Flywheel-Episode": episode})


async def test_two_proxies_share_one_postgres_store(start_proxy, postgres_url, tmp_path):
    learner = RecordingLearner()
    grpc_server = grpc.aio.server()
    pb_grpc.add_LearnerServicer_to_server(learner, grpc_server)
    address = f"127.0.0.1:{free_port()}"
    grpc_server.add_insecure_port(address)
    await grpc_server.start()
    try:
        settings = dict(db=postgres_url, learner=address, push_after_s=0.0, push_interval_s=0.05,
                        adapter_roots=(str(tmp_path),))
        one, two = await start_proxy(**settings), await start_proxy(**settings)
        episodes = [f"ep-{i}" for i in range(30)]
        for n, episode in enumerate(episodes):  # each episode's calls alternate between the proxies
            await asyncio.gather(_chat(one, episode), _chat(two, episode))
            await _chat((one, two)[n % 2], episode)
            status, _ = await api((two, one)[n % 2], "POST", f"/v1/episodes/{episode}/feedback", {"reward": n % 3})
            assert status == 200
            await api((one, two)[n % 2], "POST", f"/v1/episodes/{episode}/close")

        for proxy in (one, two):  # SQL through either sees every call of every episode, in one sequence
            status, out = await api(proxy, "POST", "/v1/sql", {"query": (
                "SELECT episode_id, count(*) AS n, count(DISTINCT seq) AS seqs, min(seq) AS lo, max(seq) AS hi "
                "FROM calls GROUP BY episode_id ORDER BY episode_id")})
            assert status == 200, out
            assert [row[1:] for row in out["rows"]] == [[3, 3, 0, 2]] * len(episodes)
            status, out = await api(proxy, "POST", "/v1/sql", {"query": "SELECT count(*) FROM episodes WHERE reward IS NOT NULL"})
            assert out["rows"] == [[len(episodes)]]
            status, refused = await api(proxy, "POST", "/v1/sql", {"query": "DELETE FROM calls"})
            assert status == 400

        await eventually(lambda: len(learner.received) == len(episodes), 20, "every episode pushed")
        await asyncio.sleep(0.5)  # any second push would have come by now
        assert set(learner.received) == set(episodes) and set(learner.received.values()) == {1}

        # a version registered through one proxy serves the agent's calls through the other within a second
        status, _ = await api(one, "POST", "/v1/adapters", {"agent": "solver", "path": adapter_dir(tmp_path, "s1")})
        assert status == 201
        await eventually(lambda: two.state.registry.active.get("solver") is not None, 1.5, "taken by proxy two")
        assert (await _chat(two, "after-1")).model == "solver-v1"
        status, _ = await api(two, "POST", "/v1/adapters/solver/rollback", {"reason": "through proxy two"})
        assert status == 200
        await eventually(lambda: "solver" not in one.state.registry.active, 1.5, "rollback taken by proxy one")
        assert (await _chat(one, "after-2")).model == "m"
    finally:
        await grpc_server.stop(0)


async def test_proxies_on_one_store_share_their_rate_limits(start_proxy, postgres_url):
    from flywheel.proxy.policy import AgentRule

    settings = dict(db=postgres_url, agents=(AgentRule(match="noisy", rpm=4),))
    one, two = await start_proxy(**settings), await start_proxy(**settings)
    for _ in range(3):
        await _chat(one, "ep-1", agent="noisy")

    async def two_knows() -> bool:  # after a sync (1 s) the second proxy counts the first's calls
        counters = two.state.quotas._subjects.get("agents noisy agent 'noisy'")
        return counters is not None and counters.others_calls == 3

    await eventually(two_knows, 10, "the other proxy's calls counted")
    await _chat(two, "ep-2", agent="noisy")  # 3 + 1 = the limit
    with pytest.raises(openai.RateLimitError) as refused:
        await _chat(two, "ep-2", agent="noisy")
    assert refused.value.response.headers["Retry-After"] == "1"  # the others' calls: look again after a sync
    await _chat(two, "ep-3", agent="quiet")  # another agent is not held up


async def test_proxies_on_one_store_share_max_concurrent(start_proxy, postgres_url):
    from flywheel.proxy.policy import AgentRule

    settings = dict(db=postgres_url, agents=(AgentRule(match="slow", max_concurrent=1),))
    one, two = await start_proxy(**settings), await start_proxy(**settings)
    client = openai.AsyncOpenAI(base_url=f"{one.url}/agents/slow/v1", api_key="x", max_retries=0)
    long_call = asyncio.create_task(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_body={"fake_delay_ms": 4000}))

    async def two_knows() -> bool:
        counters = two.state.quotas._subjects.get("agents slow agent 'slow'")
        return counters is not None and counters.others_in_progress == 1

    await eventually(two_knows, 10, "the other proxy's call in progress counted")
    with pytest.raises(openai.RateLimitError, match="max_concurrent"):
        await _chat(two, "ep-x", agent="slow")
    await long_call

    async def two_sees_it_end() -> bool:
        return two.state.quotas._subjects["agents slow agent 'slow'"].others_in_progress == 0

    await eventually(two_sees_it_end, 10, "the other proxy's call seen to end")
    await _chat(two, "ep-x", agent="slow")
