"""``make bench``: the quick benchmarks, each printing a table and writing JSON under outputs/bench/."""

from __future__ import annotations

import sys
from pathlib import Path

from snvbert.bench import encoder, impute, ingest, retrieval


def main(out_dir: Path) -> None:
    for name, bench in (
        ("impute", impute),
        ("ingest", ingest),
        ("retrieval", retrieval),
        ("encoder", encoder),
    ):
        print(f"\n=== {name} ===", flush=True)
        bench.run(out_dir)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/bench"))
