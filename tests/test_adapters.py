"""The adapter registry against the fake vLLM: validation, routing, versions, in-flight, rollback, restore."""

import asyncio
import json

import openai

from flywheel.store.records import StoreUnavailable
from tests.fake_upstream import LOAD_FAILURES, LORA_CALLS, LORAS, UNLOAD_DELAY_S
from tests.conftest import eventually
from tests.test_feedback import api

MESSAGES = [{"role": "user", "content": "hi"}]


def adapter_dir(tmp_path, name="a", rank=8, peft_type="LORA"):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": rank}))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return str(directory)


async def chat(proxy, agent, **extra):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="x", max_retries=0)
    return await client.chat.completions.create(model="base", messages=MESSAGES, extra_body=extra or None)


async def test_registration_validates_the_directory(proxy, tmp_path):
    cases = [
        ({"agent": "s", "path": str(tmp_path / "missing")}, "adapter_config.json"),
        ({"agent": "s", "path": adapter_dir(tmp_path, "big", rank=64)}, "exceeds"),
        ({"agent": "s", "path": adapter_dir(tmp_path, "ia3", peft_type="IA3")}, "only LoRA"),
        ({"agent": "bad name!", "path": adapter_dir(tmp_path, "ok")}, "agent name"),
        ({"agent": "s"}, "required"),
    ]
    for payload, message in cases:
        status, body = await api(proxy, "POST", "/v1/adapters", payload)
        assert status == 400 and message in body["error"]["message"], body
    assert (await api(proxy, "GET", "/v1/adapters"))[1] == {"agents": {}}


async def test_register_routes_only_that_agent_and_records_the_version(proxy, upstream, tmp_path):
    status, row = await api(proxy, "POST", "/v1/adapters", {"agent": "solver", "path": adapter_dir(tmp_path)})
    assert status == 201 and row["served_name"] == "solver-v1" and row["status"] == "active"
    reply = await chat(proxy, "solver")
    assert upstream.received[-1]["model"] == "solver-v1" and reply.model == "solver-v1"
    await chat(proxy, "router")
    assert upstream.received[-1]["model"] == "base"
    rows = await proxy.rows("SELECT agent, model, adapter FROM calls ORDER BY created_at")
    assert rows == [{"agent": "solver", "model": "base", "adapter": "solver-v1"},
                    {"agent": "router", "model": "base", "adapter": "base"}]


async def test_versions_keep_active_and_standby_loaded_and_unload_older(proxy, upstream, tmp_path):
    for n in range(1, 4):
        await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, f"v{n}")})
    await asyncio.sleep(0.05)  # unloading runs as a task
    assert sorted(upstream.app[LORAS]) == ["s-v2", "s-v3"]
    _, listing = await api(proxy, "GET", "/v1/adapters")
    assert listing["agents"]["s"]["current"] == "s-v3"
    assert [(h["served_name"], h["status"]) for h in listing["agents"]["s"]["history"]] == [
        ("s-v1", "retired"), ("s-v2", "standby"), ("s-v3", "active")]
    rows = await proxy.rows("SELECT served_name, status FROM adapters ORDER BY version")
    assert [r["status"] for r in rows] == ["retired", "standby", "active"]


async def test_a_call_in_flight_finishes_on_its_version_before_it_is_unloaded(proxy, upstream, tmp_path):
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v1")})
    slow = asyncio.create_task(chat(proxy, "s", fake_delay_ms=400))
    await asyncio.sleep(0.1)
    for n in (2, 3):  # v1 goes standby, then retired, while its call runs
        await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, f"v{n}")})
    assert "s-v1" in upstream.app[LORAS]
    assert (await slow).model == "s-v1"
    await asyncio.sleep(0.05)
    assert "s-v1" not in upstream.app[LORAS] and ("unload", "s-v1") in upstream.app[LORA_CALLS]


async def test_rollback_walks_back_to_the_base_model(proxy, upstream, tmp_path):
    for n in (1, 2, 3):
        await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, f"v{n}")})
    status, body = await api(proxy, "POST", "/v1/adapters/s/rollback")
    assert status == 200 and body["current"] == "s-v2"
    assert (await chat(proxy, "s")).model == "s-v2"
    status, body = await api(proxy, "POST", "/v1/adapters/s/rollback")
    assert body["current"] == "s-v1" and (await chat(proxy, "s")).model == "s-v1"  # reloaded on demand
    status, body = await api(proxy, "POST", "/v1/adapters/s/rollback")
    assert body["current"] is None and (await chat(proxy, "s")).model == "base"
    status, body = await api(proxy, "POST", "/v1/adapters/s/rollback")
    assert status == 409 and "nothing to roll back" in body["error"]["message"]
    status, row = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "v4")})
    assert row["served_name"] == "s-v4"  # names are never reused


async def test_a_restarted_proxy_restores_routing_into_a_fresh_vllm(start_proxy, upstream, tmp_path):
    proxy = await start_proxy()
    for n in (1, 2):
        await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, f"v{n}")})
    await proxy.stop()
    upstream.app[LORAS].clear()  # as if vLLM had restarted too
    proxy = await start_proxy()
    for _ in range(100):
        if sorted(upstream.app[LORAS]) == ["s-v1", "s-v2"]:
            break
        await asyncio.sleep(0.02)
    assert sorted(upstream.app[LORAS]) == ["s-v1", "s-v2"]
    assert (await chat(proxy, "s")).model == "s-v2"


async def test_calls_for_another_model_are_not_rerouted(proxy, upstream, tmp_path):
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path), "base_model": "base"})
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/s/v1", api_key="x")
    await client.chat.completions.create(model="other-model", messages=MESSAGES)
    assert upstream.received[-1]["model"] == "other-model"
    await client.chat.completions.create(model="base", messages=MESSAGES)
    assert upstream.received[-1]["model"] == "s-v1"


