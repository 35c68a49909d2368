"""The trainer's mechanics on tiny random models: resuming, devices, autocast, checkpointing, logit processing."""

import dataclasses

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from flywheel.learner.advantages import Scored
from flywheel.learner.batching import collate
from flywheel.learner.credit import Transition
from flywheel.learner.trainer import PolicyTrainer, TrainerConfig

VOCAB = 32
TINY = TrainerConfig(compile=False, lora_rank=4, lora_alpha=8, dtype="float32")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=31, tie_word_embeddings=True,
                         initializer_range=0.1)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    """Logits of tens (a scaled, untied LM head), so the final softcapping at 30 bends them a lot."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          max_position_embeddings=64, sliding_window=16, pad_token_id=0, bos_token_id=1,
                          eos_token_id=31, tie_word_embeddings=False, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    path = tmp_path_factory.mktemp("tiny-gemma2")
    model.save_pretrained(path)
    return str(path)


def item(prompt: list[int], completion: list[int], temperature: float = 1.0, advantage: float = 1.0) -> Scored:
    return Scored(Transition(episode_id="e", task_id="t", agent="tiny", seq=0, adapter="tiny-v0",
                             prompt_ids=tuple(prompt), completion_ids=tuple(completion),
                             behavior_logprobs=(-1.0,) * len(completion), temperature=temperature, reward=0.0),
                  advantage)


# one micro-batch: prompts of 2, 5 and 3 tokens, completions of 4, 1 and 3, three temperatures
ITEMS = [item([1, 7], [3, 9, 4, 12], 0.7, 1.0), item([1, 5, 8, 2, 6], [11], 1.0, -1.0),
         item([1, 9, 10], [2, 2, 30], 1.3, 0.5)]


def trainer_with_adapter(model_dir: str, config: TrainerConfig = TINY, name: str = "tiny") -> PolicyTrainer:
    """A trainer whose adapter `name` has seeded, non-zero LoRA B (peft starts B at 0: no effect, no A grads)."""
    trainer = PolicyTrainer(model_dir, config)
    torch.manual_seed(1)
    trainer.ensure_adapter(name)
    with torch.no_grad():
        for param_name, param in trainer.model.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.normal_(std=0.1)
    return trainer


def lora_params(trainer: PolicyTrainer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}


def full_forward_logprobs(trainer: PolicyTrainer, items: list[Scored]) -> list[list[float]]:
    """log_softmax(logits / temperature) of the model's full forward, one unpadded item at a time."""
    out = []
    with torch.no_grad():
        for s in items:
            t = s.transition
            ids_1L = torch.tensor([t.prompt_ids + t.completion_ids])
            logits_LV = trainer.model(input_ids=ids_1L).logits[0].float() / t.temperature
            logp_LV = torch.log_softmax(logits_LV, dim=-1)
            positions = torch.arange(len(t.prompt_ids) - 1, len(t.prompt_ids) - 1 + len(t.completion_ids))
            out.append(logp_LV[positions, torch.tensor(t.completion_ids)].tolist())
    return out


def assert_lists_close(actual: list[list[float]], expected: list[list[float]], atol: float) -> None:
    assert [len(row) for row in actual] == [len(row) for row in expected]
    flat = [torch.tensor(lp) for row in actual for lp in row], [torch.tensor(lp) for row in expected for lp in row]
    torch.testing.assert_close(torch.stack(flat[0]), torch.stack(flat[1]), atol=atol, rtol=0)


def test_resume_takes_the_configured_lr_and_weight_decay_and_keeps_the_moments(tiny_llama, tmp_path):
    trainer = trainer_with_adapter(tiny_llama, dataclasses.replace(TINY, lr=1e-3))
    trainer.update("tiny", ITEMS)
    saved = trainer.save("tiny", tmp_path / "v1")
    saved_state = trainer.optimizers["tiny"].state_dict()["state"]

    resumed = PolicyTrainer(tiny_llama, dataclasses.replace(TINY, lr=5e-2, weight_decay=0.1))
    resumed.ensure_adapter("tiny", resume_from=str(saved))
    optimizer = resumed.optimizers["tiny"]
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(5e-2, 0.1)]
    state = optimizer.state_dict()["state"]
    assert state and state.keys() == saved_state.keys()
    for key, moments in saved_state.items():
        torch.testing.assert_close(state[key]["exp_avg"], moments["exp_avg"])
        torch.testing.assert_close(state[key]["exp_avg_sq"], moments["exp_avg_sq"])


