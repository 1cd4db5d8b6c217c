"""Site matching: which target records are which panel sites, and every adjustment made on the way.

Target sites are matched to panel sites by CHROM:POS:REF:ALT (:func:`match_sites`). A ``chr``
prefix difference is harmonised; REF/ALT-swapped sites are flipped (never strand-ambiguous A/T,
C/G ones); sites whose alleles do not match are dropped; target sites absent from the panel are
written through unchanged. Too little overlap means another build or chromosome: an error.
:func:`prepare_target` reads, checks and matches a target in one call, for snvbert's imputation
and the classical HMM imputer alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from snvbert.data.vcf import Panel, Target, read_target
from snvbert.errors import SnvbertError

_STRAND_AMBIGUOUS = frozenset({("A", "T"), ("T", "A"), ("C", "G"), ("G", "C")})
_MIN_OVERLAP_SITES = 5
_MIN_OVERLAP_FRACTION = 0.01


@dataclass
class SiteMatch:
    """How target sites map onto panel sites, and every adjustment made on the way."""

    panel_index: np.ndarray  # (m,) panel site of each matched target site, increasing
    target_index: np.ndarray  # (m,) the target site matched to it
    flipped: np.ndarray  # (m,) bool: REF/ALT swapped in the target, genotypes recoded
    passthrough: np.ndarray  # target sites absent from the panel, written through
    counts: dict[str, int] = field(default_factory=dict)


def match_sites(panel: Panel, target: Target) -> SiteMatch:
    """Match target sites to panel sites by POS:REF:ALT (chromosome already harmonised).

    Positions absent from the panel are passed through; at a panel position, the same alleles
    match, swapped alleles match flipped unless strand-ambiguous, anything else is dropped.
    """
    lo = np.searchsorted(panel.pos, target.pos, side="left")
    hi = np.searchsorted(panel.pos, target.pos, side="right")
    p_idx: list[int] = []
    t_idx: list[int] = []
    flips: list[bool] = []
    passthrough: list[int] = []
    counts = {
        "matched": 0,
        "flipped": 0,
        "passthrough": 0,
        "dropped_allele_mismatch": 0,
        "dropped_strand_ambiguous_swap": 0,
        "dropped_duplicate": 0,
    }
    used: set[int] = set()
    for t in range(target.n_sites):
        if lo[t] == hi[t]:
            passthrough.append(t)
            continue
        r, a = str(target.ref[t]), str(target.alt[t])
        candidates = range(int(lo[t]), int(hi[t]))
        same = [p for p in candidates if panel.ref[p] == r and panel.alt[p] == a]
        swapped = [p for p in candidates if panel.ref[p] == a and panel.alt[p] == r]
        if same:
            p, flip = same[0], False
        elif swapped and (r, a) in _STRAND_AMBIGUOUS:
            counts["dropped_strand_ambiguous_swap"] += 1
            continue
        elif swapped:
            p, flip = swapped[0], True
        else:
            counts["dropped_allele_mismatch"] += 1
            continue
        if p in used:
            counts["dropped_duplicate"] += 1
            continue
        used.add(p)
        p_idx.append(p)
        t_idx.append(t)
        flips.append(flip)
    order = np.argsort(np.asarray(p_idx, dtype=np.int64), kind="stable")
    counts["matched"] = len(p_idx)
    counts["flipped"] = int(sum(flips))
    counts["passthrough"] = len(passthrough)
    return SiteMatch(
        panel_index=np.asarray(p_idx, dtype=np.int64)[order],
        target_index=np.asarray(t_idx, dtype=np.int64)[order],
        flipped=np.asarray(flips, dtype=bool)[order],
        passthrough=np.asarray(passthrough, dtype=np.int64),
        counts=counts,
    )


def _check_phased(target: Target, panel_path: Path) -> None:
    """Every heterozygous call must be phased: the model reads one haplotype at a time."""
    g = target.genotypes.reshape(target.n_sites, target.n_samples, 2)
    het = (g[:, :, 0] >= 0) & (g[:, :, 1] >= 0) & (g[:, :, 0] != g[:, :, 1])
    bad = het & ~target.phased
    if not bad.any():
        return
    site, sample = np.argwhere(bad)[0]
    n_bad = int(bad.sum())
    raise SnvbertError(
        f"has {n_bad:,} unphased heterozygous genotypes (first: sample {target.samples[sample]}); "
        f"snvbert imputes phased haplotypes: phase it first, e.g. `beagle gt={target.source} "
        f"ref={panel_path} impute=false out=phased`, then pass target=phased.vcf.gz",
        path=target.source,
        record=f"{target.chrom}:{target.pos[site]}",
    )


def parse_region(text: str, chrom: str) -> tuple[int, int]:
    """``CHR:START-END`` (1-based, inclusive; commas allowed, ``chr`` prefix as the panel's or
    not) as (start, end) on the panel's chromosome ``chrom``."""
    found = re.fullmatch(r"\s*([^:\s]+):([\d,]+)-([\d,]+)\s*", str(text))
    if not found:
        raise SnvbertError(f"region={text} is not CHR:START-END (e.g. {chrom}:1000000-21000000)")
    name, start, end = (
        found.group(1),
        int(found.group(2).replace(",", "")),
        int(found.group(3).replace(",", "")),
    )
    if name.removeprefix("chr") != chrom.removeprefix("chr"):
        raise SnvbertError(f"region={text} is on {name}, and the panel holds chromosome {chrom}")
    if start < 1 or end < start:
        raise SnvbertError(f"region={text}: START must be at least 1 and END at least START")
    return start, end


