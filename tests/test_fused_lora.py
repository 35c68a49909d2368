"""The fused LoRA forward computes peft's function: same outputs, same gradients."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from flywheel.learner import fused_lora


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40, bias=False)
        self.down = nn.Linear(40, 24, bias=True)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair(base_dtype: torch.dtype, dropout: float = 0.0):
    torch.manual_seed(0)
    base = TwoLayers().to(base_dtype).requires_grad_(False)
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["up", "down"],
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    fused = copy.deepcopy(model)
    assert fused_lora.install(fused) == 2
    return model, fused


def _run(model, x, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.float(), grads


@pytest.mark.parametrize("base_dtype, autocast, tolerance", [(torch.float32, False, 1e-5),
                                                             (torch.bfloat16, True, 3e-2)])
def test_outputs_and_gradients_match_peft(base_dtype, autocast, tolerance, monkeypatch):
    peft_model, fused = _pair(base_dtype)
    x = torch.randn(3, 7, 24).to(base_dtype)
    y_peft, grads_peft = _run(peft_model, x, autocast)
    from peft.tuners.lora.layer import Linear

    monkeypatch.setattr(Linear, "forward", lambda *a, **k: pytest.fail("fell back to peft's forward"))
    y_fused, grads_fused = _run(fused, x, autocast)
    scale = y_peft.abs().max()
    assert (y_fused - y_peft).abs().max() <= tolerance * scale
    assert grads_peft.keys() == grads_fused.keys() and len(grads_peft) == 4  # A and B of both layers
    for name, grad in grads_peft.items():
        assert (grads_fused[name] - grad).abs().max() <= tolerance * grad.abs().max(), name


def test_disabled_adapters_and_dropout_are_peft_s_own():
    peft_model, fused = _pair(torch.float32, dropout=0.5)
    x = torch.randn(2, 5, 24)
    with peft_model.disable_adapter(), fused.disable_adapter():
        assert torch.equal(peft_model(x), fused(x))  # the base model alone
    peft_model.eval(), fused.eval()  # dropout off: then equal again
    assert torch.allclose(peft_model(x), fused(x), atol=1e-5)
    fused.train()
    torch.manual_seed(1)
    first = fused(x)
    torch.manual_seed(1)
    assert torch.equal(first, fused(x)) and not torch.allclose(first, peft_model(x), atol=1e-5)