def test_the_model_and_micro_batches_go_to_the_configured_device(tiny_llama):
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert PolicyTrainer(tiny_llama, TINY).device == expected
    trainer = PolicyTrainer(tiny_llama, dataclasses.replace(TINY, device="cpu"))
    assert trainer.device == torch.device("cpu")
    assert {p.device for p in trainer.model.parameters()} == {torch.device("cpu")}

    mb = collate(ITEMS, pad_id=0)
    moved = mb.to(torch.device("meta"))
    tensor_fields = [f.name for f in dataclasses.fields(mb) if isinstance(getattr(mb, f.name), torch.Tensor)]
    assert tensor_fields and {getattr(moved, name).device.type for name in tensor_fields} == {"meta"}
    assert moved.prompt_len == mb.prompt_len and mb.input_ids_BL.device.type == "cpu"  # a new micro-batch
    assert mb.to(torch.device("cpu")).input_ids_BL is mb.input_ids_BL  # no copy where it already is


@pytest.mark.parametrize("checkpointing", [False, True])  # the recompute in the backward needs autocast too
def test_bf16_base_with_fp32_adapters_scores_and_updates_under_autocast(tiny_llama, checkpointing):
    fp32 = trainer_with_adapter(tiny_llama)
    bf16 = trainer_with_adapter(tiny_llama, dataclasses.replace(TINY, dtype="bfloat16",
                                                                gradient_checkpointing=checkpointing))
    assert bf16.model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in lora_params(bf16).values()} == {torch.float32}
    assert_lists_close(bf16.score("tiny", ITEMS), fp32.score("tiny", ITEMS), atol=0.1)  # bf16's precision
    stats = bf16.update("tiny", ITEMS)
    assert stats.grad_norm > 0 and torch.isfinite(torch.tensor(stats.loss))
    assert {p.dtype for p in lora_params(bf16).values()} == {torch.float32}


def update_recorded(model_dir: str, checkpointing: bool, compiled: bool = False):
    """One update: its stats, the LoRA gradients before the step, the weights after it, and how many
    tensors autograd kept for the backward outside checkpointed layers."""
    config = TrainerConfig(compile=compiled, lora_rank=4, lora_alpha=8, dtype="float32", lr=1e-2,
                           gradient_checkpointing=checkpointing)
    trainer = trainer_with_adapter(model_dir, config)
    assert trainer.compiled == compiled
    assert trainer.model.base_model.model.is_gradient_checkpointing == checkpointing
    grads, saved = {}, []

    def keep_grads(done, total):
        grads.update({n: p.grad.clone() for n, p in lora_params(trainer).items()})

    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        stats = trainer.update("tiny", ITEMS, progress=keep_grads)
    return stats, grads, {n: p.detach().clone() for n, p in lora_params(trainer).items()}, len(saved)


def test_gradient_checkpointing_gives_the_same_loss_gradients_and_update(tiny_llama):
    plain, plain_grads, plain_weights, plain_saved = update_recorded(tiny_llama, checkpointing=False)
    ckpt, ckpt_grads, ckpt_weights, ckpt_saved = update_recorded(tiny_llama, checkpointing=True)
    assert ckpt_saved < plain_saved / 2  # the layers' activations were not kept: checkpointing ran
    assert ckpt.loss == pytest.approx(plain.loss, abs=1e-6)
    assert ckpt.grad_norm == pytest.approx(plain.grad_norm, abs=1e-5) and plain.grad_norm > 0
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) == 2 * 2 * 7  # A and B, 2 layers x 7 linears
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-5, rtol=0)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(ckpt_weights[name], weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_the_same_loss_gradients_and_update(tiny_llama, checkpointing):
    from torch._dynamo.utils import counters

    plain, plain_grads, plain_weights, _ = update_recorded(tiny_llama, checkpointing)
    graphs = counters["stats"]["unique_graphs"]
    compiled, compiled_grads, compiled_weights, _ = update_recorded(tiny_llama, checkpointing, compiled=True)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo did compile the blocks
    assert compiled.loss == pytest.approx(plain.loss, abs=1e-6)
    assert compiled.grad_norm == pytest.approx(plain.grad_norm, abs=1e-5) and plain.grad_norm > 0
    assert compiled_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=0)
    for name, weight in plain_weights.items():  # AdamW's first step is lr g/|g|: 1e-2 x rounding where g ~ 0
        torch.testing.assert_close(compiled_weights[name], weight, atol=1e-4, rtol=0)


