"""Two real vLLM-CPU replicas behind one proxy: episodes stick to one, fail over when it dies
and come back when it returns, and an adapter registered under traffic is served by both
with no failed request."""

import asyncio
import re
import urllib.request

import openai
import pytest

from flywheel.proxy.replicas import rendezvous_order
from flywheel.supervisor import Supervisor
from flywheel.vllm_server import VllmSettings, child
from tests.conftest import eventually, free_port, random_lora
from tests.test_feedback import api

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Say one word."}]
_SUCCESS = re.compile(r'^vllm:request_success_total\{[^}]*\} ([0-9.e+]+)$', re.M)


def requests_served(url: str) -> int:
    """Requests this vLLM finished, from its Prometheus counter (all reasons, all models)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        return int(sum(float(value) for value in _SUCCESS.findall(response.read().decode())))


async def test_two_vllm_replicas_behind_one_proxy(start_proxy, vllm, smollm2, tmp_path):
    second = VllmSettings(model=smollm2, served_name="smollm2", port=free_port(), kv_cache_gb=1)
    urls = [vllm.url, second.url]
    with (tmp_path / "vllm-2.log").open("w") as log:
        supervisor = Supervisor(log)
        try:
            replica = supervisor.start(child(second))
            lora = await asyncio.to_thread(random_lora, smollm2, str(tmp_path / "lora"), 8, 5)
            await asyncio.to_thread(supervisor.wait_ready, replica, 600, "vLLM replica 2")
            proxy = await start_proxy(upstream=tuple(urls), base_model="smollm2", adapter_check_s=0.5)
            await eventually(lambda: all(r.live for r in proxy.state.upstream.replicas), 30, "both replicas live")
            client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/s/v1", api_key="x", max_retries=0)

            async def call(episode: str) -> str:
                reply = await client.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=2,
                                                             extra_headers={"X-Flywheel-Episode": episode})
                return reply.model

            def home(episode: str) -> str:
                return urls[rendezvous_order(episode, urls)[0]]

            episodes = [f"ep-{i}" for i in range(12)]
            on_second = [e for e in episodes if home(e) == second.url]
            assert 0 < len(on_second) < len(episodes)

            async def served_by_each(calls: int = 2) -> list[int]:
                before = [await asyncio.to_thread(requests_served, url) for url in urls]
                for episode in episodes:
                    for _ in range(calls):
                        await call(episode)
                return [await asyncio.to_thread(requests_served, url) - b for url, b in zip(urls, before)]

            # sticky: each episode's calls all go to its home replica
            assert await served_by_each() == [2 * (len(episodes) - len(on_second)), 2 * len(on_second)]

            supervisor.stop_all()  # replica 2 dies: its episodes go to replica 1, no call fails
            first_before = await asyncio.to_thread(requests_served, vllm.url)
            for episode in episodes:
                await call(episode)
            assert await asyncio.to_thread(requests_served, vllm.url) - first_before == len(episodes)
            assert not proxy.state.upstream.replicas[1].live

            supervisor = Supervisor(log)  # it comes back on its port: its episodes return to it
            replica = supervisor.start(child(second))
            await asyncio.to_thread(supervisor.wait_ready, replica, 600, "vLLM replica 2 again")
            await eventually(lambda: proxy.state.upstream.replicas[1].live, 30, "replica 2 live again")
            assert await served_by_each(1) == [len(episodes) - len(on_second), len(on_second)]

            # an adapter registered under traffic over both replicas: no request fails
            stop = asyncio.Event()
            models: list[str] = []

            async def traffic(n: int) -> None:
                while not stop.is_set():
                    models.append(await call(f"load-{n}-{len(models)}"))

            clients = [asyncio.create_task(traffic(n)) for n in range(4)]
            await asyncio.sleep(1)
            status, _ = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": lora})
            assert status == 201
            await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*clients)  # a failed call raises here
            assert "s-v1" in models and "smollm2" in models
            for replica_state in proxy.state.upstream.replicas:
                assert "s-v1" in await replica_state.models()
            assert await served_by_each(1) != [0, 0] and set(await asyncio.gather(*map(call, episodes))) == {"s-v1"}
            failed = await proxy.rows("SELECT count(*) AS n FROM calls WHERE status <> 200")
            assert failed[0]["n"] == 0
        finally:
            supervisor.stop_all()
