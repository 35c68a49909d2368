"""One package: everything installs under `flywheel.*`, and a user's folders cannot shadow it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flywheel.store.db import Store

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("cli", "proxy", "store", "protos", "learner", "vllm_plugin")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the tree (the checkout itself stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for room in ROOMS:
        shutil.copytree(REPO / room, source / room, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True)
    [built] = out.glob("*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_only_the_flywheel_package_and_its_metadata(wheel):
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    [dist_info] = tops - {"flywheel"}
    assert tops == {"flywheel", dist_info} and dist_info.startswith("flywheel_rl-")
    names = set(wheel.namelist())
    for module in ("__init__.py", "__main__.py", "commands.py", "proxy/app.py", "proxy/routes/completions.py",
                   "store/schema.py", "protos/flywheel_pb2.py", "protos/flywheel.proto", "learner/trainer.py",
                   "proxy/ui/index.html", "proxy/ui/app.js", "proxy/ui/style.css",
                   "vllm_plugin/lora_ops.py"):
        assert f"flywheel/{module}" in names, module


def test_the_command_and_the_vllm_plugin_point_into_the_package(wheel):
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "flywheel = flywheel.commands:main" in text
    assert "flywheel_lora_cpu = flywheel.vllm_plugin:register" in text


def test_a_users_own_store_and_proxy_folders_do_not_shadow_ours(tmp_path):
    for name in ("store", "proxy", "protos", "learner"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name}')\n")
    db = tmp_path / "flywheel.duckdb"
    Store(str(db)).close()
    done = subprocess.run([sys.executable, "-m", "flywheel", "sql", "SELECT count(*) AS n FROM episodes",
                           "--db", str(db), "--format", "csv"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["n", "0"]
