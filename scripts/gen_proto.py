"""Regenerate the Python code for the wire contract in proto/.

    python scripts/gen_proto.py            # write into services/inferencehub/protocol/
    python scripts/gen_proto.py --out DIR  # write elsewhere (the drift test uses this)

proto/ is mapped to the import path ``inferencehub/protocol``, so the generated
modules import each other as ``inferencehub.protocol....`` with no fix-ups.
Type stubs (.pyi) are generated next to the modules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SERVICES_DIR = ROOT / "services"
IMPORT_PREFIX = "inferencehub/protocol"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [f"{IMPORT_PREFIX}/{p.relative_to(PROTO_DIR).as_posix()}" for p in proto_files()]
    args = [
        "protoc",
        f"-I{IMPORT_PREFIX}={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Each generated folder is a regular package.
    for module in (out / IMPORT_PREFIX).rglob("*_pb2.py"):
        package = module.parent
        while package != out / IMPORT_PREFIX:
            (package / "__init__.py").touch()
            package = package.parent
        (package / "__init__.py").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=SERVICES_DIR, help="root folder to write inferencehub/protocol/ under"
    )
    out = parser.parse_args().out
    generate(out)
    print(f"generated {len(proto_files())} proto file(s) into {out / IMPORT_PREFIX}", file=sys.stderr)


if __name__ == "__main__":
    main()
