"""Regenerate flywheel_pb2.py / flywheel_pb2_grpc.py from flywheel.proto: `python -m protos.generate`."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path = HERE) -> None:
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", f"-I{HERE.parent}", f"--python_out={out_dir.parent}",
                        f"--grpc_python_out={out_dir.parent}", str(HERE / "flywheel.proto")])
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
