"""The learner learns: a tiny random Llama, a rule-based reward, the real trainer and loss."""

import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flywheel.learner.advantages import AdvantageConfig, compute_advantages
from flywheel.learner.credit import Transition
from flywheel.learner.loss import LossConfig
from flywheel.learner.trainer import PolicyTrainer, TrainerConfig

VOCAB, PROMPTS, GROUP, NEW_TOKENS = 32, 8, 8, 4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=31, tie_word_embeddings=True,
                         initializer_range=0.1)  # embeddings large enough for peaked outputs
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def reward(completion: list[int]) -> float:
    """1 when the completion starts with one of the tokens 2..5 (1 in 8 at random)."""
    return float(2 <= completion[0] <= 5)


def sample(trainer: PolicyTrainer, generator: torch.Generator) -> list[Transition]:
    """G completions for each prompt, sampled from the current adapter (temperature 1)."""
    model = trainer.model.base_model.model
    out = []
    for p in range(PROMPTS):
        prompt = [1, 6 + p, 7 + p]
        ids = torch.tensor([prompt] * GROUP)
        for _ in range(NEW_TOKENS):
            with torch.no_grad():
                logits = model(input_ids=ids).logits[:, -1].float()
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], dim=1)
        for row in ids.tolist():
            completion = row[len(prompt):]
            out.append(Transition(episode_id=f"{p}-{len(out)}", task_id=f"task-{p}", agent="tiny", seq=0,
                                  adapter="tiny-v0", prompt_ids=tuple(prompt), completion_ids=tuple(completion),
                                  behavior_logprobs=(0.0,) * NEW_TOKENS, temperature=1.0, reward=reward(completion)))
    return out


def test_reward_rises_within_a_few_updates(tiny_llama):
    config = TrainerConfig(compile=False, lora_rank=8, lora_alpha=16, lr=1e-2, dtype="float32")
    trainer = PolicyTrainer(tiny_llama, config, LossConfig(loss_type="dapo", is_cap=0.0))
    trainer.ensure_adapter("tiny")
    generator = torch.Generator().manual_seed(1)
    rewards = []
    for _ in range(8):
        transitions = sample(trainer, generator)
        rewards.append(statistics.mean(t.reward for t in transitions))
        scored, _ = compute_advantages(transitions, AdvantageConfig(), {})
        if scored:
            stats = trainer.update("tiny", scored)
            assert stats.tokens == len(scored) * NEW_TOKENS and stats.grad_norm > 0
    assert rewards[-1] >= rewards[0] + 0.4, rewards
    assert max(rewards) >= 0.6, rewards


def test_recomputed_logprobs_match_sampling_and_saved_adapters_reload(tiny_llama, tmp_path):
    trainer = PolicyTrainer(tiny_llama, TrainerConfig(compile=False, lora_rank=4, lora_alpha=8, dtype="float32"))
    trainer.ensure_adapter("a")
    transitions = sample(trainer, torch.Generator().manual_seed(2))[:4]
    scored, _ = compute_advantages([t if i % 2 else Transition(**{**t.__dict__, "reward": 1.0})
                                    for i, t in enumerate(transitions)], AdvantageConfig(scale="none"), {})
    before = trainer.score("a", scored)
    trainer.update("a", scored)
    after = trainer.score("a", scored)
    assert before != after
    saved = trainer.save("a", tmp_path / "v1")
    assert (saved / "adapter_config.json").is_file() and (saved / "optimizer.pt").is_file()
    fresh = PolicyTrainer(tiny_llama, TrainerConfig(compile=False, lora_rank=4, lora_alpha=8, dtype="float32"))
    fresh.ensure_adapter("a", resume_from=str(saved))
    torch.testing.assert_close(torch.tensor(fresh.score("a", scored)), torch.tensor(after))
    assert fresh.optimizers["a"].state_dict()["state"]  # optimizer state resumed too