async def test_restore_goes_past_a_broken_version_and_its_agent_falls_back(start_proxy, upstream, tmp_path):
    proxy = await start_proxy()
    paths = [adapter_dir(tmp_path, f"s{n}") for n in (1, 2)]
    for path in paths:
        await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": path})
    await api(proxy, "POST", "/v1/adapters", {"agent": "t", "path": adapter_dir(tmp_path, "t1")})
    await proxy.stop()
    upstream.app[LORAS].clear()  # vLLM restarted ...
    (tmp_path / "s2" / "adapter_config.json").unlink()  # ... and s-v2's files are gone
    proxy = await start_proxy()
    await eventually(lambda: proxy.state.registry.restored, 5, "adapters restored")
    assert sorted(upstream.app[LORAS]) == ["s-v1", "t-v1"]
    assert (await chat(proxy, "s")).model == "s-v1" and (await chat(proxy, "t")).model == "t-v1"
    history = {v["served_name"]: v["status"] for v in (await api(proxy, "GET", "/v1/adapters"))[1]["agents"]["s"]["history"]}
    assert history == {"s-v1": "active", "s-v2": "failed"}
    status, ready = await api(proxy, "GET", "/readyz")
    assert status == 200 and "failed: s-v2" in ready["checks"]["adapters"]["detail"]


async def test_a_restarted_vllm_gets_its_adapters_back(start_proxy, upstream, tmp_path):
    proxy = await start_proxy(adapter_check_s=0.05)
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "s1")})
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, "s2")})
    upstream.app[LORAS].clear()
    upstream.app[LOAD_FAILURES][0] = 3  # the restarted vLLM refuses the first reloads: they are tried again
    await eventually(lambda: sorted(upstream.app[LORAS]) == ["s-v1", "s-v2"], 5, "adapters reloaded")
    assert (await chat(proxy, "s")).model == "s-v2" and proxy.state.registry.reloads == 2


async def test_an_unload_in_flight_never_removes_a_version_a_rollback_revives(proxy, upstream, tmp_path):
    upstream.app[UNLOAD_DELAY_S][0] = 0.3
    for n in (1, 2, 3):  # v1 retires: its unload starts, slowly
        await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path, f"s{n}")})
    for _ in range(2):  # v3 -> v2 -> v1 while v1's unload is still in vLLM
        assert (await api(proxy, "POST", "/v1/adapters/s/rollback", {}))[0] == 200
    await asyncio.sleep(0.8)
    assert "s-v1" in upstream.app[LORAS] and (await chat(proxy, "s")).model == "s-v1"


async def test_a_version_the_store_cannot_record_never_goes_live(proxy, upstream, tmp_path, monkeypatch):
    writer = proxy.state.writer
    original = writer.submit

    async def submit(op):
        if type(op).__name__ == "AdapterRow":
            raise StoreUnavailable("disk full (test)")
        return await original(op)

    monkeypatch.setattr(writer, "submit", submit)
    status, body = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path)})
    assert status == 503 and body["error"]["code"] == "store_unavailable"
    assert "s-v1" not in upstream.app[LORAS] and (await chat(proxy, "s")).model != "s-v1"
    assert (await api(proxy, "GET", "/v1/adapters"))[1] == {"agents": {}}


async def test_a_name_someone_else_loaded_is_replaced_with_ours(proxy, upstream, tmp_path):
    upstream.app[LORAS]["s-v1"] = "/somewhere/else"
    path = adapter_dir(tmp_path)
    assert (await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": path}))[0] == 201
    assert upstream.app[LORAS]["s-v1"] == path
    assert upstream.app[LORA_CALLS][-3:] == [("load", "s-v1"), ("unload", "s-v1"), ("load", "s-v1")]


async def test_adapters_only_from_the_configured_roots_and_only_as_safetensors(start_proxy, tmp_path):
    inside, outside = tmp_path / "roots", tmp_path / "elsewhere"
    inside.mkdir(), outside.mkdir()
    proxy = await start_proxy(adapter_roots=(str(inside),))
    (inside / "link").symlink_to(adapter_dir(outside, "real"))
    for path, status, code in ((adapter_dir(outside, "a"), 403, "outside_adapter_roots"),
                               (str(inside / "link"), 403, "outside_adapter_roots"),
                               (str(inside / ".." / "elsewhere" / "a"), 403, "outside_adapter_roots")):
        reply = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": path})
        assert (reply[0], reply[1]["error"]["code"]) == (status, code), path
    pickled = adapter_dir(inside, "pickled")
    (inside / "pickled" / "adapter_model.safetensors").rename(inside / "pickled" / "adapter_model.bin")
    status, body = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": pickled})
    assert status == 400 and "pickle" in body["error"]["message"]
    assert (await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(inside, "ok")}))[0] == 201
    closed = await start_proxy(adapter_roots=(), db=str(tmp_path / "other.duckdb"))
    status, body = await api(closed, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(inside, "ok2")})
    assert status == 403 and body["error"]["code"] == "adapter_roots_unset"


async def test_a_restarted_proxy_adopts_what_it_loaded_into_a_running_vllm(start_proxy, upstream, tmp_path):
    proxy = await start_proxy()
    await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter_dir(tmp_path)})
    await proxy.stop()
    upstream.app[LORA_CALLS].clear()
    proxy = await start_proxy()  # vLLM kept s-v1, loaded from this very directory
    await eventually(lambda: proxy.state.registry.restored, 5, "adapters restored")
    assert upstream.app[LORA_CALLS] == [("load", "s-v1")]  # answered "already loaded": adopted, never unloaded
    assert (await chat(proxy, "s")).model == "s-v1"
