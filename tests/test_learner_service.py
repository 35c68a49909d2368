"""Proxy -> gRPC -> learner -> proxy, on the fake vLLM and a tiny model: feed, update, publish, restart."""

import asyncio
import json

import aiohttp

import grpc
import openai
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flywheel.learner.config import LearnerConfig
from flywheel.learner.credit import CreditConfig
from flywheel.learner.trainer import TrainerConfig
from flywheel.protos import flywheel_pb2 as pb
from flywheel.protos import flywheel_pb2_grpc as pb_grpc
from flywheel.proxy.canary import PromotionConfig
from tests.conftest import free_port, wait_buffered
from tests.fake_upstream import LORAS
from tests.test_feedback import api

DIRECT = PromotionConfig(mode="direct")  # the learner's versions go live at once: hot-swap is tested here


TINY_TRAINER = TrainerConfig(compile=False, lora_rank=4, lora_alpha=8, dtype="float32")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Vocabulary large enough for the fake upstream's token ids (1000 + i)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


async def run_episodes(proxy, tasks: dict[str, list[float]]) -> None:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x", max_retries=0)
    for task, rewards in tasks.items():
        for i, reward in enumerate(rewards):
            episode = f"{task}-{i}"
            await client.chat.completions.create(model="base", messages=[{"role": "user", "content": f"solve {task}"}],
                                                 max_tokens=3, temperature=0.8,
                                                 extra_headers={"X-Flywheel-Episode": episode, "X-Flywheel-Task": task})
            await api(proxy, "POST", f"/v1/episodes/{episode}/feedback", {"reward": reward})
            await api(proxy, "POST", f"/v1/episodes/{episode}/close")


async def test_episodes_flow_train_publish_and_survive_a_learner_restart(start_proxy, start_learner, upstream,
                                                                       tiny_model, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    proxy = await start_proxy(promotion=DIRECT, learner=address, push_after_s=0.0, push_interval_s=0.05)
    config = LearnerConfig(model=tiny_model, listen=address, proxy=proxy.url, state_dir=str(tmp_path / "state"),
                           min_episodes=1000, group_size=4, trainer=TINY_TRAINER,
                           credit=CreditConfig(skip_truncated=False))

    # the learner is down: the proxy keeps serving and nothing is lost
    await run_episodes(proxy, {"t1": [1.0, 0.0, 1.0, 0.0]})
    rows = await proxy.rows("SELECT count(*) AS n FROM episodes WHERE pushed_at IS NULL")
    assert rows == [{"n": 4}]
    server = await start_learner(config, tiny_model)
    await wait_buffered(server, 4)
    await run_episodes(proxy, {"t2": [0.0, 0.5, 1.0, 0.0]})
    await wait_buffered(server, 8)
    assert await proxy.rows("SELECT count(*) AS n FROM episodes WHERE pushed_at IS NULL") == [{"n": 0}]

    # on demand, through the proxy, waiting for the update; a watcher sees the new adapter
    channel = grpc.aio.insecure_channel(address)
    watch = pb_grpc.LearnerStub(channel).WatchAdapters(pb.WatchRequest())
    watched = asyncio.get_running_loop().create_task(anext(aiter(watch)))
    await asyncio.sleep(0.1)
    status, body = await api(proxy, "GET", "/v1/learner/status")
    assert status == 200 and body["buffered_episodes"] == 8 and body["pushed_episodes"] == 8
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/learner/train", json={"wait": True}) as response:
            events = [json.loads(line) async for line in response.content]
    kinds = [next(iter(e)) for e in events]
    assert "metrics" in kinds and "published" in kinds, events
    metrics = next(e["metrics"] for e in events if "metrics" in e)
    assert metrics["transitions"] == 8 and metrics["agent"] == "solver"
    assert "solver-v1" in upstream.app[LORAS]
    assert (await asyncio.wait_for(watched, 10)).served_name == "solver-v1"
    watch.cancel()
    await channel.close()
    reply = await openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x").chat.completions.create(
        model="base", messages=[{"role": "user", "content": "again"}])
    assert reply.model == "solver-v1"  # hot-swapped: later calls are served by the new version
    [run] = await proxy.rows("SELECT agent, version, transitions, tokens, episodes FROM train_runs")
    assert run == {"agent": "solver", "version": 1, "transitions": 8, "tokens": 24, "episodes": 8}
    assert server.learner.buffer.pending == {}

    # a restarted learner keeps what it published and ignores what it already had
    await server.stop()
    server = await start_learner(config, tiny_model)
    assert server.learner.publisher.latest["solver"].served_name == "solver-v1"
    assert server.learner.buffer.pending == {}
    assert server.learner.buffer.add([_episode("t1-0")]) == (0, 1)  # a duplicate by episode id
    await run_episodes(proxy, {"t3": [1.0, 0.0, 1.0, 0.0]})
    await wait_buffered(server, 4)
    published = await server.learner.update("test")
    assert [p.served_name for p in published] == ["solver-v2"]