def in_region(data: Panel | Target, start: int, end: int) -> Panel | Target:
    """The sites of a panel or target with start <= POS <= end (a view: nothing is copied)."""
    lo, hi = np.searchsorted(data.pos, [start, end + 1])
    rows = slice(int(lo), int(hi))
    common = {"pos": data.pos[rows], "ref": data.ref[rows], "alt": data.alt[rows]}
    if isinstance(data, Panel):
        return replace(data, **common, haplotypes=data.haplotypes[rows])
    return replace(data, **common, genotypes=data.genotypes[rows], phased=data.phased[rows])


def prepare_target(
    pan: Panel, target_path: Path, panel_path: Path, region: tuple[int, int] | None = None
) -> tuple[Target, SiteMatch, np.ndarray]:
    """Read, check and match a target: (target, site match, alleles at matched panel sites).

    The alleles (m, 2n) int8 are recoded where REF/ALT were swapped; -1 = missing call.
    ``region`` (start, end): only the target's sites in it (``pan`` already restricted to it).
    """
    try:
        tgt = read_target(target_path, chrom=pan.chrom)
    except SnvbertError as err:
        if "has no records on chromosome" in str(err):
            raise SnvbertError(
                f"target {target_path} and panel {panel_path} share no chromosome ({err}); "
                "impute each chromosome against its own panel"
            ) from err
        raise
    if region is not None:
        tgt = in_region(tgt, *region)
    _check_phased(tgt, panel_path)
    match = match_sites(pan, tgt)
    n_matched = len(match.panel_index)
    if n_matched < _MIN_OVERLAP_SITES or n_matched < _MIN_OVERLAP_FRACTION * tgt.n_sites:
        raise SnvbertError(
            f"target {target_path} and panel {panel_path} share only {n_matched} of the target's "
            f"{tgt.n_sites:,} sites (by CHROM:POS:REF:ALT); they are probably on different genome "
            "builds or chromosomes: lift the target over to the panel's build (e.g. bcftools "
            "+liftover or Picard LiftoverVcf)"
        )
    calls = tgt.genotypes[match.target_index]  # (m, 2n)
    calls = np.where(match.flipped[:, None] & (calls >= 0), 1 - calls, calls).astype(np.int8)
    return tgt, match, calls
