"""``python -m snvbert.evaluate``: score imputed VCFs against the truth, the way the field does.

::

    python -m snvbert.evaluate truth=truth.vcf.gz imputed=imputed.vcf.gz panel=panel.vcf.gz \\
        array=array.vcf.gz compare=[beagle.vcf.gz,minimac.vcf.gz] out=eval/ bootstrap=200

Scored sites are the panel sites absent from the array (matched by CHROM:POS:REF:ALT, a ``chr``
prefix ignored): the sites that were imputed. Per input file:

- aggregate dosage r² overall and per MAF bin, pooled over all genotypes of the bin and counting
  the *minor* allele (where the panel's ALT frequency is above 0.5, x -> 2 - x): ALT counting
  inflates the rare bins. MAF comes from the panel, never from the scored people;
- the mean per-site r² (squared Pearson correlation over people, at sites where both sides vary);
- genotype concordance of the best guess, and non-reference concordance (over genotypes where
  the truth or the call carries an ALT allele);
- the estimated r² the tool wrote (Beagle ``DR2``, Minimac ``R2``, snvbert ``DR2``) against the
  true per-site r²: a calibration table and plot;
- with ``bootstrap=N``, 95 % intervals from resampling the scored people.

Dosages come from FORMAT/DS, else HDS (summed), else GT.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from snvbert.config import filled
from snvbert.data.vcf import load_panel, read_target
from snvbert.errors import SnvbertError
from snvbert.metrics import MAF_BIN_NAMES, MAF_EDGES, maf_bin
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import atomic_path

log = logging.getLogger("snvbert.evaluate")

BIN_LABELS: tuple[str, ...] = tuple(
    f"[{lo:g}, {hi:g}{']' if hi == MAF_EDGES[-1] else ')'}"
    for lo, hi in zip(MAF_EDGES[:-1], MAF_EDGES[1:], strict=True)
)
_N_GROUPS = len(MAF_BIN_NAMES) + 1  # the MAF bins, then all sites
_R2_FIELDS = ("DR2", "R2")  # Beagle / snvbert, then Minimac


@dataclass
class Imputed:
    """One input's values at the scored sites, people in the truth's order."""

    dosage: np.ndarray  # float64 (sites, people), NaN where the file has no such site
    call: np.ndarray  # int8 (sites, people) best-guess ALT count, -1 where absent
    est_r2: np.ndarray  # float64 (sites,) the file's estimated r², NaN where absent
    r2_field: str | None


def _key(pos: int, ref: str, alt: str) -> tuple[int, str, str]:
    return int(pos), ref.upper(), alt.upper()


def read_imputed(
    path: str | os.PathLike,
    sites: dict[tuple[int, str, str], int],
    samples: Sequence[str],
    r2_field: str = "auto",
) -> Imputed:
    """Dosages, best guesses and estimated r² of an imputed VCF at ``sites`` (key -> row).

    A record whose REF/ALT are swapped against the key is recoded (2 - x). Sample columns are
    reordered to ``samples``; a scored person absent from the file is an error.
    """
    from cyvcf2 import VCF

    path = Path(path)
    if not path.is_file():
        raise SnvbertError("imputed VCF not found", path=path)
    try:
        vcf = VCF(str(path), gts012=True, lazy=True, threads=2)
    except OSError as err:
        raise SnvbertError(f"htslib could not open it as a VCF ({err})", path=path) from err
    try:
        have = {s: i for i, s in enumerate(vcf.samples)}
        missing = [s for s in samples if s not in have]
        if missing:
            raise SnvbertError(
                f"lacks {len(missing)} of the truth's people (e.g. {missing[0]}); impute the same "
                "people as the truth file holds",
                path=path,
            )
        cols = np.array([have[s] for s in samples], dtype=np.int64)
        field = r2_field
        if field == "auto":
            field = next((f for f in _R2_FIELDS if vcf.contains(f)), None)
        elif not vcf.contains(field):
            raise SnvbertError(f"has no INFO/{field} in its header (dr2_field={field})", path=path)
        dose_field = next((f for f in ("DS", "HDS") if vcf.contains(f)), None)
        n = len(sites)
        dosage = np.full((n, len(samples)), np.nan)
        call = np.full((n, len(samples)), -1, dtype=np.int8)
        est = np.full(n, np.nan)
        for v in vcf:
            if len(v.ALT) != 1:
                continue
            pos, ref, alt = v.POS, v.REF, v.ALT[0]
            row = sites.get(_key(pos, ref, alt))
            flip = False
            if row is None:
                row = sites.get(_key(pos, alt, ref))
                flip = True
                if row is None:
                    continue
            ds = None if dose_field is None else v.format(dose_field)
            if ds is not None and dose_field == "HDS":
                ds = ds[:, :2].sum(1)
            gt_types = v.gt_types.astype(np.int8)  # 0 hom ref, 1 het, 2 hom alt, 3 unknown
            best = np.where(gt_types == 3, -1, gt_types)
            if ds is None:
                x = np.where(best < 0, np.nan, best).astype(np.float64)
            else:
                x = np.asarray(ds, dtype=np.float64).reshape(len(vcf.samples), -1)[:, 0]
                x = np.where(x < -1e30, np.nan, x)  # cyvcf2's missing float
                best = np.where(best < 0, np.rint(np.nan_to_num(x, nan=-1)).astype(np.int8), best)
            x, best = x[cols], best[cols]
            if flip:
                x = 2 - x
                best = np.where(best >= 0, 2 - best, best)
            dosage[row], call[row] = x, best
            if field is not None:
                value = v.INFO.get(field)
                if value is not None:
                    est[row] = float(value[0] if isinstance(value, tuple) else value)
    finally:
        vcf.close()
    return Imputed(dosage, call, est, field)


# --- statistics -------------------------------------------------------------------------------


def _person_stats(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sufficient statistics (n, sx, sy, sxx, syy, sxy) per person and site group.

    x, y (sites, people) with NaN where x is absent; groups (sites,) bin index. Returns
    (people, groups + 1, 6): the last group is all sites. Pooled r² of any set of people is
    a function of the sums of their rows, which makes the bootstrap a matrix product.
    """
    ok = ~np.isnan(x)
    x0, y0 = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
    terms = np.stack([ok.astype(float), x0, y0, x0 * x0, y0 * y0, x0 * y0], -1)  # (S, P, 6)
    out = np.zeros((x.shape[1], _N_GROUPS, 6))
    for g in range(_N_GROUPS - 1):
        out[:, g] = terms[groups == g].sum(0)
    out[:, -1] = out[:, :-1].sum(1)
    return out


