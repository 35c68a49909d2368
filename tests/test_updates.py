"""Updates for production traffic: groups wait until complete, updates are all-or-nothing, baselines persist."""

import json

import openai
import pytest
import torch

from flywheel.learner.advantages import AdvantageConfig, Baseline
from flywheel.learner.config import LearnerConfig
from flywheel.learner.credit import CreditConfig
from flywheel.learner.publish import PublishError
from flywheel.learner.updates import Learner, PendingUpdate, ready_episodes, update_due
from flywheel.protos import flywheel_pb2 as pb
from tests.conftest import free_port, wait_buffered
from tests.test_feedback import api
from tests.test_learner_service import TINY_TRAINER, tiny_model  # noqa: F401  (a fixture)


def _episode(episode_id: str, task: str = "", reward: float = 1.0) -> pb.Episode:
    call = pb.Call(call_id=f"{episode_id}-c", agent="solver", status=200, prompt_token_ids=[1, 2],
                   completion_token_ids=[1000, 1001], completion_logprobs=[-0.5, -0.5], finish_reason="stop",
                   temperature=1.0, choices=1, adapter="base")
    return pb.Episode(episode_id=episode_id, task_id=task, calls=[call], rewards=[pb.Reward(reward=reward)])


def test_a_group_is_ready_when_complete_or_quiet_and_one_offs_always_are():
    episodes = [_episode("s1"), _episode("a1", "a"), _episode("b1", "b"), _episode("a2", "a"), _episode("b2", "b")]
    arrived = {"s1": 100.0, "a1": 100.0, "b1": 100.0, "a2": 150.0, "b2": 150.0}
    ids = lambda found: [e.episode_id for e in found]  # noqa: E731
    assert ids(ready_episodes(episodes, arrived, now=200.0, min_attempts=3, group_wait_s=60)) == ["s1"]
    assert ids(ready_episodes(episodes, arrived, now=210.0, min_attempts=3, group_wait_s=60)) == [
        "s1", "a1", "b1", "a2", "b2"]  # quiet 60 s
    assert ids(ready_episodes(episodes, arrived, now=200.0, min_attempts=2, group_wait_s=60)) == [
        "s1", "a1", "b1", "a2", "b2"]  # complete
    assert ids(ready_episodes(episodes, arrived, now=200.0, min_attempts=3, group_wait_s=60, trained={"a": 1})) == [
        "s1", "a1", "a2"]  # a's attempt already trained on counts


def test_update_due_by_trainable_episodes_by_timer_or_only_on_demand():
    assert update_due(ready_episodes=64, since_last_s=0, min_episodes=64, interval_s=0) == "scheduled"
    assert update_due(ready_episodes=63, since_last_s=10, min_episodes=64, interval_s=0) is None
    assert update_due(ready_episodes=1, since_last_s=60, min_episodes=64, interval_s=60) == "timer"
    assert update_due(ready_episodes=10_000, since_last_s=1e9, min_episodes=0, interval_s=0) is None


async def test_a_group_still_filling_is_neither_split_nor_dropped(tmp_path):
    """Two of eight attempts with equal rewards: the old update consumed them (a zero-variance
    group, dropped for good); the six that came later were singletons."""
    learner = Learner(LearnerConfig(state_dir=str(tmp_path), group_policy="complete", group_size=8,
                                    group_wait_s=3600), "unused")
    learner.buffer.add([_episode(f"t-{i}", "t", 1.0) for i in range(2)])
    assert await learner.update("on demand") == []
    assert sorted(learner.buffer.pending) == ["t-0", "t-1"] and learner.status().waiting_episodes == 2
    learner.buffer.add([_episode(f"t-{i}", "t", float(i % 2)) for i in range(2, 8)])
    plan = learner.plan()
    assert plan.waiting == 0 and plan.groups == 1
    assert sorted(s.transition.episode_id for s in plan.batches["solver"].scored) == [f"t-{i}" for i in range(8)]


async def test_a_rolling_group_trains_attempts_as_they_come_against_those_already_trained(tmp_path):
    """The same traffic under the default rolling policy: the two equal attempts are consumed but
    remembered (also across a restart), and the six later ones are scored among all eight."""
    config = LearnerConfig(state_dir=str(tmp_path), group_size=8, group_wait_s=3600,
                           advantages=AdvantageConfig(scale="none"))
    learner = Learner(config, "unused")
    learner.buffer.add([_episode("t-0", "t", 1.0), _episode("t-1", "t", 1.0), _episode("u-0", "u", 0.0)])
    assert await learner.update("on demand") == []
    assert sorted(learner.buffer.pending) == ["u-0"]  # a lone first attempt waits for a second
    assert json.loads((tmp_path / "task_returns.json").read_text()) == {"solver\tt": [1.0, 1.0]}
    learner = Learner(config, "unused")
    learner.buffer.add([_episode(f"t-{i}", "t", float(i % 2)) for i in range(2, 8)])
    plan = learner.plan()
    assert plan.waiting == 1 and plan.groups == 1
    # V = [1, 1, 0, 1, 0, 1, 0, 1]: mean 5/8
    assert [(s.transition.episode_id, s.advantage) for s in plan.batches["solver"].scored] == [
        (f"t-{i}", pytest.approx(i % 2 - 5 / 8)) for i in range(2, 8)]


