"""Regenerate the fenced protobuf package ``loops_sdk/_proto`` from ``proto/loops/v1/*.proto``.

Run ``python proto/generate.py`` after editing a ``.proto`` file (needs the pinned
``grpcio-tools`` from the ``test`` extra). ``python proto/generate.py --check`` regenerates into a
temporary directory and exits 1 if the committed package differs; ``tests/test_proto_sync.py``
does the same.

protoc writes ``from loops.v1 import x_pb2``; the generated modules live inside ``loops_sdk``,
so those imports are rewritten to package-relative ones. That rewrite is part of generation, so
the output is still never edited by hand.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "loops_sdk" / "_proto"
HEADER = "# GENERATED — DO NOT EDIT. Run `python proto/generate.py` to regenerate from proto/.\n"
INIT = HEADER + '"""Generated protobuf and gRPC modules for the loops.v1 wire contracts."""\n'
_IMPORT = re.compile(r"^from loops\.v1 import (\w+) as (\w+)$", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # imported here: only needed by developers
    import importlib.resources

    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.glob("loops/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = str(importlib.resources.files("grpc_tools") / "_proto")
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "loops" / "v1").iterdir()):
            text = _IMPORT.sub(r"from . import \1 as \2", src.read_text())
            dst = out_dir / src.name
            dst.write_text(HEADER + text)
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text(INIT)
        written.append(init)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if loops_sdk/_proto is stale")
    args = parser.parse_args()
    if not args.check:
        for old in OUT_DIR.glob("*_pb2*.py*"):
            old.unlink()
        for path in generate(OUT_DIR):
            print(path.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [p.name for p in fresh if not (OUT_DIR / p.name).exists()
                 or not filecmp.cmp(p, OUT_DIR / p.name, shallow=False)]
        extra = sorted({p.name for p in OUT_DIR.glob("*_pb2*.py*")} - {p.name for p in fresh})
    if stale or extra:
        print(f"loops_sdk/_proto is out of date with proto/: differs {stale}, extra {extra}; "
              "run `python proto/generate.py`", file=sys.stderr)
        return 1
    print("loops_sdk/_proto matches proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
