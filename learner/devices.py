"""What runs fast where: bf16 only where the hardware has it, torch.compile where it can build.

On a CPU without AVX512-BF16 or AMX (AVX2 machines, many AMD EPYCs) torch and vLLM emulate
bf16 matmuls: measured on such a 2-core VM, a SmolLM2-135M forward and backward over 604
tokens took 113 s in bf16 and 8.7 s in fp32. There `auto` means float32.
"""

from __future__ import annotations

import os
import shutil


def fast_bf16(device_type: str) -> bool:
    """True on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16 or AMX)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                   "_is_amx_tile_supported"))


def resolve_dtype(dtype: str, device_type: str) -> str:
    """"auto" -> "bfloat16" where it is fast, else "float32"; an explicit choice stays."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16(device_type) else "float32"


def compile_unavailable(device_type: str) -> str:
    """Why torch.compile's inductor cannot build kernels for `device_type` here ("" = it can):
    on the CPU it compiles C++ (a compiler must be on PATH; $CXX names one), on CUDA Triton."""
    if device_type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        return "" if shutil.which(compiler) else f"no C++ compiler ({compiler}) on PATH"
    from torch.utils._triton import has_triton

    return "" if has_triton() else "Triton is not installed"
