"""Imputation wall time and peak memory: snvbert against Beagle 5.4 and Minimac4, side by side.

``python -m snvbert.bench.impute [OUT_DIR] [--size 5mb] [--threads 2] [--targets N]`` prints a
table and writes ``OUT_DIR/impute.json`` (``impute-N.json`` with ``--targets``).

The bench case is DESIGN's 5 Mb scenario (seed 1: 2,000 panel haplotypes, 100 target people,
or ``--targets``, 40,450 imputed sites, a clean phased array), simulated here. snvbert's model
is trained briefly on it once (``experiment=accuracy``, a few batches: enough for timing, not
for accuracy; reused while the configs it was trained from are unchanged). Every tool runs as
its own process, one after the other on the same files with the same thread count, timed from
start to exit (start-up included) and measured for peak resident memory (``os.wait4``). snvbert runs twice: first with an empty panel
cache (the VCF is parsed and cached) and then reusing it; the classical HMM of
:mod:`snvbert.hmm.imputer` (the README's baseline column, over the IBS-selected states) and
Minimac4 (its reference compressed first, timed apart) run beside them. Ratios are to Beagle's
wall time in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from snvbert.bench.accuracy import beagle_imputation, minimac4_imputation
from snvbert.errors import SnvbertError
from snvbert.utils.io import atomic_path

TRAIN_OVERRIDES = [
    "experiment=accuracy",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=2",
]


def measure(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` to completion (output to ``log_path``): wall seconds and peak RSS (MiB)."""
    started = time.perf_counter()
    with open(log_path, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SnvbertError(f"`{' '.join(cmd)}` failed ({proc.returncode}); see {log_path}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _recipe() -> str:
    """What the timing model is trained from: the overrides and every config file they read."""
    h = hashlib.sha256(" ".join(TRAIN_OVERRIDES).encode())
    conf = files("snvbert.conf")
    groups = [conf, *(d for d in conf.iterdir() if d.is_dir())]
    for path in sorted((f for d in groups for f in d.iterdir()), key=lambda f: str(f)):
        if path.name.endswith(".yaml"):
            h.update(path.read_bytes())
    return h.hexdigest()


def _checkpoint(sim: Path, out: Path) -> Path:
    """The briefly trained timing model: reused while its recipe (configs, overrides) holds."""
    ckpt = out / "train" / "checkpoints" / "last.ckpt"
    recipe = out / "train" / "recipe.sha256"
    if ckpt.exists() and recipe.exists() and recipe.read_text() == _recipe():
        return ckpt
    shutil.rmtree(out / "train", ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "snvbert.train",
        *TRAIN_OVERRIDES,
        f"data.panel={sim / 'panel.vcf.gz'}",
        f"paths.output_dir={out / 'train'}",
        f"hydra.run.dir={out / 'train'}",
        f"paths.cache_dir={out / 'train-cache'}",
    ]
    measure(cmd, out / "train.log")
    recipe.write_text(_recipe())
    return ckpt


def run(
    out_dir: str | Path,
    *,
    size: str = "5mb",
    seed: int = 1,
    threads: int = 2,
    targets: int | None = None,
) -> dict:
    """The side-by-side run; ``targets`` target people instead of the preset's (its own
    simulation, timing model and JSON, ``impute-<targets>.json``)."""
    from snvbert.simulate import simulate

    tag = "" if targets is None else f"-{targets}"
    out = Path(out_dir) / f"impute{tag}"
    out.mkdir(parents=True, exist_ok=True)
    sim = out / "sim" / f"{size}-seed{seed}"
    simulate(sim, seed, size, targets=targets)
    panel, array, gmap = sim / "panel.vcf.gz", sim / "array.vcf.gz", sim / "map.plink"
    ckpt = _checkpoint(sim, out)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    py = [sys.executable, "-m"]
    rows: dict[str, dict[str, Any]] = {}

    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    snvbert = [
        *py,
        "snvbert.impute",
        f"ckpt={ckpt}",
        f"panel={panel}",
        f"target={array}",
        f"cache_dir={cache}",
        f"threads={threads}",
        "progress=false",
    ]
    rows["snvbert (panel cache built)"] = measure(
        [*snvbert, f"out={out / 'snvbert-cold.vcf.gz'}"], out / "snvbert-cold.log", env
    )
    rows["snvbert (panel cache reused)"] = measure(
        [*snvbert, f"out={out / 'snvbert.vcf.gz'}"], out / "snvbert.log", env
    )
    hmm = (
        "from snvbert.hmm import IBSConfig, kernel; from snvbert.hmm.imputer import impute_hmm; "
        f"kernel.set_threads({threads}); import torch; torch.set_num_threads({threads}); "
        f"impute_hmm({str(panel)!r}, {str(array)!r}, {str(out / 'hmm.vcf.gz')!r}, "
        f"genetic_map={str(gmap)!r}, ibs=IBSConfig(), cache_dir={str(cache)!r}, progress=False)"
    )
    rows["Li–Stephens HMM alone (IBS states)"] = measure(
        [sys.executable, "-c", hmm], out / "hmm.log", env
    )
    beagle = shutil.which("beagle")
    if beagle:
        rows["Beagle 5.4"] = measure(
            beagle_imputation(beagle, panel, array, gmap, out / "beagle", threads),
            out / "beagle.log",
        )
    minimac4 = shutil.which("minimac4")
    if minimac4:
        msav = out / "panel.msav"
        rows["Minimac4 (compress reference)"] = measure(
            [minimac4, "--compress-reference", str(panel), "-o", str(msav)],
            out / "minimac4-compress.log",
        )
        rows["Minimac4"] = measure(
            minimac4_imputation(minimac4, msav, array, out / "minimac4.vcf.gz", threads),
            out / "minimac4.log",
        )
    base = rows.get("Beagle 5.4", {}).get("seconds")
    for row in rows.values():
        row["ratio_to_beagle"] = round(row["seconds"] / base, 2) if base else None
    result = {
        "case": f"{size} seed {seed}{'' if targets is None else f', {targets} targets'}: {sim}",
        "threads": threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "checkpoint": str(ckpt),
        "rows": rows,
    }
    print(f"imputation, {result['case']}, {threads} threads (start-up included)")
    print(f"{'tool':38s} {'wall s':>8s} {'x Beagle':>9s} {'peak RSS MiB':>13s}")
    for name, row in rows.items():
        ratio = "" if row["ratio_to_beagle"] is None else f"{row['ratio_to_beagle']:.2f}"
        print(f"{name:38s} {row['seconds']:8.1f} {ratio:>9s} {row['peak_rss_mib']:13.0f}")
    with atomic_path(Path(out_dir) / f"impute{tag}.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="outputs/bench")
    parser.add_argument("--size", default="5mb")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--targets", type=int, default=None, help="target people (default: the preset's)"
    )
    args = parser.parse_args()
    run(args.out_dir, size=args.size, seed=args.seed, threads=args.threads, targets=args.targets)


if __name__ == "__main__":
    main()
