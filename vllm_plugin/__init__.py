"""Flywheel's vLLM plugin: loaded only by vLLM, in each of its processes, never by Flywheel itself.

vLLM finds `register` through the `vllm.general_plugins` entry point (pyproject.toml) and calls
it at start-up; it swaps the grouped CPU LoRA matmuls of `lora_ops` into vLLM's CPU punica
wrapper, its `add_lora_linear` (every LoRA linear layer's call) for two matmuls per call, and
skips its `add_lora_logits` where no adapter in the batch trains the LM head; on a CPU
platform, it runs a LoRA linear layer on a merged weight where the whole batch has one adapter.
FLYWHEEL_VLLM_LORA_OPS=0 turns it off. Imports torch and vLLM only (both are there wherever
vLLM runs); nothing else of Flywheel.
"""

from __future__ import annotations

import os


def register() -> None:
    """vLLM general-plugin entry point: swap the grouped ops into the CPU punica wrapper."""
    if os.environ.get("FLYWHEEL_VLLM_LORA_OPS", "1") == "0":
        return
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the CPU LoRA path: nothing to fix
        return
    from flywheel.vllm_plugin.lora_ops import OPS, add_lora_linear, merged_apply_sync, skipping_dead_logits

    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
    wrapper = punica_cpu.PunicaWrapperCPU
    wrapper.add_lora_linear = add_lora_linear
    # vLLM's own method, kept from the first call so that registering twice wraps it once
    if not hasattr(wrapper, "vllm_add_lora_logits"):
        wrapper.vllm_add_lora_logits = wrapper.add_lora_logits
    wrapper.add_lora_logits = skipping_dead_logits(wrapper.vllm_add_lora_logits)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():  # the merged weights are CPU linears
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA as layer

        if not hasattr(layer, "vllm_apply_sync"):
            layer.vllm_apply_sync = layer._apply_sync
        layer._apply_sync = merged_apply_sync(layer.vllm_apply_sync)
    from vllm.logger import init_logger

    init_logger("vllm.flywheel_lora_ops").info("Flywheel: grouped LoRA matmuls installed in vLLM's CPU LoRA path")
