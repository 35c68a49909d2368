"""The embedded default model: built once, verified exactly, rebuilt when damaged."""

import shutil
import time
from pathlib import Path

import pytest

from flywheel.learner.prepare_model import MANIFEST, is_complete, prepare

pytestmark = pytest.mark.vllm  # needs the prepared model, like the vLLM tests


def test_second_prepare_only_verifies(smollm2):
    started = time.monotonic()
    assert str(prepare()) == smollm2
    assert time.monotonic() - started < 10


def test_damage_is_detected_and_rebuilt(smollm2, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(smollm2, copy)
    assert is_complete(copy)
    with (copy / "model.safetensors").open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    assert not is_complete(copy)
    (copy / MANIFEST).unlink()
    assert not is_complete(copy)
    prepare(copy)
    assert is_complete(copy)
    # the conversion is deterministic: the rebuilt files are byte-identical to the cached ones
    assert (copy / MANIFEST).read_text() == (Path(smollm2) / MANIFEST).read_text()
