"""Regenerate the Python code of the wire contract from the .proto sources.

Run `python protos/generate.py` after editing a .proto file; a test fails when
the checked-in code is stale. The output depends on the grpcio-tools version,
which the `dev` extra pins.
"""
from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = ["kvstore_proto/v1/kvstore.proto"]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / source),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {source}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
