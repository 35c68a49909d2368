"""The loss: hand-computed cases for each piece, and equality with TRL's GRPOTrainer code."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from flywheel.learner.loss import (LossConfig, Normalizer, aggregate, k3_kl, per_token_loss, policy_kl,
                                   truncated_is_weight)


def test_clipping_takes_the_pessimistic_term():
    old_BT = torch.zeros(2, 2)
    logp_BT = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))  # ratios 1.5 and 0.5
    advantages_B = torch.tensor([1.0, -1.0])
    loss_BT, clipped_BT = per_token_loss(logp_BT, old_BT, advantages_B, LossConfig(epsilon=0.2, epsilon_high=0.28))
    # A>0: min(1.5, 1.28) = 1.28 -> clipped; min(0.5, 0.8) = 0.5. A<0: min(-1.5, -1.28) = -1.5; min(-0.5, -0.8) = -0.8
    torch.testing.assert_close(loss_BT, torch.tensor([[-1.28, -0.5], [1.5, 0.8]]))
    assert clipped_BT.tolist() == [[True, False], [False, True]]


def test_ratio_one_gives_the_policy_gradient():
    logp_BT = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss_BT, _ = per_token_loss(logp_BT, logp_BT.detach(), torch.tensor([2.0]), LossConfig())
    loss_BT.sum().backward()
    torch.testing.assert_close(logp_BT.grad, torch.tensor([[-2.0, -2.0]]))  # d(-ratio*A)/dlogp = -A


def test_k3_kl_and_importance_weight():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    assert k3_kl(logp, ref).item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert k3_kl(logp, logp).item() == 0.0
    weight = truncated_is_weight(torch.tensor([-1.0, 0.0]), torch.tensor([-1.5, -3.0]), cap=2.0)
    torch.testing.assert_close(weight, torch.tensor([math.exp(0.5), 2.0]))


def test_policy_kl_is_exact_over_the_vocabulary():
    before = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))  # (B=1, T=1, V=3)
    after = torch.log(torch.tensor([[[0.25, 0.25, 0.5]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(1.0) + 0.25 * math.log(0.25 / 0.5)
    assert policy_kl(before, after).item() == pytest.approx(expected)  # 0.25 ln 2
    assert policy_kl(before, before).item() == 0.0


def test_kl_is_added_after_the_importance_weight():
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    loss_BT, _ = per_token_loss(logp, logp, torch.tensor([1.0]), LossConfig(beta=0.1),
                                is_weight_BT=torch.tensor([[0.5]]), ref_logp_BT=ref)
    assert loss_BT.item() == pytest.approx(-0.5 + 0.1 * (math.exp(-0.5) + 0.5 - 1))
    with pytest.raises(ValueError):
        per_token_loss(logp, logp, torch.tensor([1.0]), LossConfig(beta=0.1))


def test_aggregations():
    loss_BT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask_BT = torch.tensor([[1, 1, 1], [1, 0, 0]])
    norm = Normalizer(sequences=2, tokens=4, max_completion_len=3)
    assert aggregate(loss_BT, mask_BT, "dapo", norm).item() == pytest.approx(10 / 4)
    assert aggregate(loss_BT, mask_BT, "grpo", norm).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss_BT, mask_BT, "dr_grpo", norm).item() == pytest.approx(10 / 6)
    # micro-batches add up to the batch
    halves = [aggregate(loss_BT[i:i + 1], mask_BT[i:i + 1], "grpo", norm) for i in (0, 1)]
    assert sum(halves).item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        aggregate(loss_BT, mask_BT, "nope", norm)


def _random_batch(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    behaviour = old + 0.2 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    mask[:, 0] = 1
    advantages = torch.randn(B, generator=g)
    return logp, old, behaviour, ref, mask, advantages


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_equals_trl_grpo_trainer_loss(loss_type, beta):
    """Run TRL's own GRPOTrainer._compute_loss on the same tensors (vLLM IS correction on)."""
    trl = pytest.importorskip("trl.trainer.grpo_trainer")
    logp, old, behaviour, ref, mask, advantages = _random_batch()
    is_cap = 2.0
    is_ratio = truncated_is_weight(old, behaviour, is_cap)
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction: x)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=True,
        vllm_importance_sampling_correction=True, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=accelerator, max_completion_length=5,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    inputs = {"prompt_ids": torch.zeros(6, 2, dtype=torch.long), "prompt_mask": torch.ones(6, 2, dtype=torch.long),
              "completion_ids": torch.zeros(6, 5, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "importance_sampling_ratio": is_ratio, "num_items_in_batch": mask.sum()}
    theirs = trl.GRPOTrainer._compute_loss(stub, None, inputs)

    config = LossConfig(epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, beta=beta, is_cap=is_cap)
    loss_BT, _ = per_token_loss(logp, old, advantages, config, is_weight_BT=is_ratio, ref_logp_BT=ref)
    ours = aggregate(loss_BT, mask, loss_type, Normalizer(6, int(mask.sum()), 5))
    torch.testing.assert_close(ours, theirs)
