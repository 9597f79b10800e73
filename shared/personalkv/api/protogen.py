"""Generate (or check) the committed Python stubs of protos/personalkv/v1.

    python -m personalkv.api.protogen            # what `make proto` runs
    python -m personalkv.api.protogen --check    # `make proto-check`: exit 1 when stale

grpc_tools.protoc writes imports after the proto package (``from personalkv.v1 import ...``);
the stubs live in ``personalkv.api.v1`` so they sit inside the installed package, and the
imports are rewritten to match. Descriptor names stay ``personalkv/v1/*.proto`` (what
reflection shows and what clients import). The output depends only on the .proto files and
the grpcio-tools version, so a check on another machine sees the same bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE_DIR = PROTO_ROOT / "personalkv" / "v1"
OUT_DIR = Path(__file__).resolve().parent / "v1"
_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto into `out_dir` (flat), imports fixed; returns the files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_PACKAGE_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_PACKAGE_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]  # fmt: skip
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed (see above)")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "personalkv" / "v1").iterdir()):
            text = src.read_text().replace("from personalkv.v1 import", "from personalkv.api.v1 import")
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    return written


def stale_files(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of generated files that differ from a fresh generation, or are missing/extra."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name for p in generate(Path(tmp))}
        committed = {p.name for p in out_dir.iterdir() if p.name.endswith(_SUFFIXES)}
        stale = sorted(committed ^ fresh)
        stale += sorted(
            n for n in fresh & committed
            if not filecmp.cmp(Path(tmp) / n, out_dir / n, shallow=False)
        )  # fmt: skip
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personalkv.api.protogen")
    parser.add_argument("--check", action="store_true", help="fail when committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs in {OUT_DIR}: {', '.join(stale)}; run `make proto`",
                  file=sys.stderr)
            return 1
        print("generated stubs are fresh")
        return 0
    for path in generate(OUT_DIR):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