def _r2_from_stats(s: np.ndarray) -> np.ndarray:
    """Pooled squared Pearson correlation from summed statistics (..., 6); NaN without variance."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(s, -1, 0)
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = (n * sxy - sx * sy) ** 2 / (vx * vy)
    return np.where((vx > 1e-9) & (vy > 1e-9), r2, np.nan)


def per_site_r2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Pearson correlation over people at each site; NaN where either side is constant."""
    ok = ~np.isnan(x)
    n = ok.sum(1)
    x0, y0 = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx, my = x0.sum(1) / n, y0.sum(1) / n
        dx, dy = np.where(ok, x0 - mx[:, None], 0), np.where(ok, y0 - my[:, None], 0)
        vx, vy = (dx * dx).sum(1), (dy * dy).sum(1)
        r2 = (dx * dy).sum(1) ** 2 / (vx * vy)
    return np.where((vx > 1e-12) & (vy > 1e-12), r2, np.nan)


def _calibration(est: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Mean estimated and mean true r² in tenths of the estimate, and their correlation."""
    ok = np.isfinite(est) & np.isfinite(true)
    edges = np.linspace(0, 1, 11)
    idx = np.clip(np.searchsorted(edges, est[ok], side="right") - 1, 0, 9)
    rows = []
    for b in range(10):
        sel = idx == b
        if sel.any():
            rows.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "sites": int(sel.sum()),
                    "mean_estimated": float(est[ok][sel].mean()),
                    "mean_true": float(true[ok][sel].mean()),
                }
            )
    corr = (
        float(np.corrcoef(est[ok], true[ok])[0, 1])
        if ok.sum() > 2 and est[ok].std() > 0
        else float("nan")
    )
    return {"sites": int(ok.sum()), "pearson_r": corr, "bins": rows}


def _dr2_error(est: np.ndarray, dosage: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> dict:
    """Mean |estimated r² - true per-site r²| per MAF bin and overall, over the sites whose
    true genotypes vary among the people scored. A constant dosage there carries no
    information: its true r² is 0 (not left out, so that every tool is scored on the same
    sites)."""
    true = per_site_r2(dosage, truth)
    varies = np.nanvar(truth, axis=1) > 1e-12
    true = np.where(varies & np.isnan(true), 0.0, true)
    ok = varies & np.isfinite(est) & np.isfinite(true)
    err = np.abs(est - true)
    out = {
        name: _num(err[ok & (groups == b)].mean()) if (ok & (groups == b)).any() else None
        for b, name in enumerate(MAF_BIN_NAMES)
    }
    out["all"] = _num(err[ok].mean()) if ok.any() else None
    out["sites"] = int(ok.sum())
    return out


def _score(
    imp: Imputed, truth: np.ndarray, af: np.ndarray, groups: np.ndarray, bootstrap: int, seed: int
) -> dict[str, Any]:
    present = ~np.isnan(imp.dosage).all(1)
    flip = (af > 0.5)[:, None]
    x = np.where(flip, 2 - imp.dosage, imp.dosage)[present]
    y = np.where(flip, 2 - truth, truth)[present].astype(float)
    g = groups[present]
    stats = _person_stats(x, y, g)
    r2 = _r2_from_stats(stats.sum(0))
    names = [*MAF_BIN_NAMES, "r2"]
    out: dict[str, Any] = {name: _num(r2[i]) for i, name in enumerate(names)}
    out["sites"] = int(present.sum())
    out["coverage"] = float(present.mean()) if present.size else float("nan")
    site_r2 = per_site_r2(imp.dosage[present], truth[present].astype(float))
    out["mean_site_r2"] = _num(np.nanmean(site_r2)) if np.isfinite(site_r2).any() else None
    call, t = imp.call[present], truth[present]
    have = call >= 0
    out["concordance"] = _num((call == t)[have].mean()) if have.any() else None
    nonref = have & ((t > 0) | (call > 0))
    out["nonref_concordance"] = _num((call == t)[nonref].mean()) if nonref.any() else None
    out["r2_field"] = imp.r2_field
    if imp.r2_field is not None:
        out["calibration"] = _calibration(imp.est_r2[present], site_r2)
        out["dr2_error"] = _dr2_error(imp.est_r2[present], imp.dosage[present], y, g)
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        p = stats.shape[0]
        weights = rng.multinomial(p, np.full(p, 1.0 / p), size=bootstrap)  # (B, P)
        boot = _r2_from_stats(np.einsum("bp,pgk->bgk", weights, stats))  # (B, groups)
        lo, hi = np.full(_N_GROUPS, np.nan), np.full(_N_GROUPS, np.nan)
        some = np.isfinite(boot).any(0)
        lo[some], hi[some] = np.nanpercentile(boot[:, some], [2.5, 97.5], axis=0)
        out["ci95"] = {name: [_num(lo[i]), _num(hi[i])] for i, name in enumerate(names)}
        out["_boot"] = boot  # same seed, same resampled people for every input: paired
    out["_site_r2"] = site_r2  # for the plots; dropped from the JSON
    out["_est_r2"] = imp.est_r2[present]
    return out


def _num(v: Any) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else v


# --- the whole job ---------------------------------------------------------------------------


def _label(path: Path) -> str:
    name = path.name
    for suffix in (".vcf.gz", ".vcf.bgz", ".bcf", ".vcf"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def evaluate(
    truth: str | os.PathLike,
    imputed: str | os.PathLike,
    panel: str | os.PathLike,
    array: str | os.PathLike,
    compare: Sequence[str | os.PathLike] = (),
    labels: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    bootstrap: int | None = None,
    *,
    dr2_field: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score ``imputed`` (and every ``compare`` file) against ``truth`` on the imputed sites.

    ``bootstrap``, ``dr2_field`` and ``cache_dir`` left out (None) take ``conf/evaluate.yaml``'s
    values, as the command does. Returns ``{"sites": ..., "people": ..., "inputs": {label:
    metrics}}``; with ``out_dir``, also writes ``evaluate.json``, ``r2_by_maf.png`` and
    ``calibration.png`` there.
    """
    setting = filled(
        "evaluate", {"bootstrap": bootstrap, "dr2_field": dr2_field, "cache_dir": cache_dir}
    )
    bootstrap, dr2_field = int(setting["bootstrap"]), str(setting["dr2_field"])
    cache_dir = setting["cache_dir"]
    files = [Path(imputed), *(Path(c) for c in compare)]
    names = list(labels) if labels else [_label(f) for f in files]
    if len(names) != len(files):
        raise SnvbertError(f"labels has {len(names)} names for {len(files)} imputed files")
    if len(set(names)) != len(names):
        raise SnvbertError(f"labels must be distinct (got {names}); pass labels=[...]")

    pan = load_panel(panel, cache_dir=cache_dir, progress=False)
    arr = read_target(array)
    tru = read_target(truth)
    if tru.genotypes.min() < 0 and (tru.genotypes < 0).all(1).any():
        log.warning("the truth file has missing calls; they are left out of the scores")

    array_keys = {_key(p, r, a) for p, r, a in zip(arr.pos, arr.ref, arr.alt, strict=True)}
    array_keys |= {_key(p, a, r) for p, r, a in zip(arr.pos, arr.ref, arr.alt, strict=True)}
    panel_af = pan.alt_freq()
    panel_row = {
        _key(p, r, a): i for i, (p, r, a) in enumerate(zip(pan.pos, pan.ref, pan.alt, strict=True))
    }
    truth_rows, panel_rows = [], []
    for i, (p, r, a) in enumerate(zip(tru.pos, tru.ref, tru.alt, strict=True)):
        key = _key(p, r, a)
        if key in panel_row and key not in array_keys:
            truth_rows.append(i)
            panel_rows.append(panel_row[key])
    if not truth_rows:
        raise SnvbertError(
            f"truth {truth}, panel {panel} and array {array} share no imputed site (a panel site "
            "absent from the array and present in the truth); check that they belong together"
        )
    truth_rows_a = np.asarray(truth_rows)
    g = tru.genotypes[truth_rows_a].astype(np.int16)
    miss = (g < 0).reshape(len(truth_rows), -1, 2).any(-1)
    truth_dose = g.reshape(len(truth_rows), -1, 2).sum(-1).astype(float)
    truth_dose[miss] = np.nan
    af = panel_af[np.asarray(panel_rows)]
    groups = np.asarray(maf_bin(np.minimum(af, 1 - af)))
    site_index = {_key(tru.pos[i], tru.ref[i], tru.alt[i]): j for j, i in enumerate(truth_rows)}

    result: dict[str, Any] = {
        "truth": str(truth),
        "panel": str(panel),
        "array": str(array),
        "people": tru.n_samples,
        "sites": {
            "scored": len(truth_rows),
            "per_bin": {name: int((groups == b).sum()) for b, name in enumerate(MAF_BIN_NAMES)},
        },
        "bootstrap": int(bootstrap),
        "inputs": {},
    }
    for name, path in zip(names, files, strict=True):
        imp = read_imputed(path, site_index, tru.samples, dr2_field)
        imp.dosage[np.isnan(truth_dose)] = np.nan
        truth_filled = np.nan_to_num(truth_dose, nan=0.0)
        scores = _score(imp, truth_filled, af, groups, int(bootstrap), seed)
        scores["file"] = str(path)
        result["inputs"][name] = scores
        if scores["coverage"] < 1:
            log.warning(
                "%s: %d of %d scored sites are absent from %s; scored on the rest",
                name,
                len(truth_rows) - scores["sites"],
                len(truth_rows),
                path,
            )
    if int(bootstrap) > 0 and len(names) > 1:
        result["differences"] = _paired_differences(result["inputs"], names[0])
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def _paired_differences(inputs: dict[str, dict[str, Any]], first: str) -> dict[str, Any]:
    """r² of the first input minus each other's, with 95 % intervals over the same resamples.

    Every input is bootstrapped with the same seed over the same people, so resample b is the
    same set of people for all: the difference's interval is paired, far narrower than the two
    separate intervals suggest.
    """
    names = [*MAF_BIN_NAMES, "r2"]
    out: dict[str, Any] = {}
    for other, m in inputs.items():
        if other == first:
            continue
        diff = inputs[first]["_boot"] - m["_boot"]  # (B, groups)
        lo, hi = np.full(len(names), np.nan), np.full(len(names), np.nan)
        some = np.isfinite(diff).any(0)
        lo[some], hi[some] = np.nanpercentile(diff[:, some], [2.5, 97.5], axis=0)
        point = {
            name: None
            if inputs[first][name] is None or m[name] is None
            else inputs[first][name] - m[name]
            for name in names
        }
        out[f"{first}-{other}"] = {
            name: {"diff": point[name], "ci95": [_num(lo[i]), _num(hi[i])]}
            for i, name in enumerate(names)
        }
    return out


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the per-site arrays kept for plotting (what the JSON holds)."""
    inputs = {
        k: {f: v for f, v in m.items() if not f.startswith("_")}
        for k, m in result["inputs"].items()
    }
    return {**result, "inputs": inputs}


def format_table(result: dict[str, Any]) -> str:
    """A table: metrics as rows, inputs as columns (with 95 % intervals when bootstrapped)."""
    inputs = result["inputs"]
    rows: list[tuple[str, str, str]] = [
        (f"r2 MAF {lab}", name, f"{result['sites']['per_bin'][name]:,}")
        for lab, name in zip(BIN_LABELS, MAF_BIN_NAMES, strict=True)
    ]
    rows.append(("r2 overall", "r2", f"{result['sites']['scored']:,}"))
    rows += [
        ("mean per-site r2", "mean_site_r2", ""),
        ("concordance", "concordance", ""),
        ("non-ref concordance", "nonref_concordance", ""),
    ]

    def cell(m: dict[str, Any], key: str) -> str:
        v = m.get(key)
        if v is None:
            return "-"
        text = f"{v:.3f}"
        ci = m.get("ci95", {}).get(key)
        if ci and ci[0] is not None:
            text += f" [{ci[0]:.3f},{ci[1]:.3f}]"
        return text

    header = ["metric", "sites", *inputs]
    body = [[label, n, *(cell(m, key) for m in inputs.values())] for label, key, n in rows]
    body.append(["sites scored", "", *(f"{m['sites']:,}" for m in inputs.values())])
    if any(m.get("dr2_error") for m in inputs.values()):  # the estimated r²'s calibration
        for lab, key in [*zip(BIN_LABELS, MAF_BIN_NAMES, strict=True), ("overall", "all")]:
            errors = [(m.get("dr2_error") or {}).get(key) for m in inputs.values()]
            body.append(
                [f"|est r2 - r2| MAF {lab}" if key != "all" else "|est r2 - r2| overall", ""]
                + ["-" if e is None else f"{e:.3f}" for e in errors]
            )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    lines.insert(1, "-" * len(lines[0]))
    cal = [
        f"{k}: {m['r2_field']} vs true per-site r2, pearson r={m['calibration']['pearson_r']:.3f}"
        for k, m in inputs.items()
        if m.get("calibration")
    ]
    title = (
        f"{result['people']} people, {result['sites']['scored']:,} imputed sites; r2 is aggregate "
        "dosage r2, minor-allele coded, MAF from the panel"
    )
    diffs = [
        f"{pair} (paired bootstrap): "
        + ", ".join(
            f"{lab} {d[key]['diff']:+.4f} [{d[key]['ci95'][0]:+.4f},{d[key]['ci95'][1]:+.4f}]"
            for lab, key in [*zip(BIN_LABELS, MAF_BIN_NAMES, strict=True), ("overall", "r2")]
            if d[key]["diff"] is not None and d[key]["ci95"][0] is not None
        )
        for pair, d in result.get("differences", {}).items()
    ]
    return "\n".join([title, *lines, *cal, *diffs])


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """``evaluate.json``, ``r2_by_maf.png`` and ``calibration.png`` in ``out_dir``, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "evaluate.json") as tmp:
        tmp.write_text(json.dumps(public(result), indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(MAF_BIN_NAMES))
    for name, m in result["inputs"].items():
        y = np.array([np.nan if m[b] is None else m[b] for b in MAF_BIN_NAMES])
        line = ax.plot(x, y, marker="o", label=f"{name} (overall {m['r2'] or float('nan'):.3f})")[0]
        if "ci95" in m:
            lo = np.array(
                [np.nan if m["ci95"][b][0] is None else m["ci95"][b][0] for b in MAF_BIN_NAMES]
            )
            hi = np.array(
                [np.nan if m["ci95"][b][1] is None else m["ci95"][b][1] for b in MAF_BIN_NAMES]
            )
            ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
    ax.set_xticks(
        x,
        [
            f"{lab}\n{result['sites']['per_bin'][b]:,} sites"
            for lab, b in zip(BIN_LABELS, MAF_BIN_NAMES, strict=True)
        ],
        fontsize=8,
    )
    ax.set_xlabel("panel minor allele frequency")
    ax.set_ylabel("aggregate dosage r² (minor allele)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_dir / "r2_by_maf.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    with_cal = [(k, m) for k, m in result["inputs"].items() if m.get("r2_field")]
    fig, axes = plt.subplots(
        1, max(1, len(with_cal)), figsize=(4 * max(1, len(with_cal)), 4), squeeze=False
    )
    for ax, (name, m) in zip(axes[0], with_cal, strict=False):
        ax.scatter(m["_est_r2"], m["_site_r2"], s=2, alpha=0.15)
        bins = m["calibration"]["bins"]
        ax.plot(
            [b["mean_estimated"] for b in bins], [b["mean_true"] for b in bins], "o-", color="C3"
        )
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{name}: r={m['calibration']['pearson_r']:.2f}", fontsize=9)
        ax.set_xlabel(f"estimated ({m['r2_field']})")
        ax.set_ylabel("true per-site r²")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
    if not with_cal:
        axes[0][0].text(0.5, 0.5, "no input carries an estimated r²", ha="center")
    fig.tight_layout()
    with atomic_path(out_dir / "calibration.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="pkg://snvbert.conf", config_name="evaluate")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    for key in ("truth", "imputed", "panel", "array"):
        if not cfg.get(key):
            raise SnvbertError(
                f"set {key}=PATH (python -m snvbert.evaluate truth=... imputed=... "
                "panel=... array=...)"
            )
    compare = list(OmegaConf.to_container(cfg.compare)) if cfg.compare else []
    labels = list(OmegaConf.to_container(cfg.labels)) if cfg.labels else None
    out = (
        cfg.out if cfg.out else str(Path(cfg.imputed).parent / f"{_label(Path(cfg.imputed))}_eval")
    )
    result = evaluate(
        cfg.truth,
        cfg.imputed,
        cfg.panel,
        cfg.array,
        compare,
        labels,
        out,
        int(cfg.bootstrap),
        dr2_field=cfg.dr2_field,
        cache_dir=cfg.cache_dir,
    )
    print(format_table(result), flush=True)
    print(f"wrote {out}/evaluate.json, r2_by_maf.png, calibration.png", file=sys.stderr)


if __name__ == "__main__":
    main()
