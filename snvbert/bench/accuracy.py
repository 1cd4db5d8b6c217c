"""``python -m snvbert.bench.accuracy``: snvbert against Beagle 5.4 and Minimac4 on a simulation.

::

    python -m snvbert.bench.accuracy                      # DESIGN's 5 Mb scenario (long)
    python -m snvbert.bench.accuracy --size demo --train-minutes 5
    python -m snvbert.bench.accuracy --skip-train RUN/checkpoints/last.ckpt

Two cases, one seed (so one panel and one truth):

- **clean**: the array is the truth at the typed sites, phased;
- **realistic**: 0.5 % genotype errors, 1 % missing calls, unphased. Beagle phases and imputes
  it in one run; snvbert, Minimac4 and the HMMs get the array phased by Beagle
  (``impute=false``), as a user would run them.

Two Li–Stephens HMM references (:mod:`snvbert.hmm.imputer`): ``hmm`` over every panel haplotype, and
``hmm_ibs`` over the ones Beagle's IBS selection keeps, the states of snvbert's HMM feature at
imputation from panels of more than 1,600 haplotypes (the 5 Mb ones); the table shows what the
network adds beyond them.

snvbert is trained on the clean simulation's panel within a time budget. Everything is scored
in one :func:`snvbert.evaluate.evaluate` call per case (bootstrap intervals over target people),
and the wall time of each step is reported. Writes ``accuracy.json`` and, per case, the
evaluation's JSON and plots under ``--out`` (default ``outputs/bench/accuracy``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from snvbert.errors import SnvbertError
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import atomic_path

log = logging.getLogger("snvbert.bench.accuracy")

REALISTIC_ARRAY = {"error_rate": 0.005, "missing_rate": 0.01, "phased": False}
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _run(cmd: list[str], log_path: Path) -> float:
    """Run a tool, its output to ``log_path``; wall seconds. A failure names the log."""
    started = time.perf_counter()
    with open(log_path, "w") as sink:
        code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SnvbertError(f"`{' '.join(cmd)}` failed with exit code {code}; see {log_path}")
    return time.perf_counter() - started


def beagle_imputation(
    beagle: str, ref: Path, gt: Path, gmap: Path, out: Path, threads: int
) -> list[str]:
    """Beagle 5.4's command line imputing ``gt`` against ``ref`` (writes ``out``.vcf.gz)."""
    return [beagle, f"ref={ref}", f"gt={gt}", f"map={gmap}", f"out={out}", f"nthreads={threads}"]


def minimac4_imputation(
    minimac4: str, msav: Path, query: Path, out: Path, threads: int
) -> list[str]:
    """Minimac4's command line imputing the phased ``query`` against the compressed ``msav``."""
    return [
        minimac4,
        str(msav),
        str(query),
        "-o",
        str(out),
        "-O",
        "vcf.gz",
        "-f",
        "GT,DS,GP",
        "-t",
        str(threads),
    ]


def _dd_hh_mm_ss(minutes: float) -> str:
    """Lightning's max_time string for a budget in minutes."""
    s = max(1, round(minutes * 60))
    return f"'{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}'"


def train_model(panel: Path, out: Path, minutes: float, overrides: list[str]) -> tuple[Path, float]:
    """Train on ``panel`` for at most ``minutes``; return the best checkpoint and wall seconds.

    Uses ``experiment=accuracy`` when that config exists, else the defaults (model=small);
    ``overrides`` are appended (any Hydra override of the train config).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from snvbert.train import train

    run_dir = out / "train"
    args = [
        f"data.panel={panel}",
        f"paths.root_dir={Path.cwd()}",
        f"paths.log_dir={out}",
        f"paths.output_dir={run_dir}",
        f"paths.cache_dir={out / 'cache'}",
        "trainer.max_epochs=1000",
        f"+trainer.max_time={_dd_hh_mm_ss(minutes)}",
        "test=false",
    ]
    if (CONF_DIR / "experiment" / "accuracy.yaml").exists():
        args.insert(0, "experiment=accuracy")
    args += overrides
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # No Hydra section: every ${hydra:...} path is set explicitly above.
        cfg = compose("train", overrides=args)
    # As a Hydra run would: the run folder keeps the config it was trained with.
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    started = time.perf_counter()
    _, objects = train(cfg)
    seconds = time.perf_counter() - started
    callback = objects["trainer"].checkpoint_callback
    best = Path(callback.best_model_path) if callback and callback.best_model_path else None
    ckpt = best if best and best.exists() else run_dir / "checkpoints" / "last.ckpt"
    # Kept beside the checkpoints, so a later --skip-train run still reports the training time.
    (run_dir / "train_seconds.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    return ckpt, seconds


def _impute_job(job: dict[str, str], threads: int) -> dict[str, Any]:
    """One snvbert imputation in a worker process with its own thread count (torch's and the
    compiled kernels': two processes that each spin up every core's threads run >10x slower)."""
    from snvbert.impute import impute

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return impute(
        job["ckpt"],
        job["panel"],
        job["target"],
        job["out"],
        cache_dir=job["cache_dir"],
        progress=False,
        genetic_map=job["genetic_map"],
        threads=threads,
    )


def simulations(
    out: Path,
    seed: int,
    size: str,
    demography: str | None = None,
    panel_people: int | None = None,
    spacing_bp: int | None = None,
) -> dict[str, Path]:
    """The folders of a run's two simulations, ``clean`` and ``realistic``, under ``out``."""
    tag = f"{size}-seed{seed}" + ("" if demography is None else f"-{demography}")
    tag += "" if panel_people is None else f"-panel{panel_people}"
    tag += "" if spacing_bp is None else f"-{spacing_bp // 1000}kb"
    return {case: out / "sim" / f"{tag}-{case}" for case in ("clean", "realistic")}


