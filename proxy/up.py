"""`flywheel up`: the whole stack on one machine: vLLM with LoRA, then the proxy in front of it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from proxy.supervisor import ChildDied, Child, Supervisor
from proxy.vllm_server import VllmError, VllmSettings, child as vllm_child


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
    # seconds to wait for vLLM to load
    vllm_timeout_s: float = 900.0
    # TOML settings file passed on to the proxy ("" = none)
    config: str = ""


def _model(config: UpConfig) -> tuple[str, str]:
    if config.model:
        path = Path(config.model)
        if not (path / "config.json").is_file():
            raise SystemExit(f"flywheel up: {path} is not a Hugging Face model directory (no config.json)")
        return str(path), config.served_name or path.name
    from learner.prepare_model import prepare  # the embedded default, built once

    return str(prepare()), config.served_name or "smollm2"


def up(config: UpConfig) -> int:
    supervisor = Supervisor(adopt_orphans=True)
    supervisor.handle_signals()
    try:
        upstream, served = config.upstream, config.served_name
        if not upstream:
            model, served = _model(config)
            settings = VllmSettings(model=model, served_name=served, port=config.vllm_port,
                                    max_loras=config.max_loras, max_lora_rank=config.max_lora_rank)
            vllm = supervisor.start(vllm_child(settings))
            supervisor.wait_ready(vllm, config.vllm_timeout_s, f"vLLM to load {Path(model).name}")
            upstream = settings.url
        proxy_argv = [sys.executable, "-m", "flywheel", "serve", "--upstream", upstream,
                      "--host", config.host, "--port", str(config.port), "--db", config.db]
        if config.config:
            proxy_argv += ["--config", config.config]
        proxy = Child("proxy", proxy_argv, ready_url=f"http://{config.host}:{config.port}/healthz")
        proxy.env.update(FLYWHEEL_PROXY_BASE_MODEL=served or "", FLYWHEEL_PROXY_MAX_LORA_RANK=str(config.max_lora_rank))
        supervisor.wait_ready(supervisor.start(proxy), 60, "the proxy")
        supervisor.say(f"Flywheel is up: point agents at http://{config.host}:{config.port}/v1 "
                       f"(model {served or 'as upstream'}), upstream {upstream}. Ctrl-C stops everything.")
        supervisor.watch()
        return 0
    except (ChildDied, VllmError) as failure:
        supervisor.say(f"error: {failure}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        supervisor.stop_all()
        supervisor.say("stopped")
