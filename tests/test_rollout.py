"""Canary candidates, their promotion or rejection, and automatic rollback, against the fake vLLM.

Rewards here come from the test: each episode is rewarded by which version served it, so
the outcome the rollout should reach is known."""

import asyncio

import aiohttp

from flywheel.report import write_report
from flywheel.proxy.canary import PromotionConfig
from flywheel.store.summaries import CANDIDATES
from tests.conftest import eventually
from tests.fake_upstream import LORAS
from tests.test_adapters import adapter_dir
from tests.test_feedback import api

FAST = dict(check_interval_s=0.05, min_episodes=10, margin=0.2, confidence=0.95, canary_fraction=0.5)


class Traffic:
    """Episodes of agent `s`, two calls each, rewarded by `reward_of(served model)`."""

    def __init__(self, proxy, reward_of):
        self.proxy, self.reward_of = proxy, reward_of
        self.served: dict[str, list[str]] = {}  # episode -> models its calls went to
        self.failures = 0
        self.count = 0

    async def episode(self, session: aiohttp.ClientSession, calls: int = 2) -> None:
        self.count += 1
        episode = f"ep-{self.count}"
        models = []
        for _ in range(calls):
            async with session.post(f"{self.proxy.url}/agents/s/episodes/{episode}/v1/chat/completions",
                                    json={"model": "base", "messages": [{"role": "user", "content": "hi"}]}) as reply:
                if reply.status != 200:
                    self.failures += 1
                    return
                models.append((await reply.json())["model"])
        self.served[episode] = models
        async with session.post(f"{self.proxy.url}/v1/episodes/{episode}/feedback",
                                json={"reward": self.reward_of(models[0])}) as reply:
            assert reply.status in (200, 201), await reply.text()

    async def run_until(self, done, limit: int = 600, concurrency: int = 4) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(limit // concurrency):
                await asyncio.gather(*(self.episode(session) for _ in range(concurrency)))
                if await done():
                    return
        raise AssertionError(f"not done after {self.count} episodes")


async def listing(proxy) -> dict:
    return (await api(proxy, "GET", "/v1/adapters"))[1]["agents"]["s"]


def decided(proxy, name: str):
    async def check() -> bool:
        history = {v["served_name"]: v for v in (await listing(proxy))["history"]}
        return history[name]["state"] not in ("candidate",)
    return check


async def test_a_candidate_serves_its_slice_of_new_episodes_and_each_episode_stays_on_one_version(start_proxy,
                                                                                                   tmp_path):
    proxy = await start_proxy(promotion=PromotionConfig(check_interval_s=3600, canary_fraction=0.3))
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v1")})
    async with aiohttp.ClientSession() as session:
        traffic = Traffic(proxy, lambda model: 1.0)
        begun = "ep-early"  # an episode begun before the candidate arrived stays on the active version
        async with session.post(f"{proxy.url}/agents/s/episodes/{begun}/v1/chat/completions",
                                json={"model": "base", "messages": [{"role": "user", "content": "hi"}]}) as reply:
            assert (await reply.json())["model"] == "s-v1"
        status, row = await api(proxy, "POST", "/v1/adapters",
                                {"agent": "s", "path": adapter_dir(tmp_path, "v2"), "canary": True})
        assert status == 201 and row["status"] == "candidate"
        async with session.post(f"{proxy.url}/agents/s/episodes/{begun}/v1/chat/completions",
                                json={"model": "base", "messages": [{"role": "user", "content": "hi"}]}) as reply:
            assert (await reply.json())["model"] == "s-v1"
        for _ in range(100):
            await asyncio.gather(*(traffic.episode(session, calls=3) for _ in range(4)))
    assert traffic.failures == 0
    assert all(len(set(models)) == 1 for models in traffic.served.values())
    share = sum(models[0] == "s-v2" for models in traffic.served.values()) / len(traffic.served)
    assert abs(share - 0.3) < 0.1, share
    agent = await listing(proxy)
    assert agent["current"] == "s-v1" and agent["candidate"] == "s-v2"
    # a router call of another agent is not on anyone's slice
    assert (await proxy.rows("SELECT count(*) AS n FROM calls WHERE agent <> 's'"))[0]["n"] == 0


async def test_a_candidate_that_does_worse_is_rejected_and_the_agent_stays_on_its_version(start_proxy, tmp_path,
                                                                                          upstream):
    proxy = await start_proxy(promotion=PromotionConfig(**FAST))
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v1")})
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v2"), "canary": True})
    traffic = Traffic(proxy, lambda model: 0.0 if model == "s-v2" else 1.0)
    await traffic.run_until(decided(proxy, "s-v2"))
    assert traffic.failures == 0
    agent = await listing(proxy)
    v2 = next(v for v in agent["history"] if v["served_name"] == "s-v2")
    assert agent["current"] == "s-v1" and agent["candidate"] is None
    assert v2["state"] == "rejected" and v2["reason"].startswith("rejected at look 1 on live episodes")
    canary = v2["comparison"]["canary"]
    assert canary["outcome"] == "reject" and canary["against"] == "s-v1"
    assert canary["new"]["episodes"] >= 10 and canary["old"]["episodes"] >= 10
    assert canary["difference_interval"][1] < -0.2
    rows = await proxy.rows("SELECT status, reason, decided_at IS NOT NULL AS decided FROM adapters "
                            "WHERE served_name = 's-v2'")
    assert rows == [{"status": "rejected", "reason": v2["reason"], "decided": True}]
    [summary] = await proxy.rows(CANDIDATES)  # what `flywheel report` plots
    assert summary["served_name"] == "s-v2" and summary["against"] == "s-v1" and summary["basis"] == "live"
    assert summary["candidate_episodes"] == canary["new"]["episodes"]
    assert summary["candidate_low"] <= summary["candidate_mean"] <= summary["candidate_high"]
    assert summary["active_mean"] == canary["old"]["mean_reward"]
    await proxy.state.writer.flush()
    report = write_report(lambda sql: proxy.state.writer.store.query(sql, 10_000, 30), tmp_path / "report", "test")
    assert "## Canary candidates" in report.read_text() and "| s-v2 | s | rejected | s-v1 | live |" in report.read_text()
    assert (tmp_path / "report" / "candidates.png").read_bytes()[:4] == b"\x89PNG"
    await eventually(lambda: "s-v2" not in upstream.app[LORAS], 5, "the rejected version unloaded")
    async with aiohttp.ClientSession() as session:  # new episodes all go to the active version
        before = traffic.count
        await asyncio.gather(*(traffic.episode(session) for _ in range(8)))
    assert {traffic.served[f"ep-{n}"][0] for n in range(before + 1, traffic.count + 1)} == {"s-v1"}


async def test_a_candidate_no_worse_is_promoted_and_watched(start_proxy, tmp_path):
    proxy = await start_proxy(promotion=PromotionConfig(**FAST))
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v1")})
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v2"), "canary": True})
    traffic = Traffic(proxy, lambda model: 1.0)
    await traffic.run_until(decided(proxy, "s-v2"))
    agent = await listing(proxy)
    states = {v["served_name"]: v["state"] for v in agent["history"]}
    assert states == {"s-v1": "standby", "s-v2": "active"} and agent["current"] == "s-v2"
    v2 = next(v for v in agent["history"] if v["served_name"] == "s-v2")
    assert v2["reason"].startswith("promoted at look") and "on live episodes" in v2["reason"], v2["reason"]
    canary = v2["comparison"]["canary"]
    assert canary["outcome"] == "promote" and canary["difference_interval"][0] > -0.2
    assert v2["live_at"] and v2["decided_at"]
    traffic.reward_of = lambda model: 1.0
    await traffic.run_until(lambda: _watched(proxy, "s-v2"), limit=200)
    watch = next(v for v in (await listing(proxy))["history"] if v["served_name"] == "s-v2")["comparison"]["watch"]
    assert watch["against"] == "s-v1" and watch["old"]["episodes"] >= 10 and watch["outcome"] == "continue"


async def _watched(proxy, name: str) -> bool:
    version = next(v for v in (await listing(proxy))["history"] if v["served_name"] == name)
    return (version["comparison"] or {}).get("watch", {}).get("looks_done", 0) >= 1


async def test_a_version_that_does_worse_after_going_live_is_rolled_back_automatically(start_proxy, tmp_path):
    proxy = await start_proxy(promotion=PromotionConfig(**FAST, watch_episodes=40))
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v1")})
    traffic = Traffic(proxy, lambda model: 1.0)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            await asyncio.gather(*(traffic.episode(session) for _ in range(4)))
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v2")})  # direct
    traffic.reward_of = lambda model: 0.0 if model == "s-v2" else 1.0

    async def rolled_back() -> bool:
        return (await listing(proxy))["current"] == "s-v1"

    await traffic.run_until(rolled_back, limit=200)
    assert traffic.failures == 0
    v2 = next(v for v in (await listing(proxy))["history"] if v["served_name"] == "s-v2")
    assert v2["state"] == "rolled_back" and v2["reason"].startswith("rolled back automatically")
    assert v2["comparison"]["watch"]["outcome"] == "reject" and v2["comparison"]["watch"]["against"] == "s-v1"
    await eventually(lambda: _counted(proxy, 'flywheel_adapter_swaps_total{agent="s",reason="auto_rollback"} 1.0'),
                     5, "the rollback counted")


async def _counted(proxy, line: str) -> bool:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/metrics") as reply:
            return line in await reply.text()


async def test_a_candidate_without_traffic_is_rejected_after_max_wait(start_proxy, tmp_path):
    proxy = await start_proxy(promotion=PromotionConfig(check_interval_s=0.05, max_wait_s=0.3))
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v1"), "canary": True})
    await eventually(lambda: proxy.state.registry.candidates == {}, 5, "the candidate timed out")
    v1 = (await listing(proxy))["history"][0]
    assert v1["state"] == "rejected" and "too little traffic in max_wait_s" in v1["reason"]
    assert (await listing(proxy))["current"] is None


async def test_candidates_are_decided_by_hand_and_a_newer_one_replaces_an_undecided_one(start_proxy, tmp_path):
    proxy = await start_proxy(promotion=PromotionConfig(check_interval_s=3600))
    status, body = await api(proxy, "POST", "/v1/adapters/s/promote")
    assert status == 409 and body["error"]["code"] == "no_candidate"
    for n in (1, 2):
        await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, f"v{n}"), "canary": True})
    history = {v["served_name"]: v for v in (await listing(proxy))["history"]}
    assert history["s-v1"]["state"] == "rejected" and "replaced by s-v2" in history["s-v1"]["reason"]
    status, row = await api(proxy, "POST", "/v1/adapters/s/promote", {"reason": "looked good in review"})
    assert status == 200 and row["status"] == "active" and row["reason"] == "promoted by hand: looked good in review"
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v3"), "canary": True})
    status, row = await api(proxy, "POST", "/v1/adapters/s/reject")
    assert status == 200 and row["status"] == "rejected" and row["reason"] == "rejected by hand"
    assert (await listing(proxy))["current"] == "s-v2"
    status, body = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v4"),
                                                             "canary": "yes"})
    assert status == 400 and "'canary'" in body["error"]["message"]


async def test_learner_publishes_follow_the_mode_and_candidates_survive_a_restart(start_proxy, tmp_path):
    run = {"agent": "s", "version": 1, "episodes": 4, "transitions": 8, "tokens": 100, "loss": 0.1}
    proxy = await start_proxy(promotion=PromotionConfig(check_interval_s=3600))
    status, row = await api(proxy, "POST", "/v1/adapters",
                            {"agent": "s", "path": adapter_dir(tmp_path, "v1"), "train_run": run})
    assert status == 201 and row["status"] == "candidate"  # the default mode
    await proxy.stop()
    again = await start_proxy(promotion=PromotionConfig(check_interval_s=3600, mode="direct"))
    await eventually(lambda: again.state.registry.restored, 5, "restored")
    assert (await listing(again))["candidate"] == "s-v1"
    status, row = await api(again, "POST", "/v1/adapters",
                            {"agent": "s", "path": adapter_dir(tmp_path, "v2"), "train_run": run})
    assert status == 201 and row["status"] == "active"
    history = {v["served_name"]: v["state"] for v in (await listing(again))["history"]}
    assert history == {"s-v1": "rejected", "s-v2": "active"}
    assert (await again.rows("SELECT count(*) AS n FROM train_runs"))[0]["n"] == 2