def query_file(out: Path, case: str, sim: Path) -> Path:
    """What snvbert, Minimac4 and the HMMs impute: the array, or (realistic) Beagle's phasing of it."""
    return sim / "array.vcf.gz" if case == "clean" else out / case / "phased.vcf.gz"


def run(
    out_dir: str | Path = "outputs/bench/accuracy",
    *,
    seed: int = 1,
    size: str = "5mb",
    demography: str | None = None,
    train_minutes: float = 60.0,
    skip_train: str | Path | None = None,
    threads: int = 2,
    bootstrap: int = 200,
    hmm: bool = True,
    train_overrides: list[str] | None = None,
    panel_people: int | None = None,
    spacing_bp: int | None = None,
    transfer: str | Path | None = None,
) -> dict[str, Any]:
    """The whole benchmark; returns (and writes as ``accuracy.json``) tables and timings.

    ``panel_people`` and ``spacing_bp`` (the arrays' one typed site per that many bp) override
    the size preset's; ``transfer`` a checkpoint trained elsewhere (another scenario), imputing
    both cases beside the model trained here: its paired differences come first.
    """
    from snvbert.evaluate import evaluate, format_table, public
    from snvbert.simulate import simulate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model: dict[str, Any] = {} if demography is None else {"demography": demography}
    if panel_people is not None:
        model["panel"] = int(panel_people)
    spacing = {} if spacing_bp is None else {"spacing_bp": int(spacing_bp)}
    sims = simulations(out, seed, size, demography, panel_people, spacing_bp)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    simulate(sims["clean"], seed, size, array=spacing or None, **model)
    simulate(sims["realistic"], seed, size, array={**REALISTIC_ARRAY, **spacing}, **model)
    times["simulate"] = time.perf_counter() - t0
    panel = sims["clean"] / "panel.vcf.gz"
    cache = out / "cache"

    if skip_train:
        ckpt = Path(skip_train)
        record = ckpt.parent.parent / "train_seconds.json"
        if record.exists():
            times["snvbert_train"] = float(json.loads(record.read_text())["seconds"])
    else:
        ckpt, times["snvbert_train"] = train_model(panel, out, train_minutes, train_overrides or [])
    log.info("checkpoint %s", ckpt)

    beagle = shutil.which("beagle")
    minimac4 = shutil.which("minimac4")
    msav = out / "panel.msav"
    if minimac4:
        times["minimac4_compress_reference"] = _run(
            [minimac4, "--compress-reference", str(panel), "-o", str(msav)],
            out / "minimac4_compress.log",
        )

    results: dict[str, Any] = {
        "seed": seed,
        "size": size,
        "demography": demography or "default",
        "panel_people": panel_people,
        "spacing_bp": spacing_bp,
        "checkpoint": str(ckpt),
        "transfer": None if transfer is None else str(transfer),
        "cases": {},
    }
    # Queries first (the realistic array phased by Beagle), then snvbert imputes both cases at
    # once, one process per case sharing the threads: on a small CPU two single-thread
    # processes get more done than one two-thread process.
    queries: dict[str, Path] = {}
    case_times: dict[str, dict[str, float]] = {case: {} for case in sims}
    for case, sim in sims.items():
        work = out / case
        work.mkdir(exist_ok=True)
        if case == "clean":
            queries[case] = query_file(out, case, sim)
            continue
        if not beagle:
            log.warning("beagle not found: the realistic case needs it for phasing; skipped")
            continue
        case_times[case]["beagle_phasing"] = _run(
            [
                beagle,
                f"gt={sim / 'array.vcf.gz'}",
                f"ref={panel}",
                f"map={sim / 'map.plink'}",
                "impute=false",
                f"out={work / 'phased'}",
                f"nthreads={threads}",
            ],
            work / "beagle_phasing.log",
        )
        subprocess.run(["tabix", "-f", "-p", "vcf", str(work / "phased.vcf.gz")], check=True)
        queries[case] = query_file(out, case, sim)
    models = {"snvbert": ckpt} if transfer is None else {"transfer": transfer, "snvbert": ckpt}
    jobs = {
        (case, name): {
            "ckpt": str(path),
            "panel": str(panel),
            "target": str(query),
            "out": str(out / case / f"{name}.vcf.gz"),
            "cache_dir": str(cache),
            "genetic_map": str(sims[case] / "map.plink"),
        }
        for name, path in models.items()
        for case, query in queries.items()
    }
    workers = max(1, min(len(jobs), threads))
    per_job = max(1, threads // workers)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {key: pool.submit(_impute_job, job, per_job) for key, job in jobs.items()}
        summaries = {key: future.result() for key, future in futures.items()}
    times["snvbert_impute_all_cases"] = time.perf_counter() - started
    for (case, name), summary in summaries.items():
        case_times[case][f"{name}_impute"] = summary["seconds"]
        print(
            f"[{case}] {name}: {summary['sites']['imputed']:,} sites imputed in "
            f"{summary['seconds']:.1f} s ({per_job} thread(s), {workers} jobs in parallel)",
            flush=True,
        )

    for case, query in queries.items():
        sim, work = sims[case], out / case
        array = sim / "array.vcf.gz"
        files: dict[str, Path] = {name: work / f"{name}.vcf.gz" for name in models}
        if beagle:
            # Beagle gets the raw array: in the realistic case it phases and imputes in one run.
            case_times[case]["beagle"] = _run(
                beagle_imputation(
                    beagle, panel, array, sim / "map.plink", work / "beagle", threads
                ),
                work / "beagle.log",
            )
            files["beagle"] = work / "beagle.vcf.gz"
        if minimac4:
            case_times[case]["minimac4"] = _run(
                minimac4_imputation(minimac4, msav, query, work / "minimac4.vcf.gz", threads),
                work / "minimac4.log",
            )
            files["minimac4"] = work / "minimac4.vcf.gz"
        if hmm:
            from snvbert.hmm import IBSConfig
            from snvbert.hmm.imputer import impute_hmm

            started = time.perf_counter()
            impute_hmm(
                panel, query, work / "hmm.vcf.gz", genetic_map=sim / "map.plink", cache_dir=cache
            )
            case_times[case]["hmm"] = time.perf_counter() - started
            files["hmm"] = work / "hmm.vcf.gz"
            # The same HMM over the haplotypes Beagle's IBS selection keeps: the states
            # snvbert's HMM feature uses at imputation from these 2,000-haplotype panels
            # (impute's hmm_states=auto).
            started = time.perf_counter()
            impute_hmm(
                panel,
                query,
                work / "hmm_ibs.vcf.gz",
                genetic_map=sim / "map.plink",
                ibs=IBSConfig(),
                cache_dir=cache,
            )
            case_times[case]["hmm_ibs"] = time.perf_counter() - started
            files["hmm_ibs"] = work / "hmm_ibs.vcf.gz"

        labels = list(files)
        paths = list(files.values())
        scores = evaluate(
            sim / "truth.vcf.gz",
            paths[0],
            panel,
            array,
            compare=paths[1:],
            labels=labels,
            out_dir=work,
            bootstrap=bootstrap,
            cache_dir=cache,
        )
        print(f"\n== {case} array ==", flush=True)
        print(format_table(scores))
        print(
            "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in case_times[case].items()),
            flush=True,
        )
        results["cases"][case] = {"scores": public(scores), "seconds": case_times[case]}
    results["seconds"] = times
    if "snvbert_train" in times:
        print(f"\nsnvbert training: {times['snvbert_train'] / 60:.1f} min", flush=True)
    with atomic_path(out / "accuracy.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"wrote {out / 'accuracy.json'} and per-case evaluate.json, r2_by_maf.png, calibration.png",
        flush=True,
    )
    return results


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snvbert.bench.accuracy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--demography",
        default=None,
        help="a stdpopsim HomSap model id (default: the simulator's, OutOfAfrica_3G09)",
    )
    parser.add_argument(
        "--size", default="5mb", help="simulation size preset: tiny, demo, 5mb, 20mb"
    )
    parser.add_argument(
        "--panel-people", type=int, default=None, help="panel people (default: the preset's)"
    )
    parser.add_argument(
        "--spacing-bp",
        type=int,
        default=None,
        help="arrays of one typed site per this many bp (default: the simulator's 10,000)",
    )
    parser.add_argument(
        "--transfer",
        metavar="CKPT",
        default=None,
        help="also impute with this checkpoint trained elsewhere (scored against the one here)",
    )
    parser.add_argument("--train-minutes", type=float, default=60.0, help="training time budget")
    parser.add_argument(
        "--skip-train", metavar="CKPT", help="use this checkpoint instead of training"
    )
    parser.add_argument("--out", default="outputs/bench/accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument(
        "--no-hmm", action="store_true", help="leave out the Li-Stephens HMM columns"
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for training, e.g. model=tiny"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(
        args.out,
        seed=args.seed,
        size=args.size,
        demography=args.demography,
        train_minutes=args.train_minutes,
        skip_train=args.skip_train,
        threads=args.threads,
        bootstrap=args.bootstrap,
        hmm=not args.no_hmm,
        train_overrides=args.overrides,
        panel_people=args.panel_people,
        spacing_bp=args.spacing_bp,
        transfer=args.transfer,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
