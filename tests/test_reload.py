"""Reloading keys, agent rules and redaction without a restart: POST /v1/admin/reload and SIGHUP."""

import dataclasses
import signal

import openai

from flywheel.proxy.policy import AgentRule, KeyRule
from tests.conftest import eventually
from tests.test_feedback import api

ADMIN, OLD, NEW = "admin-key-0123456789ab", "client-key-old-0123456789", "client-key-new-0123456789"


async def chat(proxy, key: str, agent: str = "solver") -> int:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key=key, max_retries=0)
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "mail a@b.co"}])
        return 200
    except openai.APIStatusError as refused:
        return refused.status_code


async def test_a_proxy_built_from_code_has_nothing_to_reload(start_proxy):
    proxy = await start_proxy(admin_keys=(ADMIN,))
    status, body = await api(proxy, "POST", "/v1/admin/reload", {}, key=ADMIN)
    assert status == 409 and body["error"]["code"] == "nothing_to_reload"


async def test_a_reload_rotates_keys_and_applies_new_rules_and_a_bad_one_changes_nothing(start_proxy):
    wanted = []  # what the configuration says when the proxy reads it again
    proxy = await start_proxy(api_keys=(OLD,), admin_keys=(ADMIN,), reload_from=lambda: wanted[-1])
    config = proxy.config

    wanted.append(dataclasses.replace(config, api_keys=(), keys=(KeyRule(key=NEW, store="metadata"),),
                                    agents=(AgentRule(match="private", store="none"),), redact=("email",),
                                    upstream_timeout_s=5.0))
    status, body = await api(proxy, "POST", "/v1/admin/reload", {}, key=ADMIN)
    assert status == 200 and body == {"changed": ["api_keys", "keys", "agents", "redact"],
                                      "needs_restart": ["upstream_timeout_s"]}
    assert await chat(proxy, OLD) == 401 and await chat(proxy, NEW) == 200 and await chat(proxy, NEW, "private") == 200
    rows = await proxy.rows("SELECT agent, stored, redactions FROM calls")
    assert rows == [{"agent": "solver", "stored": "metadata", "redactions": {"email": 1}}]  # "private": none

    wanted.append(dataclasses.replace(config, api_keys=("short",)))
    status, body = await api(proxy, "POST", "/v1/admin/reload", {}, key=ADMIN)
    assert status == 400 and "at least 16" in body["error"]["message"]
    assert await chat(proxy, NEW) == 200  # the running rules stay

    await proxy.state.writer.flush()
    audit = await proxy.rows("SELECT action, detail FROM audit_log WHERE action = 'config_reload'")
    assert [a["detail"]["changed"] for a in audit] == [["api_keys", "keys", "agents", "redact"]]
    assert NEW not in str(audit)  # setting names, never a key


async def test_sighup_reloads_flywheel_serve_from_its_file(serve_process, tmp_path):
    toml = tmp_path / "flywheel.toml"
    toml.write_text(f'[proxy]\napi_keys = ["{OLD}"]\nadmin_keys = ["{ADMIN}"]\n')
    served = await serve_process(args=("--config", str(toml)), store_process="false")
    assert await chat(served, OLD) == 200
    toml.write_text(f'[proxy]\napi_keys = ["{NEW}"]\nadmin_keys = ["{ADMIN}"]\n')
    served.proc.send_signal(signal.SIGHUP)

    async def rotated() -> bool:
        return await chat(served, NEW) == 200

    await eventually(rotated, 10, "the new key accepted after SIGHUP", every_s=0.1)
    assert await chat(served, OLD) == 401
