"""Regenerate flywheel_pb2.py / flywheel_pb2_grpc.py from flywheel.proto: `python -m flywheel.protos.generate`.

protoc names the generated imports after the .proto file's path under its include root, so the
file is compiled as `flywheel/protos/flywheel.proto` in a scratch tree: the stub then imports
`from flywheel.protos import flywheel_pb2`, the installed package's name.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("flywheel_pb2.py", "flywheel_pb2_grpc.py")


class ProtocError(RuntimeError):
    """grpc_tools' protoc failed on flywheel.proto."""


def generate(out_dir: Path = HERE) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / "flywheel" / "protos"
        package.mkdir(parents=True)
        shutil.copy(HERE / "flywheel.proto", package / "flywheel.proto")
        code = protoc.main(["grpc_tools.protoc", f"-I{scratch}", f"--python_out={scratch}",
                            f"--grpc_python_out={scratch}", str(package / "flywheel.proto")])
        if code != 0:
            raise ProtocError(f"protoc failed with {code}")
        for name in GENERATED:
            shutil.copy(package / name, Path(out_dir) / name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
