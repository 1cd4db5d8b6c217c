"""``python -m snvbert.bench.transfer``: one model imputing scenarios it was never trained on.

::

    python -m snvbert.bench.transfer --source outputs/bench/accuracy/train/checkpoints/last.ckpt
    python -m snvbert.bench.transfer --only panel600 array30kb --train-minutes 5
    python -m snvbert.bench.transfer --source other.ckpt --rescore   # reuse a full run's outputs

The source model (``--source``; else one trained here for ``--train-minutes`` on the 5 Mb
scenario, seed 1, OutOfAfrica_3G09: the one ``make bench-accuracy`` tunes on) imputes each
scenario of :data:`SCENARIOS`, each of which differs from the source in one thing: the
demography, the panel's size, the arrays' density. Every scenario is one
:func:`snvbert.bench.accuracy.run` (clean and realistic arrays; Beagle 5.4, Minimac4 and the
HMMs beside it) with the source model given as ``transfer``, so the same evaluation scores it
against a model trained on that scenario itself (``snvbert``: :data:`OWN_RECIPE`, at the
scenario's array density), against
Beagle and against the HMM alone (the one snvbert's HMM feature runs there: over IBS-selected
states above 1,600 reference haplotypes, else over every one), as paired 95 % bootstrap
intervals per MAF bin. Prints the table and writes ``transfer.json`` and ``transfer.md`` (the
README's table) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from snvbert.errors import SnvbertError
from snvbert.evaluate import BIN_LABELS, MAF_BIN_NAMES
from snvbert.hmm import ibs_by_default
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import atomic_path

log = logging.getLogger("snvbert.bench.transfer")

# What the source model is trained on (seed 1 of the 5 Mb scenario, the default demography).
SOURCE = {"size": "5mb", "seed": 1}

# Each scenario differs from the source in one thing; all of them in another seed (another
# panel, map and truth). The 5 Mb preset has 1,000 panel people (2,000 haplotypes), arrays one
# site per 10 kb; demo has 300 (600 haplotypes) over 1 Mb.
SCENARIOS: dict[str, dict[str, Any]] = {
    "demography": {"size": "5mb", "seed": 2, "demography": "OutOfAfrica_2T12"},
    "panel600": {"size": "demo", "seed": 2},
    "panel4000": {"size": "5mb", "seed": 2, "panel_people": 2000},
    "array5kb": {"size": "5mb", "seed": 2, "spacing_bp": 5000},
    "array30kb": {"size": "5mb", "seed": 2, "spacing_bp": 30000},
}

COMPARED = ("snvbert", "beagle", "hmm")  # transfer minus each, paired

# How each scenario's own model trains: as the accuracy benchmark's 5-minute runs do
# (experiment=accuracy, 8 epochs of 100 batches; the README's Speed: 5 minutes reach the 30-minute
# runs' best), on that scenario's panel and with arrays of that scenario's density.
OWN_RECIPE = ["experiment=accuracy", "trainer.max_epochs=8", "seed=1"]


def own_recipe(scenario: dict[str, Any]) -> list[str]:
    """The own model's overrides for ``scenario`` (its arrays' density in the array level)."""
    spacing = scenario.get("spacing_bp")
    if spacing is None:
        return list(OWN_RECIPE)
    levels = f"[{{strategy: random, rate: 0.5}},{{strategy: array, spacing_bp: {int(spacing)}}}]"
    return [*OWN_RECIPE, f"data.curriculum.levels={levels}"]


def _people(scenario: dict[str, Any]) -> int:
    from snvbert.simulate import SIZES

    return int(scenario.get("panel_people") or SIZES[scenario["size"]].panel)


def rows(name: str, scenario: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenario's table rows: per array and MAF bin, the transferred model's r² and its
    paired differences to the model trained there, Beagle and the HMM snvbert starts from."""
    hmm = "hmm_ibs" if ibs_by_default(2 * _people(scenario)) else "hmm"
    out = []
    for case, got in result["cases"].items():
        scores = got["scores"]
        diffs = scores.get("differences", {})
        for label, key in [*zip(BIN_LABELS, MAF_BIN_NAMES, strict=True), ("overall", "r2")]:
            row: dict[str, Any] = {
                "scenario": name,
                "array": case,
                "bin": label,
                "sites": scores["sites"]["per_bin"].get(key, scores["sites"]["scored"]),
                "transfer": scores["inputs"]["transfer"][key],
            }
            for other in COMPARED:
                label_other = hmm if other == "hmm" else other
                d = diffs.get(f"transfer-{label_other}", {}).get(key)
                row[other] = None if d is None else {"diff": d["diff"], "ci95": d["ci95"]}
            previous = diffs.get("transfer-full_run_source", {}).get(key)  # --rescore only
            if previous is not None:
                row["full_run_source"] = {"diff": previous["diff"], "ci95": previous["ci95"]}
            row["hmm_states"] = "IBS-selected" if hmm == "hmm_ibs" else "every haplotype"
            out.append(row)
    return out