async def test_ready_episodes_without_a_signal_leave_the_buffer_and_their_baseline_lessons_stay(tmp_path):
    learner = Learner(LearnerConfig(state_dir=str(tmp_path), group_size=2), "unused")
    learner.buffer.add([_episode("g-0", "g", 1.0), _episode("g-1", "g", 1.0), _episode("s", "", 0.0)])
    assert await learner.update("on demand") == []  # all equal, and the one-off warms the baseline
    assert learner.buffer.pending == {}
    assert learner.baselines["solver"].seen == 3
    again = Learner(LearnerConfig(state_dir=str(tmp_path)), "unused")
    assert again.baselines["solver"] == learner.baselines["solver"]  # saved with the learner's state


async def _traffic(proxy, tasks: dict[str, list[float]]) -> None:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    for task, rewards in tasks.items():
        for i, reward in enumerate(rewards):
            episode = f"{task}-{i}"
            await client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": f"solve {task}"}], max_tokens=3,
                extra_headers={"X-Flywheel-Episode": episode, "X-Flywheel-Task": task})
            await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": reward})
            await api(proxy, "POST", f"/v1/episodes/{episode}/close")


def _lora_weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.trainer.model.named_parameters() if "lora_" in n}


async def test_a_failed_publish_is_retried_from_the_saved_directory_never_by_training_again(
        start_proxy, start_learner, tiny_model, tmp_path):  # noqa: F811
    address, registry_port = f"127.0.0.1:{free_port()}", free_port()
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05)
    config = LearnerConfig(model=tiny_model, listen=address, proxy=f"http://127.0.0.1:{registry_port}",
                           state_dir=str(tmp_path / "state"), min_episodes=0, group_size=4,
                           trainer=TINY_TRAINER, credit=CreditConfig(skip_truncated=False))
    server = await start_learner(config, tiny_model)
    await _traffic(proxy, {"t1": [1.0, 0.0, 1.0, 0.0]})
    await wait_buffered(server, 4)
    with pytest.raises(PublishError, match="unreachable"):  # nothing listens at the registry's address yet
        await server.learner.update("test")
    pending = json.loads((tmp_path / "state" / "pending.json").read_text())
    [entry] = pending["publishes"]
    assert len(server.learner.buffer.pending) == 4 and server.learner.status().pending_publishes == 1
    trained = _lora_weights(server.learner)

    # the learner restarts; the registry comes up: the same directory is published, nothing retrained
    await server.stop()
    server = await start_learner(config, tiny_model)
    calls = []
    registry = await start_proxy(upstream=proxy.config.upstream, db=str(tmp_path / "registry.duckdb"),
                                 port=registry_port)
    published = await server.learner.update("test", calls.append)
    assert [p.served_name for p in published] == ["solver-v1"] and published[0].path == entry["directory"]
    assert not any(e.HasField("metrics") for e in calls)  # no training happened: only the publish
    assert server.learner.buffer.pending == {} and not (tmp_path / "state" / "pending.json").exists()
    assert (await registry.rows("SELECT served_name, path FROM adapters")) == [
        {"served_name": "solver-v1", "path": entry["directory"]}]
    assert server.learner.baselines["solver"].seen == 4
    server.learner.trainer = server.learner._load_trainer()  # resumes from the published directory
    resumed = _lora_weights(server.learner)
    assert trained.keys() == resumed.keys() and all(torch.equal(trained[k], resumed[k]) for k in trained)


async def test_a_refused_update_leaves_the_adapter_as_it_was(start_proxy, start_learner, tiny_model,  # noqa: F811
                                                             tmp_path):
    """The logprob-gap gate used to run after the optimizer step: the refused update moved the weights anyway."""
    address = f"127.0.0.1:{free_port()}"
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=0.05)
    server = await start_learner(LearnerConfig(
        model=tiny_model, listen=address, proxy=proxy.url, state_dir=str(tmp_path / "state"), min_episodes=0,
        group_size=2, max_logprob_mismatch=1e-6, trainer=TINY_TRAINER, credit=CreditConfig(skip_truncated=False)),
        tiny_model)
    await _traffic(proxy, {"t1": [1.0, 0.0]})
    await wait_buffered(server, 2)
    server.learner.trainer = server.learner._load_trainer()
    server.learner.trainer.ensure_adapter("solver")
    before = _lora_weights(server.learner)
    events = []
    assert await server.learner.update("test", events.append) == []
    assert any("exceeds max_logprob_mismatch" in e.error for e in events if e.HasField("error"))
    after = _lora_weights(server.learner)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert server.learner.buffer.pending == {}  # known useless for this adapter: consumed, not retried forever


def test_baselines_round_trip_through_their_file(tmp_path):
    learner = Learner(LearnerConfig(state_dir=str(tmp_path)), "unused")
    learner._consume(PendingUpdate([], {"solver": {"mean": 0.5, "var": 0.1, "seen": 7}}))
    assert Learner(LearnerConfig(state_dir=str(tmp_path)), "unused").baselines == {"solver": Baseline(0.5, 0.1, 7)}
