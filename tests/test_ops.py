"""The ops surface: /readyz beside /healthz, Prometheus /metrics, /openapi.json for Flywheel's routes."""

import asyncio
import json

import aiohttp
import openai

from flywheel.proxy.openapi import SPEC
from tests.conftest import free_port
from tests.test_auth import ADMIN_KEY, CLIENT_KEY
from tests.test_feedback import api
from tests.test_store import _failing_apply

MESSAGES = [{"role": "user", "content": "hello"}]


async def _metrics(proxy, key=None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/metrics", headers=headers) as response:
            return response.status, await response.text()


async def test_ready_says_which_part_is_not(start_proxy, monkeypatch):
    proxy = await start_proxy(store_process=False)
    status, body = await api(proxy, "GET", "/readyz")
    assert status == 200 and body["ready"] and set(body["checks"]) == {"upstream", "store", "adapters"}
    down = await start_proxy(upstream=f"http://127.0.0.1:{free_port()}", db=proxy.config.db + ".2")
    status, body = await api(down, "GET", "/readyz")
    assert status == 503 and not body["checks"]["upstream"]["ok"] and body["checks"]["store"]["ok"]
    assert (await api(down, "GET", "/healthz"))[0] == 200  # alive all the same
    _failing_apply(monkeypatch, 10**9)
    await openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x").chat.completions.create(model="m",
                                                                                               messages=MESSAGES)
    for _ in range(50):
        status, body = await api(proxy, "GET", "/readyz")
        if status == 503:
            break
        await asyncio.sleep(0.1)  # the record waits out the writer's linger first
    assert status == 503 and "No space left" in body["checks"]["store"]["detail"]
    monkeypatch.undo()


async def test_metrics_count_requests_calls_tokens_refusals_and_the_writer(start_proxy, tmp_path):
    proxy = await start_proxy(api_keys=(CLIENT_KEY,), admin_keys=(ADMIN_KEY,))
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/planner/v1", api_key=CLIENT_KEY, max_retries=0)
    await client.chat.completions.create(model="m", messages=MESSAGES)
    async for _ in await client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
        pass
    await api(proxy, "POST", "/v1/sql", {"query": "DELETE FROM calls"}, key=ADMIN_KEY)
    assert (await _metrics(proxy))[0] == 401 and (await _metrics(proxy, CLIENT_KEY))[0] == 403
    status, text = await _metrics(proxy, ADMIN_KEY)
    assert status == 200
    for line in ('flywheel_llm_calls_total{agent="planner",status="200"} 2.0',
                 'flywheel_sql_refused_total{reason="read_only"} 1.0',
                 'flywheel_requests_total{route="/agents/{agent}/v1/chat/completions",status="200"} 2.0',
                 'flywheel_requests_total{route="/v1/sql",status="400"} 1.0',
                 'flywheel_ttft_seconds_count{agent="planner"} 1.0',
                 "flywheel_store_writable 1.0"):
        assert line in text, line
    assert 'flywheel_tokens_total{agent="planner",kind="completion"}' in text
    assert "flywheel_writer_queue_bytes" in text and "flywheel_writer_lag_seconds" in text


async def test_openapi_describes_every_route_of_flywheels_own(proxy):
    status, spec = await api(proxy, "GET", "/openapi.json")
    assert status == 200 and spec == SPEC and spec["openapi"].startswith("3.")
    routes = {(route.method.lower(), route.resource.canonical) for route in proxy.app.router.routes()
              if not route.resource.canonical.startswith("/agents/")}
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert routes == documented


async def test_flywheel_status_shows_a_store_that_cannot_write(start_proxy, monkeypatch, capsys):
    from flywheel.commands import main

    proxy = await start_proxy(batch_linger_ms=5, store_process=False)
    assert await asyncio.to_thread(main, ["status", "--url", proxy.url]) == 0
    healthy = json.loads(capsys.readouterr().out)
    assert healthy["proxy"]["ready"] and "no learner" in healthy["learner"]["error"]
    _failing_apply(monkeypatch, 10**9)
    await openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x").chat.completions.create(model="m",
                                                                                               messages=MESSAGES)
    await asyncio.sleep(0.2)
    assert await asyncio.to_thread(main, ["status", "--url", proxy.url]) == 1
    store = json.loads(capsys.readouterr().out)["proxy"]["checks"]["store"]
    # the call, and perhaps the audit row of the SQL query the first status ran (if not committed yet)
    assert not store["ok"] and "No space left" in store["detail"] and store["queued_records"] in (1, 2)
    monkeypatch.undo()


async def test_a_learner_that_is_down_degrades_the_proxy_but_leaves_it_ready(start_proxy):
    proxy = await start_proxy(learner=f"127.0.0.1:{free_port()}", push_after_s=0, push_interval_s=0.05)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/a/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    await api(proxy, "POST", f"/v1/episodes/{raw.headers['X-Flywheel-Episode']}/feedback", {"reward": 1})
    for _ in range(100):
        status, body = await api(proxy, "GET", "/readyz")
        if body["degraded"]:
            break
        await asyncio.sleep(0.05)
    assert status == 200 and body["ready"] and body["degraded"] == ["feed"]
    assert "UNAVAILABLE" in body["checks"]["feed"]["detail"]
    assert (await client.chat.completions.create(model="m", messages=MESSAGES)).choices  # agents served all the same