def _cell(d: dict[str, Any] | None) -> str:
    if d is None or d["diff"] is None or d["ci95"][0] is None:
        return "-"
    lo, hi = d["ci95"]
    mark = "*" if lo > 0 or hi < 0 else " "  # the interval excludes zero
    return f"{d['diff']:+.4f} [{lo:+.4f},{hi:+.4f}]{mark}"


def format_rows(table: list[dict[str, Any]]) -> str:
    """The transfer table: one line per scenario, array and MAF bin."""
    extra = any("full_run_source" in r for r in table)
    header = ["scenario", "array", "MAF", "transfer r2", "- own model", "- Beagle", "- HMM"]
    header += ["- full run's source"] if extra else []
    body = [
        [
            r["scenario"],
            r["array"],
            r["bin"],
            "-" if r["transfer"] is None else f"{r['transfer']:.4f}",
            *(_cell(r[o]) for o in COMPARED),
            *([_cell(r.get("full_run_source"))] if extra else []),
        ]
        for r in table
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(
        [
            *lines,
            "differences are the transferred model's r2 minus the other's, paired bootstrap 95 % "
            "intervals; * the interval excludes zero",
        ]
    )


# What a scenario's folder holds beside the transferred model's output, scored with it.
OTHERS = ("snvbert", "beagle", "minimac4", "hmm", "hmm_ibs")


def rescore(out: Path, name: str, source: Path, bootstrap: int, threads: int) -> dict[str, Any]:
    """A scenario a full run left under ``out``: impute its two cases with ``source``
    (``transfer-rescored.vcf.gz``) and score it against the outputs already there (the model
    trained there, Beagle, Minimac4, the HMMs, which do not depend on the source, and the full
    run's source model as ``full_run_source``). Returns :func:`accuracy.run`'s result's shape."""
    from snvbert.bench import accuracy
    from snvbert.evaluate import evaluate, public
    from snvbert.impute import impute

    scenario = SCENARIOS[name]
    folder = out / name
    if not (folder / "accuracy.json").is_file():
        raise SnvbertError(
            f"holds no full run of scenario {name}; run without --rescore first", path=folder
        )
    knobs = {k: scenario.get(k) for k in ("demography", "panel_people", "spacing_bp")}
    sims = accuracy.simulations(folder, scenario["seed"], scenario["size"], **knobs)
    panel = sims["clean"] / "panel.vcf.gz"
    result: dict[str, Any] = {"cases": {}, "seconds": {}}
    for case, sim in sims.items():
        work = folder / case
        imputed = work / "transfer-rescored.vcf.gz"
        summary = impute(
            source,
            panel,
            accuracy.query_file(folder, case, sim),
            imputed,
            cache_dir=folder / "cache",
            progress=False,
            genetic_map=sim / "map.plink",
            threads=threads,
        )
        result["seconds"][f"{case}_transfer_impute"] = summary["seconds"]
        files = {"transfer": imputed}
        files.update({o: work / f"{o}.vcf.gz" for o in OTHERS if (work / f"{o}.vcf.gz").exists()})
        if (work / "transfer.vcf.gz").exists():  # the full run's source model, paired too
            files["full_run_source"] = work / "transfer.vcf.gz"
        scores = evaluate(
            sim / "truth.vcf.gz",
            imputed,
            panel,
            sim / "array.vcf.gz",
            compare=list(files.values())[1:],
            labels=list(files),
            bootstrap=bootstrap,
            cache_dir=folder / "cache",
        )
        result["cases"][case] = {"scores": public(scores)}
    return result


def format_markdown(table: list[dict[str, Any]]) -> str:
    """The transfer table as Markdown (the README's), intervals in brackets, ** where they
    exclude zero."""

    def cell(d: dict[str, Any] | None) -> str:
        if d is None or d["diff"] is None or d["ci95"][0] is None:
            return "-"
        lo, hi = d["ci95"]
        text = f"{d['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]".replace("-", "−")
        return f"**{text}**" if lo > 0 or hi < 0 else text

    extra = any("full_run_source" in r for r in table)
    head = "| scenario | array | MAF | transferred r² | − own model | − Beagle 5.4 | − HMM |"
    lines = [
        head + (" − full run's source |" if extra else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for r in table:
        r2 = "-" if r["transfer"] is None else f"{r['transfer']:.4f}"
        cells = " | ".join(
            cell(r.get(o)) for o in (*COMPARED, *(("full_run_source",) if extra else ()))
        )
        lines.append(f"| {r['scenario']} | {r['array']} | {r['bin']} | {r2} | {cells} |")
    return "\n".join(lines)


def run(
    out_dir: str | Path = "outputs/bench/transfer",
    *,
    source: str | Path | None = None,
    only: list[str] | None = None,
    train_minutes: float = 30.0,
    bootstrap: int = 100,
    threads: int = 2,
    overrides: list[str] | None = None,
    reuse: bool = False,
) -> dict[str, Any]:
    """Every scenario (or ``only`` those); returns and writes ``transfer.json``.

    Each scenario's own model (and a source trained here) trains with ``overrides`` (default:
    :func:`own_recipe`), ``train_minutes`` at most. ``reuse``: only the source imputes,
    scored against what an earlier full run left in each scenario's folder (:func:`rescore`)."""
    from snvbert.bench import accuracy

    out = Path(out_dir)
    names = list(SCENARIOS) if not only else list(only)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SnvbertError(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if source is None and reuse:
        raise SnvbertError("--rescore needs --source CKPT, the model to score")
    if source is None:
        trained = accuracy.run(
            out / "source",
            train_minutes=train_minutes,
            bootstrap=bootstrap,
            threads=threads,
            train_overrides=own_recipe(SOURCE) if overrides is None else list(overrides),
            **SOURCE,
        )
        source = trained["checkpoint"]
    source = Path(source)
    if not source.is_file():
        raise SnvbertError("source checkpoint not found; pass --source CKPT", path=source)
    table: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for name in names:
        scenario = SCENARIOS[name]
        log.info("scenario %s: %s", name, scenario)
        if reuse:
            result = rescore(out, name, source, bootstrap, threads)
        else:
            result = accuracy.run(
                out / name,
                train_minutes=train_minutes,
                bootstrap=bootstrap,
                threads=threads,
                transfer=source,
                train_overrides=own_recipe(scenario) if overrides is None else list(overrides),
                **scenario,
            )
        results[name] = {"scenario": scenario, "seconds": result["seconds"]}
        table += rows(name, scenario, result)
    summary = {
        "source": str(source),
        "rescored": reuse,
        "source_scenario": SOURCE,
        "own_model_overrides": {
            name: own_recipe(SCENARIOS[name]) if overrides is None else list(overrides)
            for name in names
        },
        "scenarios": results,
    }
    summary["table"] = table
    print("\n" + format_rows(table), flush=True)
    (out / "transfer.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "transfer.md").write_text(format_markdown(table) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "transfer.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.md'}", flush=True)
    return summary


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snvbert.bench.transfer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--source", metavar="CKPT", help="the model to transfer (default: train one here)"
    )
    parser.add_argument(
        "--only", nargs="*", metavar="NAME", help=f"scenarios to run, of {list(SCENARIOS)}"
    )
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=30.0,
        help="the most each scenario's own model (and a trained source) may train",
    )
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/transfer")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="only impute with --source; score it against what an earlier full run in --out left",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the own models' training (default: OWN_RECIPE at the "
        "scenario's array density)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(
        args.out,
        source=args.source,
        only=args.only,
        train_minutes=args.train_minutes,
        bootstrap=args.bootstrap,
        threads=args.threads,
        overrides=args.overrides or None,
        reuse=args.rescore,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
