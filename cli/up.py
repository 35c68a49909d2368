"""`flywheel up`: the whole stack on one machine: vLLM with LoRA, the proxy in front of it, the learner."""

from __future__ import annotations

import json
import secrets
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flywheel.proxy.config import ProxyConfig
from flywheel.supervisor import ChildDied, Child, Supervisor
from flywheel.vllm_server import VllmError, VllmSettings, child as vllm_child, sampling_defaults


class UpError(ValueError):
    """`flywheel up` was asked for something it cannot start."""


@dataclass(frozen=True)
class UpConfig:
    # Hugging Face model directory to serve ("" = the embedded SmolLM2-135M-Instruct, prepared on demand)
    model: str = ""
    # name the base model is served under ("" = "smollm2" for the default, else the directory's name)
    served_name: str = ""
    # proxy address
    host: str = "127.0.0.1"
    port: int = 8400
    # vLLM's port (on 127.0.0.1)
    vllm_port: int = 8000
    # DuckDB file of the proxy
    db: str = "flywheel.duckdb"
    # an already running OpenAI-compatible server: no vLLM is started
    upstream: str = ""
    # LoRA adapters vLLM keeps at once: two per trained agent (active + rollback target)
    max_loras: int = 4
    # highest adapter rank vLLM accepts
    max_lora_rank: int = 16
    # GPU builds of vLLM: its share of GPU memory; the rest is the learner's when it shares the GPU
    gpu_memory_utilization: float = 0.5
    # seconds to wait for vLLM to load
    vllm_timeout_s: float = 900.0
    # start the learner too (trains the agents' adapters from their traffic)
    learner: bool = True
    # the learner's gRPC port (on 127.0.0.1)
    learner_port: int = 8401
    # the learner's buffer, adapters and optimizer states
    learner_state: str = "flywheel-learner"
    # serve a non-loopback host without proxy keys (see [proxy] insecure)
    insecure: bool = False
    # TOML settings file passed on to the proxy and the learner ("" = none)
    config: str = ""


def _model(config: UpConfig) -> tuple[str, str]:
    if config.model:
        path = Path(config.model)
        if not (path / "config.json").is_file():
            raise UpError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path), config.served_name or path.name
    from flywheel.learner.prepare_model import prepare  # the embedded default, built once

    return str(prepare()), config.served_name or "smollm2"


def flywheel_command(*args: str) -> list[str]:
    """`python -P -m flywheel ...`: -P keeps the working directory off the import path, so a
    user's own folder named like one of ours cannot shadow the installed package."""
    return [sys.executable, "-P", "-m", "flywheel", *args]


def warm_up(url: str, model: str, api_key: str) -> None:
    """One tiny chat request, so the first agent's call does not pay vLLM's first-request costs
    (compiling the chat template takes seconds on CPU)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    try:
        urllib.request.urlopen(request, timeout=120).read()
    except OSError:
        pass  # a warm-up only: serving works without it


def up(config: UpConfig, proxy_settings: ProxyConfig = ProxyConfig()) -> int:
    """The stack; `proxy_settings`: the proxy's own (its keys: the learner publishes with an admin key)."""
    supervisor = Supervisor(adopt_orphans=True)
    supervisor.handle_signals()
    # secrets only these processes share, handed over in their environment (never in argv):
    # vLLM answers only the proxy, the learner's gRPC port only the proxy's feed
    vllm_key, learner_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    try:
        upstream, served, model = config.upstream, config.served_name, config.model
        if not upstream:
            model, served = _model(config)
            settings = VllmSettings(model=model, served_name=served, port=config.vllm_port,
                                    max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                                    gpu_memory_utilization=config.gpu_memory_utilization, api_key=vllm_key)
            vllm = supervisor.start(vllm_child(settings))
            supervisor.wait_ready(vllm, config.vllm_timeout_s, f"vLLM to load {Path(model).name}")
            upstream = settings.url
            warm_up(upstream, served, vllm_key)
        settings_file = ["--config", config.config] if config.config else []
        proxy_url = f"http://{config.host}:{config.port}"
        learner_address = f"127.0.0.1:{config.learner_port}"
        insecure = ["--insecure"] if config.insecure else []
        proxy = Child("proxy", flywheel_command("serve", "--upstream", upstream, "--host", config.host, "--port",
                                                str(config.port), "--db", config.db, *insecure, *settings_file),
                      ready_url=f"{proxy_url}/healthz",
                      # streams get shutdown_timeout_s to end, then the queue is written: never cut short
                      stop_grace_s=proxy_settings.shutdown_timeout_s + 60)
        proxy.env.update(FLYWHEEL_PROXY_BASE_MODEL=served or "", FLYWHEEL_PROXY_MAX_LORA_RANK=str(config.max_lora_rank))
        if not proxy_settings.adapter_roots:  # the learner's adapters may be registered
            proxy.env["FLYWHEEL_PROXY_ADAPTER_ROOTS"] = str(Path(config.learner_state).resolve())
        if not config.upstream:
            proxy.env["FLYWHEEL_PROXY_UPSTREAM_API_KEY"] = vllm_key
        if not config.upstream:  # we started vLLM without its generation-config defaults: the proxy applies them
            defaults = sampling_defaults(model)
            proxy.env["FLYWHEEL_PROXY_SAMPLING_DEFAULTS"] = ",".join(f"{k}={v}" for k, v in defaults.items())
        if config.learner:
            proxy.env.update(FLYWHEEL_PROXY_LEARNER=learner_address, FLYWHEEL_PROXY_LEARNER_TOKEN=learner_token)
        supervisor.wait_ready(supervisor.start(proxy), 60, "the proxy")
        if config.learner:
            if not model:
                raise UpError("the learner needs --model when --upstream is given")
            learner = Child("learner", flywheel_command("learner", "--model", model, "--listen", learner_address,
                                                        "--proxy", proxy_url, "--state-dir", config.learner_state,
                                                        *settings_file), ready_url=f"tcp://{learner_address}")
            learner.env["FLYWHEEL_LEARNER_TOKEN"] = learner_token
            if proxy_settings.every_admin_key:
                learner.env.setdefault("FLYWHEEL_LEARNER_PROXY_KEY", proxy_settings.every_admin_key[0])
            supervisor.wait_ready(supervisor.start(learner), 120, "the learner")
        supervisor.say(f"Flywheel is up: point agents at http://{config.host}:{config.port}/v1 "
                       f"(model {served or 'as upstream'}), upstream {upstream}. Ctrl-C stops everything.")
        supervisor.watch()
        return 0
    except (ChildDied, VllmError, UpError) as failure:
        supervisor.say(f"error: {failure}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        supervisor.stop_all()
        supervisor.say("stopped")
