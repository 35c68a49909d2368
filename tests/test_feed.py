"""The learner feed cannot be poisoned: one bad episode is quarantined with its error, the rest flow."""

import asyncio

import openai

from flywheel.learner.config import LearnerConfig
from tests.conftest import eventually, free_port, wait_buffered
from tests.test_feedback import api


async def _episode(proxy, episode: str, words: int) -> None:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(
        model="m", max_tokens=3, messages=[{"role": "user", "content": " ".join(["word"] * words)}],
        extra_headers={"X-Flywheel-Episode": episode})
    await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1.0})
    await api(proxy, "POST", f"/v1/episodes/{episode}/close")


async def _settled(proxy, episodes: int) -> list[dict]:
    for _ in range(200):
        rows = await proxy.rows("SELECT episode_id, pushed_at IS NOT NULL AS pushed, push_error FROM episodes "
                                "ORDER BY episode_id")
        if len(rows) == episodes and all(r["pushed"] or r["push_error"] for r in rows):
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(rows)


async def test_an_episode_over_the_message_limit_is_quarantined_and_the_rest_are_delivered(
        start_proxy, start_learner, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    server = await start_learner(LearnerConfig(listen=address, state_dir=str(tmp_path / "state")), "unused")
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05, max_message_bytes=4096)
    await _episode(proxy, "a-small", 10)
    await _episode(proxy, "b-huge", 3000)  # ~3000 prompt token ids: over 4 KiB
    await _episode(proxy, "c-small", 10)
    rows = await _settled(proxy, 3)
    assert [(r["episode_id"], r["pushed"]) for r in rows] == [("a-small", True), ("b-huge", False), ("c-small", True)]
    assert "over the feed's max_message_bytes 4096" in rows[1]["push_error"]
    await wait_buffered(server, 2)
    assert sorted(server.learner.buffer.pending) == ["a-small", "c-small"]
    status, body = await api(proxy, "GET", "/v1/learner/status")
    assert status == 200 and [q["episode_id"] for q in body["quarantined"]] == ["b-huge"]
    _, health = await api(proxy, "GET", "/healthz")
    assert health["feed"]["ok"] and health["feed"]["quarantined_episodes"] == 1
    await proxy.stop()  # a restarted proxy does not try the quarantined episode again
    again = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05, max_message_bytes=4096)
    await _episode(again, "d-small", 10)
    await wait_buffered(server, 3)

    async def all_marked() -> bool:  # the learner has it; the proxy marks it pushed once the ack is in
        return (await again.rows("SELECT count(*) AS n FROM episodes WHERE pushed_at IS NULL AND push_error IS NULL")
                )[0]["n"] == 0

    await eventually(all_marked, 10, "every delivered episode marked pushed")


async def test_an_episode_the_learner_refuses_is_found_and_quarantined_alone(start_proxy, start_learner, tmp_path):
    """The learner's own limit is lower than the proxy's: its RESOURCE_EXHAUSTED names no episode,
    so the batch is sent again one by one and only the refused one is set aside."""
    address = f"127.0.0.1:{free_port()}"
    server = await start_learner(LearnerConfig(listen=address, state_dir=str(tmp_path / "state"),
                                               max_message_bytes=4096), "unused")
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=3600)
    for name, words in (("a-small", 10), ("b-huge", 3000), ("c-small", 10)):
        await _episode(proxy, name, words)
    await proxy.state.feed.push_ready()
    rows = await _settled(proxy, 3)
    assert [(r["episode_id"], r["pushed"]) for r in rows] == [("a-small", True), ("b-huge", False), ("c-small", True)]
    assert "learner refused it: RESOURCE_EXHAUSTED" in rows[1]["push_error"]
    assert sorted(server.learner.buffer.pending) == ["a-small", "c-small"]


async def test_the_feed_survives_a_failure_it_did_not_expect_and_says_so(start_proxy, start_learner, tmp_path,
                                                                        monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    await start_learner(LearnerConfig(listen=address, state_dir=str(tmp_path / "state")), "unused")
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05)
    store = proxy.state.writer.store
    original, failures = store.episodes_to_push, []

    def flaky(*args):
        if not failures:
            failures.append(1)
            raise OSError("disk went away for a moment")
        return original(*args)

    monkeypatch.setattr(store, "episodes_to_push", flaky)
    await _episode(proxy, "a", 10)
    for _ in range(100):
        _, health = await api(proxy, "GET", "/healthz")
        if failures and health["feed"]["pushed_episodes"] == 1:
            break
        await asyncio.sleep(0.05)
    assert failures and health["feed"]["pushed_episodes"] == 1 and health["feed"]["ok"]