def _episode(episode_id):
    return pb.Episode(episode_id=episode_id)


async def test_train_pushes_everything_ready_and_never_eval_episodes(start_proxy, start_learner, tiny_model,
                                                                     tmp_path):
    """The feed's own loop is idle here (a one-hour interval): the update sees every closed train
    episode, across several push batches, and no episode marked eval."""
    address = f"127.0.0.1:{free_port()}"
    proxy = await start_proxy(learner=address, push_after_s=0.0, push_interval_s=3600, push_batch=2)
    server = await start_learner(LearnerConfig(
        model=tiny_model, listen=address, proxy=proxy.url, state_dir=str(tmp_path / "state"), min_episodes=0,
        group_size=4,
        trainer=TINY_TRAINER, credit=CreditConfig(skip_truncated=False)), tiny_model)
    await run_episodes(proxy, {"t1": [1.0, 0.0, 1.0, 0.0, 1.0]})
    for i, reward in enumerate([1.0, 0.0]):
        _, created = await api(proxy, "POST", "/v1/episodes", {"task": "t1", "metadata": {"eval": True}})
        await openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/solver/v1", api_key="x").chat.completions.create(
            model="base", messages=[{"role": "user", "content": "held out"}], max_tokens=3,
            extra_headers={"X-Flywheel-Episode": created["episode_id"]})
        await api(proxy, "POST", f"/v1/episodes/{created['episode_id']}/feedback", {"reward": reward})
        await api(proxy, "POST", f"/v1/episodes/{created['episode_id']}/close")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{proxy.url}/v1/learner/train", json={"wait": True}) as response:
            events = [json.loads(line) async for line in response.content]
    metrics = next(e["metrics"] for e in events if "metrics" in e)
    assert metrics["episodes"] == 5 and metrics["transitions"] == 5, events
    assert await proxy.rows("SELECT count(*) AS n FROM episodes WHERE pushed_at IS NULL") == [{"n": 2}]
    assert server.learner.updates == 1  # min_episodes = 0: nothing trained on its own


async def test_the_learner_port_answers_only_the_token_holder(start_proxy, start_learner, tiny_model, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    config = LearnerConfig(model=tiny_model, listen=address, state_dir=str(tmp_path / "state"), token="shared-secret")
    await start_learner(config, tiny_model)
    stub = pb_grpc.LearnerStub(grpc.aio.insecure_channel(address))
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Status(pb.StatusRequest(), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a client stream is refused the same way
            await stub.PushEpisodes(iter([pb.Episode(episode_id="e1")]), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    proxy = await start_proxy(learner=address, learner_token="shared-secret")
    status, body = await api(proxy, "GET", "/v1/learner/status")
    assert status == 200 and "learner_error" not in body
    wrong = await start_proxy(learner=address, learner_token="not-the-secret", db=str(tmp_path / "wrong.duckdb"))
    status, body = await api(wrong, "GET", "/v1/learner/status")
    assert status == 200 and body["learner_error"].startswith("UNAUTHENTICATED")
