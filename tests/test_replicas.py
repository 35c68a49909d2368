"""Several upstream replicas behind one proxy, against fake vLLMs: rendezvous stickiness,
failover and return, adapters loaded into every live replica before they serve."""

import asyncio
from collections import Counter

import openai

from flywheel.proxy.replicas import rendezvous_order
from tests.conftest import Running, eventually
from tests.fake_upstream import LORAS, RECEIVED, make_app
from tests.test_adapters import adapter_dir
from tests.test_feedback import api

MESSAGES = [{"role": "user", "content": "hi"}]


def test_rendezvous_order_is_stable_spreads_and_moves_only_the_lost_names_keys():
    names = ["http://a:8000", "http://b:8000", "http://c:8000"]
    keys = [f"ep-{i}" for i in range(3000)]
    homes = {key: names[rendezvous_order(key, names)[0]] for key in keys}
    assert homes == {key: names[rendezvous_order(key, names)[0]] for key in keys}  # deterministic
    counts = Counter(homes.values())
    assert all(800 < counts[name] < 1200 for name in names), counts  # ~1/3 each
    without_b = [names[0], names[2]]
    moved = [key for key in keys if without_b[rendezvous_order(key, without_b)[0]] != homes[key]]
    assert moved and all(homes[key] == names[1] for key in moved)  # only b's episodes move
    fallback = {key: names[rendezvous_order(key, names)[1]] for key in moved}
    assert all(without_b[rendezvous_order(key, without_b)[0]] == fallback[key] for key in moved)


async def _replicas(n: int) -> list[Running]:
    servers = [await Running(make_app()).start() for _ in range(n)]
    for server in servers:
        server.received = server.app[RECEIVED]
    return servers


async def _chat(proxy, episode: str, agent: str = "s"):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="x", max_retries=0)
    return await client.chat.completions.create(model="base", messages=MESSAGES,
                                                extra_headers={"X-Flywheel-Episode": episode})


async def test_episodes_stick_to_one_replica_and_fail_over_then_come_back(start_proxy, tmp_path):
    one, two = await _replicas(2)
    proxy = await start_proxy(upstream=(one.url, two.url), adapter_check_s=0.1)
    try:
        await eventually(lambda: all(r.live for r in proxy.state.upstream.replicas), 5, "both replicas live")
        episodes = [f"ep-{i}" for i in range(20)]
        for episode in episodes:
            for _ in range(3):
                await _chat(proxy, episode)
        by_replica = {server.url: Counter(body["model"] for body in server.received) for server in (one, two)}
        assert all(sum(counts.values()) > 0 for counts in by_replica.values())  # both take episodes
        rows = await proxy.rows("SELECT episode_id, count(*) AS n FROM calls GROUP BY episode_id")
        assert {row["episode_id"]: row["n"] for row in rows} == {episode: 3 for episode in episodes}
        names = [one.url, two.url]
        home = {episode: names[rendezvous_order(episode, names)[0]] for episode in episodes}
        assert len(one.received) == 3 * sum(url == one.url for url in home.values())  # each episode on its home

        port = one.port
        await one.stop()  # replica one dies: its episodes go to two, and no call fails
        before = len(two.received)
        for episode in episodes:
            await _chat(proxy, episode)
        assert len(two.received) - before == len(episodes)
        assert not proxy.state.upstream.replicas[0].live
        rows = await proxy.rows("SELECT count(*) AS n FROM calls WHERE status <> 200")
        assert rows[0]["n"] == 0

        returned = await Running(make_app(), port=port).start()  # it comes back (empty, as a restarted vLLM)
        returned.received = returned.app[RECEIVED]
        try:
            await eventually(lambda: proxy.state.upstream.replicas[0].live, 5, "replica one live again")
            for episode in episodes:
                await _chat(proxy, episode)
            assert len(returned.received) == sum(url == one.url for url in home.values())  # its episodes came back
        finally:
            await returned.stop()
    finally:
        await two.stop()


async def test_an_adapter_is_in_every_live_replica_before_it_serves_and_a_joiner_gets_it_first(start_proxy, tmp_path):
    one, two = await _replicas(2)
    port = two.port
    await two.stop()  # replica two is down when the version is registered
    proxy = await start_proxy(upstream=(one.url, f"http://127.0.0.1:{port}"), adapter_check_s=0.1)
    try:
        await eventually(lambda: proxy.state.upstream.replicas[0].live, 5, "replica one live")
        status, row = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "s1")})
        assert status == 201 and sorted(one.app[LORAS]) == ["s-v1"]
        joined = await Running(make_app(), port=port).start()
        joined.received = joined.app[RECEIVED]
        try:
            await eventually(lambda: proxy.state.upstream.replicas[1].live, 5, "replica two joins")
            assert sorted(joined.app[LORAS]) == ["s-v1"]  # loaded before it took any call
            # a version registered under traffic: both replicas have it before any call is routed to it
            stop = asyncio.Event()
            served: list[str] = []

            async def traffic(n: int) -> None:
                while not stop.is_set():
                    served.append((await _chat(proxy, f"load-{n}-{len(served)}")).model)

            clients = [asyncio.create_task(traffic(n)) for n in range(4)]
            await asyncio.sleep(0.2)
            status, _ = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "s2")})
            assert status == 201
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*clients)  # a failed call would raise here
            assert "s-v2" in served and sorted(one.app[LORAS]) == sorted(joined.app[LORAS]) == ["s-v1", "s-v2"]
            for server in (one, joined):
                assert all(body["model"] in server.app[LORAS] for body in server.received)
            assert proxy.state.registry.reloads == 0  # nothing was lost: a load racing a sync is no reload
            _, listing = await api(proxy, "GET", "/readyz")
            assert listing["checks"]["upstream"]["ok"]
        finally:
            await joined.stop()
    finally:
        await one.stop()
