"""snvbert.evaluate: aggregate r² by MAF bin (minor-allele coded), concordance, bootstrap, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from snvbert.evaluate import evaluate, format_table
from snvbert.utils.io import write_bgzipped_vcf

HEADER = [
    "##fileformat=VCFv4.2",
    "##contig=<ID=1,length=1000>",
    '##INFO=<ID=DR2,Number=A,Type=Float,Description="Dosage R2">',
    '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
    '##FORMAT=<ID=DS,Number=A,Type=Float,Description="ALT dose">',
]
SITES = [(100, "A", "G"), (200, "C", "T"), (300, "G", "A")]  # 100 is the array site


def _vcf(
    path: Path, samples: list[str], rows: list[tuple[tuple[int, str, str], list[str], str]]
) -> Path:
    """rows: (site, per-sample fields, FORMAT) -> a bgzipped, indexed VCF."""
    lines = [h + "\n" for h in HEADER]
    lines.append(
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(samples) + "\n"
    )
    for (pos, ref, alt), fields, fmt in rows:
        info = "DR2=0.9" if fmt == "GT:DS" else "."
        lines.append(
            f"1\t{pos}\t.\t{ref}\t{alt}\t.\tPASS\t{info}\t{fmt}\t" + "\t".join(fields) + "\n"
        )
    write_bgzipped_vcf(lines, path)
    return path


def _gt(dose: int) -> str:
    return ["0|0", "0|1", "1|1"][dose]


@pytest.fixture
def hand(tmp_path: Path) -> dict[str, Path]:
    """8 panel people: site 200 has ALT minor (AF 2/16), site 300 ALT major (AF 14/16).

    Both have MAF 0.125 and fall in one bin; 4 target people are scored at 200 and 300.
    """
    panel_people = [f"P{i}" for i in range(8)]
    panel_rows = [
        (SITES[0], ["0|1"] * 8, "GT"),
        (SITES[1], ["1|0", "0|1"] + ["0|0"] * 6, "GT"),
        (SITES[2], ["0|1", "1|0"] + ["1|1"] * 6, "GT"),
    ]
    targets = ["T0", "T1", "T2", "T3"]
    truth = {SITES[0]: [1, 1, 1, 1], SITES[1]: [0, 1, 0, 2], SITES[2]: [2, 1, 2, 0]}
    dosage = {SITES[1]: [0.1, 0.9, 0.2, 1.6], SITES[2]: [1.9, 1.2, 1.7, 0.5]}
    calls = {SITES[1]: [0, 1, 0, 2], SITES[2]: [2, 1, 2, 1]}  # one wrong call, at 300
    return {
        "panel": _vcf(tmp_path / "panel.vcf.gz", panel_people, panel_rows),
        "array": _vcf(tmp_path / "array.vcf.gz", targets, [(SITES[0], [_gt(1)] * 4, "GT")]),
        "truth": _vcf(
            tmp_path / "truth.vcf.gz",
            targets,
            [(s, [_gt(d) for d in truth[s]], "GT") for s in SITES],
        ),
        "imputed": _vcf(
            tmp_path / "imputed.vcf.gz",
            targets,
            [(SITES[0], [f"{_gt(1)}:1.000"] * 4, "GT:DS")]
            + [
                (
                    s,
                    [f"{_gt(c)}:{x:.3f}" for c, x in zip(calls[s], dosage[s], strict=True)],
                    "GT:DS",
                )
                for s in SITES[1:]
            ],
        ),
        "cache": tmp_path / "cache",
        "_truth": truth,
        "_dosage": dosage,  # type: ignore[dict-item]
    }


def _r2(x, y) -> float:
    return float(np.corrcoef(np.ravel(x), np.ravel(y))[0, 1] ** 2)


def test_truth_against_itself_scores_one(hand: dict) -> None:
    res = evaluate(
        hand["truth"], hand["truth"], hand["panel"], hand["array"], cache_dir=hand["cache"]
    )
    m = res["inputs"]["truth"]
    assert res["sites"]["scored"] == 2  # the array site is not scored
    assert m["r2"] == pytest.approx(1.0) and m["r2_maf_0.05_0.5"] == pytest.approx(1.0)
    assert m["concordance"] == 1.0 and m["nonref_concordance"] == 1.0
    assert m["mean_site_r2"] == pytest.approx(1.0)


def test_pooled_r2_matches_a_hand_computation_minor_allele_coded(
    hand: dict, tmp_path: Path
) -> None:
    res = evaluate(
        hand["truth"],
        hand["imputed"],
        hand["panel"],
        hand["array"],
        out_dir=tmp_path / "eval",
        bootstrap=20,
        cache_dir=hand["cache"],
    )
    m = res["inputs"]["imputed"]
    t, d = hand["_truth"], hand["_dosage"]
    s200, s300 = SITES[1], SITES[2]
    # Minor-allele coding: ALT is the major allele at 300, so count REF there (2 - x).
    x_minor = d[s200] + [2 - v for v in d[s300]]
    y_minor = t[s200] + [2 - v for v in t[s300]]
    x_alt, y_alt = d[s200] + d[s300], t[s200] + t[s300]
    assert m["r2"] == pytest.approx(_r2(x_minor, y_minor), abs=1e-6)
    assert m["r2_maf_0.05_0.5"] == pytest.approx(_r2(x_minor, y_minor), abs=1e-6)
    # The coding matters for a pooled r²: the ALT-coded value is a different number.
    assert abs(_r2(x_alt, y_alt) - _r2(x_minor, y_minor)) > 0.02
    assert m["r2"] != pytest.approx(_r2(x_alt, y_alt), abs=1e-3)
    assert m["mean_site_r2"] == pytest.approx((_r2(d[s200], t[s200]) + _r2(d[s300], t[s300])) / 2)
    assert m["concordance"] == pytest.approx(7 / 8)
    # Non-reference: genotypes where truth or call has ALT: 2 at 200, 4 at 300; one is wrong.
    assert m["nonref_concordance"] == pytest.approx(5 / 6)
    lo, hi = m["ci95"]["r2"]
    assert lo <= m["r2"] + 1e-9 and hi >= m["r2"] - 1e-9
    for name in ("evaluate.json", "r2_by_maf.png", "calibration.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert m["r2_field"] == "DR2"
    assert "imputed" in format_table(res)
    # the estimated r² (DR2=0.9 at both sites) against each site's true r², by MAF bin
    want = (abs(0.9 - _r2(d[s200], t[s200])) + abs(0.9 - _r2(d[s300], t[s300]))) / 2
    assert m["dr2_error"]["r2_maf_0.05_0.5"] == pytest.approx(want, abs=1e-6)
    assert m["dr2_error"]["all"] == pytest.approx(want, abs=1e-6) and m["dr2_error"]["sites"] == 2
    assert "|est r2 - r2| MAF [0.05, 0.5]" in format_table(res)


def test_compare_files_get_their_own_columns(hand: dict) -> None:
    res = evaluate(
        hand["truth"],
        hand["imputed"],
        hand["panel"],
        hand["array"],
        compare=[hand["truth"]],
        labels=["model", "oracle"],
        cache_dir=hand["cache"],
    )
    assert list(res["inputs"]) == ["model", "oracle"]
    assert res["inputs"]["oracle"]["r2"] == pytest.approx(1.0)
    assert res["inputs"]["model"]["r2"] < 1.0


def test_paired_bootstrap_differences(hand: dict) -> None:
    """The first input minus each other one, over the same resampled people: the same file
    twice differs by exactly 0 in every resample (its own interval is not a point), and the
    oracle's difference is the point difference with an interval around it."""
    res = evaluate(
        hand["truth"],
        hand["imputed"],
        hand["panel"],
        hand["array"],
        compare=[hand["imputed"], hand["truth"]],
        labels=["model", "same", "oracle"],
        bootstrap=50,
        cache_dir=hand["cache"],
    )
    same = res["differences"]["model-same"]["r2"]
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    lo, hi = res["inputs"]["model"]["ci95"]["r2"]
    assert hi > lo
    oracle = res["differences"]["model-oracle"]["r2"]
    assert oracle["diff"] == pytest.approx(res["inputs"]["model"]["r2"] - 1.0)
    assert oracle["ci95"][0] <= oracle["diff"] <= oracle["ci95"][1] <= 0.0
    assert "model-oracle (paired bootstrap)" in format_table(res)
