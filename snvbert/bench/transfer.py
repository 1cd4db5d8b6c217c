"""``python -m snvbert.bench.transfer``: one model imputing scenarios it was never trained on.

::

    python -m snvbert.bench.transfer --source outputs/bench/accuracy/train/checkpoints/last.ckpt
    python -m snvbert.bench.transfer --only panel600 array30kb --train-minutes 5

The source model (``--source``; else one trained here for ``--train-minutes`` on the 5 Mb
scenario, seed 1, OutOfAfrica_3G09: the one ``make bench-accuracy`` tunes on) imputes each
scenario of :data:`SCENARIOS`, each of which differs from the source in one thing: the
demography, the panel's size, the arrays' density. Every scenario is one
:func:`snvbert.bench.accuracy.run` (clean and realistic arrays; Beagle 5.4, Minimac4 and the
HMMs beside it) with the source model given as ``transfer``, so the same evaluation scores it
against a model trained on that scenario itself (``snvbert``: the shipped model's recipe,
:data:`snvbert.pretrained.make.RECIPE`, the same number of steps), against
Beagle and against the HMM alone (the one snvbert's HMM feature runs there: over IBS-selected
states above 1,600 reference haplotypes, else over every one), as paired 95 % bootstrap
intervals per MAF bin. Prints the table and writes ``transfer.json`` under ``--out``.
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
from snvbert.pretrained.make import RECIPE
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
    header = ["scenario", "array", "MAF", "transfer r2", "- own model", "- Beagle", "- HMM"]
    body = [
        [
            r["scenario"],
            r["array"],
            r["bin"],
            "-" if r["transfer"] is None else f"{r['transfer']:.4f}",
            *(_cell(r[o]) for o in COMPARED),
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


def run(
    out_dir: str | Path = "outputs/bench/transfer",
    *,
    source: str | Path | None = None,
    only: list[str] | None = None,
    train_minutes: float = 30.0,
    bootstrap: int = 100,
    threads: int = 2,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Every scenario (or ``only`` those); returns and writes ``transfer.json``.

    Each scenario's own model (and a source trained here) trains with ``overrides`` (default:
    the shipped model's recipe), ``train_minutes`` at most."""
    from snvbert.bench import accuracy

    out = Path(out_dir)
    names = list(SCENARIOS) if not only else list(only)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SnvbertError(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    recipe = list(RECIPE["overrides"]) if overrides is None else list(overrides)
    if source is None:
        trained = accuracy.run(
            out / "source",
            train_minutes=train_minutes,
            bootstrap=bootstrap,
            threads=threads,
            train_overrides=recipe,
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
        result = accuracy.run(
            out / name,
            train_minutes=train_minutes,
            bootstrap=bootstrap,
            threads=threads,
            transfer=source,
            train_overrides=recipe,
            **scenario,
        )
        results[name] = {"scenario": scenario, "seconds": result["seconds"]}
        table += rows(name, scenario, result)
    summary = {
        "source": str(source),
        "source_scenario": SOURCE,
        "own_model_overrides": recipe,
        "scenarios": results,
    }
    summary["table"] = table
    print("\n" + format_rows(table), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "transfer.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'transfer.json'}", flush=True)
    return summary


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
        "overrides",
        nargs="*",
        help="Hydra overrides of the own models' training (default: the shipped recipe's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(
            args.out,
            source=args.source,
            only=args.only,
            train_minutes=args.train_minutes,
            bootstrap=args.bootstrap,
            threads=args.threads,
            overrides=args.overrides or None,
        )
    except SnvbertError as err:
        print(f"snvbert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