def test_logprobs_equal_a_full_forward_with_log_softmax(tiny_llama):
    trainer = trainer_with_adapter(tiny_llama)
    assert trainer._lm_head_weight is not None  # a plain LM head: log-probs from the hidden states, chunked
    assert_lists_close(trainer.score("tiny", ITEMS), full_forward_logprobs(trainer, ITEMS), atol=1e-5)


def test_blocked_lm_head_log_probs_give_the_models_own_loss_gradients(tiny_llama):
    trainer = trainer_with_adapter(tiny_llama)
    mb = collate(ITEMS, trainer.pad_id)
    weights_BT = torch.randn(mb.completion_ids_BT.shape, generator=torch.Generator().manual_seed(2))
    grads, entropies = [], []
    for head in (trainer._lm_head_weight, None):  # a block at a time from the hidden states; the model's own forward
        trainer._lm_head_weight = head
        logp_BT, entropy_BT, _ = trainer.completion_logprobs(mb, with_entropy=True)
        (logp_BT * weights_BT * mb.completion_mask_BT).sum().backward()
        grads.append({n: p.grad.clone() for n, p in lora_params(trainer).items()})
        entropies.append(entropy_BT[mb.completion_mask_BT.bool()])
        trainer.model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(entropies[0], entropies[1], atol=1e-5, rtol=0)


def test_step_kl_from_kept_hidden_states_equals_the_kl_of_kept_log_probs(tiny_llama):
    """The two ways the update keeps the policy before its step (hidden states for a plain head,
    else the log-probs) measure the same KL once the adapter moves."""
    trainer = trainer_with_adapter(tiny_llama)
    mb = collate(ITEMS, trainer.pad_id)
    head = trainer._lm_head_weight

    def kept_both():
        kept = []
        for trainer._lm_head_weight in (head, None):
            kept.append(trainer.completion_logprobs(mb, with_entropy=False, keep=True)[2])
        return kept

    before = kept_both()
    with torch.no_grad():
        for p in lora_params(trainer).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    after = kept_both()
    trainer._lm_head_weight = head
    kl_plain_N = trainer._step_kl_N(before[0], after[0])
    kl_full_N = trainer._step_kl_N(before[1], after[1])
    assert before[0].hidden_ND is not None and before[1].logp_NV is not None
    torch.testing.assert_close(kl_plain_N, kl_full_N, atol=1e-5, rtol=1e-4)
    assert kl_full_N.max() > 1e-3


def test_logprobs_keep_the_models_own_logit_processing(tiny_gemma2):
    trainer = trainer_with_adapter(tiny_gemma2)
    assert trainer._lm_head_weight is None  # softcapped logits: only the model's own forward gives them
    reference = full_forward_logprobs(trainer, ITEMS)
    assert_lists_close(trainer.score("tiny", ITEMS), reference, atol=1e-4)

    inner = trainer.model.base_model.model  # the LM head alone, as before: no softcapping
    mb = collate(ITEMS, trainer.pad_id)
    with torch.no_grad():
        hidden_BLH = inner.model(input_ids=mb.input_ids_BL, attention_mask=mb.attention_mask_BL,
                                 position_ids=mb.position_ids_BL).last_hidden_state
        T = mb.completion_ids_BT.shape[1]
        logits_BTV = inner.lm_head(hidden_BLH[:, mb.prompt_len - 1: mb.prompt_len - 1 + T])
        logits_BTV = logits_BTV / mb.temperature_B[:, None, None]
        raw_BT = torch.log_softmax(logits_BTV, -1).gather(-1, mb.completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    raw = [raw_BT[row, :len(s.transition.completion_ids)].tolist() for row, s in enumerate(ITEMS)]
    with pytest.raises(AssertionError):
        assert_lists_close(raw, reference, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_cuda_scores_and_updates(tiny_llama):
    config = dataclasses.replace(TINY, dtype="bfloat16", device="cuda", gradient_checkpointing=True)
    trainer = trainer_with_adapter(tiny_llama, config)
    assert {(p.device.type, p.dtype) for p in lora_params(trainer).values()} == {("cuda", torch.float32)}
    before = trainer.score("tiny", ITEMS)
    assert all(isinstance(lp, float) for row in before for lp in row)
    stats = trainer.update("tiny", ITEMS)
    assert stats.grad_norm > 0 and trainer.score("tiny", ITEMS) != before
