"""Keys, what each reaches, and the guards against a web page driving a keyless loopback proxy."""

import aiohttp
import openai
import pytest

from flywheel.proxy.app import build_app
from flywheel.proxy.auth import InsecureConfig
from flywheel.proxy.config import ProxyConfig
from tests.fake_upstream import AUTHORIZATIONS
from tests.test_feedback import api

CLIENT_KEY, ADMIN_KEY = "client-key-0123456789", "admin-key-0123456789ab"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def keyed(start_proxy):
    return await start_proxy(api_keys=(CLIENT_KEY,), admin_keys=(ADMIN_KEY,))


def test_an_open_proxy_binds_loopback_only_and_keys_must_be_long():
    with pytest.raises(InsecureConfig, match="without keys"):
        build_app(ProxyConfig(host="0.0.0.0"))
    build_app(ProxyConfig(host="0.0.0.0", insecure=True))
    build_app(ProxyConfig(host="0.0.0.0", api_keys=(CLIENT_KEY,)))
    with pytest.raises(InsecureConfig, match="at least 16"):
        build_app(ProxyConfig(api_keys=("short",)))


async def test_without_a_key_or_with_a_wrong_one_nothing_is_served_or_recorded(keyed):
    for key, code in ((None, "missing_api_key"), ("wrong-key-0123456789", "invalid_api_key")):
        status, body = await api(keyed, "POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES}, key=key)
        assert status == 401 and body["error"]["code"] == code and body["error"]["type"] == "authentication_error"
        status, _ = await api(keyed, "POST", "/v1/episodes/e1/feedback", {"reward": 1}, key=key)
        assert status == 401
        status, _ = await api(keyed, "GET", "/v1/nowhere", key=key)
        assert status == 401  # an unknown route tells a stranger nothing
    assert await keyed.rows("SELECT * FROM calls") == [] and await keyed.rows("SELECT * FROM feedback") == []
    status, health = await api(keyed, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"


async def test_a_client_key_reaches_inference_and_episodes_but_no_admin_route(keyed):
    client = openai.AsyncOpenAI(base_url=f"{keyed.url}/agents/planner/v1", api_key=CLIENT_KEY, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    episode = raw.headers["X-Flywheel-Episode"]
    assert (await client.models.list()).data
    async with aiohttp.ClientSession() as session:  # X-Api-Key works as well as Bearer
        async with session.post(f"{keyed.url}/v1/episodes/{episode}/feedback", json={"reward": 1},
                                headers={"X-Api-Key": CLIENT_KEY}) as response:
            assert response.status == 200
    assert (await api(keyed, "POST", f"/v1/episodes/{episode}/close", key=CLIENT_KEY))[0] == 200
    assert (await api(keyed, "GET", f"/v1/episodes/{episode}", key=CLIENT_KEY))[0] == 200
    assert (await api(keyed, "POST", "/v1/episodes", {"agent": "planner"}, key=CLIENT_KEY))[0] == 201
    for method, path, payload in (("POST", "/v1/sql", {"query": "SELECT request FROM calls"}),
                                  ("GET", "/v1/adapters", None),
                                  ("POST", "/v1/adapters", {"agent": "planner", "path": "/tmp"}),
                                  ("POST", "/v1/adapters/planner/rollback", {}),
                                  ("POST", "/v1/learner/train", {}), ("GET", "/v1/learner/status", None)):
        status, body = await api(keyed, method, path, payload, key=CLIENT_KEY)
        assert status == 403 and body["error"]["code"] == "admin_key_required", path
    status, rows = await api(keyed, "POST", "/v1/sql", {"query": "SELECT count(*) AS n FROM calls"}, key=ADMIN_KEY)
    assert status == 200 and rows["rows"] == [[1]]


async def test_the_clients_key_never_reaches_the_upstream_only_the_upstream_key(start_proxy, upstream):
    proxy = await start_proxy(api_keys=(CLIENT_KEY,), upstream_api_key="vllm-secret")
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    await client.chat.completions.create(model="m", messages=MESSAGES)
    await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert upstream.app[AUTHORIZATIONS] == ["Bearer vllm-secret"] * 2
    stored = await proxy.rows("SELECT request FROM calls")
    assert stored and all(CLIENT_KEY not in row["request"] for row in stored)


async def test_a_web_page_cannot_post_text_or_forms_to_a_keyless_proxy(proxy):
    async with aiohttp.ClientSession() as session:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": content_type} if content_type else {}
            async with session.post(f"{proxy.url}/v1/episodes/e1/feedback", data=b'{"reward": 1}',
                                    headers=headers) as response:
                body = await response.json()
                assert response.status == 415 and body["error"]["code"] == "unsupported_media_type"
            async with session.post(f"{proxy.url}/v1/learner/train", headers=headers) as response:
                assert response.status == 415
    assert await proxy.rows("SELECT * FROM feedback") == [] and await proxy.rows("SELECT * FROM episodes") == []


async def test_a_rebound_host_name_is_refused_on_loopback(proxy):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/v1/models", headers={"Host": "attacker.example:8400"}) as response:
            assert response.status == 403 and (await response.json())["error"]["code"] == "host_not_allowed"
        for host in (f"localhost:{proxy.port}", f"127.0.0.1:{proxy.port}", f"[::1]:{proxy.port}"):
            async with session.get(f"{proxy.url}/healthz", headers={"Host": host}) as response:
                assert response.status == 200, host


def test_the_command_refuses_an_open_proxy_on_a_public_address(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flywheel", "serve", "--host", "0.0.0.0", "--db",
                           str(tmp_path / "x.duckdb")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing to serve 0.0.0.0 without keys" in done.stderr
    assert not (tmp_path / "x.duckdb").exists()  # refused before anything opened
