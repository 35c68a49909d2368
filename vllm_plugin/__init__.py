"""Flywheel's vLLM plugin: loaded only by vLLM, in each of its processes, never by Flywheel itself.

vLLM finds `register` through the `vllm.general_plugins` entry point (pyproject.toml) and calls
it at start-up; it swaps the grouped CPU LoRA matmuls of `lora_ops` into vLLM's CPU punica
wrapper. FLYWHEEL_VLLM_LORA_OPS=0 turns it off. Imports torch and vLLM only (both are there
wherever vLLM runs); nothing else of Flywheel.
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
    from flywheel.vllm_plugin.lora_ops import OPS

    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
    from vllm.logger import init_logger

    init_logger("vllm.flywheel_lora_ops").info("Flywheel: grouped LoRA matmuls installed in vLLM's CPU LoRA path")
