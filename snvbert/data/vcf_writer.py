"""The imputed VCF: phased GT and DS (and GP, ``gp=True``) per sample, AF, DR2 and IMP per site, as
Beagle 5 writes them (GP is Beagle's ``gp=true``; its default, like ours, leaves it out), and
DOSESUMS, the sums AF and DR2 are made from, so target batches merge exactly.

Typed calls are written as given, predictions elsewhere, target-only sites passed through; the
file is bgzipped, tabix-indexed and written atomically (:func:`snvbert.utils.io.write_bgzipped_vcf`).
Sample columns have a fixed width, so whole blocks are formatted by one compiled loop (numba).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit, prange

from snvbert.data.sites import SiteMatch
from snvbert.data.vcf import Panel, Target
from snvbert.utils.io import write_bgzipped_vcf

# Bytes of one sample column and its tab: "a|b:D.DDD:G.GGG,G.GGG,G.GGG" with GP, "a|b:D.DDD" without.
_FIELD = {True: 28, False: 10}
_CHUNK_ROWS = 2048  # VCF records formatted at once: bounds memory whatever the panel size


def write_imputed(
    out: Path,
    pan: Panel,
    tgt: Target,
    match: SiteMatch,
    calls: np.ndarray,
    probs: np.ndarray,
    panel_path: Path,
    command: str,
    *,
    gp: bool = False,
) -> int:
    """Write the output VCF: typed calls as given, predictions elsewhere; returns its records.

    ``probs`` (n_panel_sites, 2n) P(ALT) is overwritten at typed, non-missing calls. ``gp``
    adds the genotype probabilities (GT:DS:GP; GT:DS without, as Beagle's default).
    """
    typed = calls >= 0
    probs[match.panel_index] = np.where(typed, calls, probs[match.panel_index])
    imputed = np.ones(pan.n_sites, dtype=bool)
    imputed[match.panel_index] = False
    records = _merge_passthrough(pan, tgt, match, probs, imputed)
    header = _header(pan.chrom, _contig_length(panel_path, pan.chrom), tgt.samples, command, gp)
    write_bgzipped_vcf(_vcf_lines(records, header, gp), out)
    return len(records.pos)


def _merge_passthrough(
    pan: Panel, tgt: Target, match: SiteMatch, probs: np.ndarray, imputed: np.ndarray
) -> _Records:
    """Panel rows plus target-only rows, ordered by position."""
    pt = match.passthrough
    pt_calls = tgt.genotypes[pt].astype(np.float32)
    pt_calls[pt_calls < 0] = np.nan
    pos = np.concatenate([pan.pos, tgt.pos[pt]])
    order = np.argsort(pos, kind="stable")
    n_pt = len(pt)
    return _Records(
        chrom=pan.chrom,
        pos=pos[order],
        ref=np.concatenate([pan.ref, tgt.ref[pt]])[order],
        alt=np.concatenate([pan.alt, tgt.alt[pt]])[order],
        probs=np.concatenate([probs, pt_calls])[order] if n_pt else probs,
        imputed=np.concatenate([imputed, np.zeros(n_pt, dtype=bool)])[order],
        passthrough=np.concatenate([np.zeros(pan.n_sites, dtype=bool), np.ones(n_pt, bool)])[order],
    )


@njit(cache=True)
def _digits(value: float, out: np.ndarray, at: int) -> None:  # pragma: no cover - compiled
    """'d.ddd' of round(value * 1000) (half to even, as np.rint) into out[at : at + 5]."""
    v = np.int64(np.rint(value * 1000.0))
    out[at] = 48 + v // 1000 % 10
    out[at + 1] = 46  # "."
    out[at + 2] = 48 + v // 100 % 10
    out[at + 3] = 48 + v // 10 % 10
    out[at + 4] = 48 + v % 10


@njit(parallel=True, cache=True)
def _format(p: np.ndarray, buf: np.ndarray) -> None:  # pragma: no cover - compiled
    rows, n, width = buf.shape[0], buf.shape[1], buf.shape[2]
    for r in prange(rows):
        for i in range(n):
            p1, p2 = np.float64(p[r, 2 * i]), np.float64(p[r, 2 * i + 1])
            out = buf[r, i]
            out[0] = 49 if p1 > 0.5 else 48
            out[1] = 124  # "|"
            out[2] = 49 if p2 > 0.5 else 48
            out[3] = 58  # ":"
            _digits(p1 + p2, out, 4)
            if width > 10:  # GP
                out[9] = 58
                _digits((1 - p1) * (1 - p2), out, 10)
                out[15] = 44  # ","
                _digits(p1 * (1 - p2) + (1 - p1) * p2, out, 16)
                out[21] = 44
                _digits(p1 * p2, out, 22)
            out[width - 1] = 9  # tab
        if n:
            buf[r, n - 1, width - 1] = 10  # newline


def format_samples(p: np.ndarray, gp: bool = False) -> np.ndarray:
    """Sample columns for complete rows: uint8 (rows, n_samples, width) of fixed-width text.

    p (rows, 2 * n_samples) P(ALT) per haplotype. Every field has a fixed width (GT 3, DS 5,
    GP 17 characters; width 28 with GP, 10 without), so the whole block is filled by one
    compiled loop, no per-genotype string formatting: 40k sites x 100 people take a fraction of
    a second. The last byte of a row is a newline.
    """
    rows, n = p.shape[0], p.shape[1] // 2
    buf = np.empty((rows, n, _FIELD[gp]), dtype=np.uint8)
    _format(np.ascontiguousarray(p), buf)
    return buf


def _format_missing_row(p: np.ndarray, gp: bool) -> bytes:
    """Sample columns of a pass-through row with missing calls (NaN): rare, so plain Python."""
    fields = []
    for a, b in zip(p[0::2], p[1::2], strict=True):
        if np.isnan(a) or np.isnan(b):
            fields.append("./.:.:." if gp else "./.:.")
            continue
        field = f"{int(a)}|{int(b)}:{a + b:.3f}"
        if gp:
            g = ((1 - a) * (1 - b), a * (1 - b) + (1 - a) * b, a * b)
            field += f":{g[0]:.3f},{g[1]:.3f},{g[2]:.3f}"
        fields.append(field)
    return ("\t".join(fields) + "\n").encode()


# AF and DR2 come from exact integer sums, so that several batches' sums are exactly those of one
# run over all of them: each P(ALT) on the grid of the written DS (1/1000), summed in int64,
# then as Python integers. DR2's sums take the probabilities with their tails cut: below
# DR2_TAIL a P(ALT) counts as 0, above 1 - DR2_TAIL as 1. The small probabilities many
# non-carriers get inflate the variance DR2 divides by, so that DR2 fell below the true r² at
# almost every site. Measured (README, Scale; mean |DR2 - true r²| over the scored sites): on the
# 5 Mb bench case 0.076 uncut, 0.057 cut at 0.05 (Beagle 5.4: 0.062); on the held-out case
# (OutOfAfrica_2T12, seed 2) 0.113 -> 0.096 clean (Beagle 0.099) and 0.121 -> 0.115 realistic
# (Beagle 0.115).
_GRID = 1000
DR2_TAIL = 0.05
_SUM_SAMPLES = 4096  # samples summed at once: bounds the int64 temporaries, whatever the cohort


def dose_sums(p: np.ndarray) -> np.ndarray:
    """The sufficient statistics of each site's AF and DR2, (rows, 5) of Python integers: over
    the samples called there, with each haplotype's P(ALT) on the 1/1000 grid, the sum of DS
    (for AF), then with the tails cut (:data:`DR2_TAIL`) the sums of DS, DS^2 and p1 p2 (for
    DR2; DS in thousandths, the others in millionths), and the number of samples. Several
    target batches' sums add up exactly to those of one run over all of them (the INFO field
    DOSESUMS; ``python -m snvbert.merge``).

    p (rows, 2 * n_samples) haplotype ALT probabilities, NaN where a call is missing.
    """
    out = np.zeros((p.shape[0], 5), dtype=object)
    out[:] = 0
    for start in range(0, max(p.shape[1] // 2, 1), _SUM_SAMPLES):
        q = p[:, 2 * start : 2 * (start + _SUM_SAMPLES)].astype(np.float64)
        called = ~np.isnan(q[:, 0::2] + q[:, 1::2])
        q = np.where(np.isnan(q), 0.0, q)
        k = np.rint(q * _GRID).astype(np.int64)
        cut = np.where(q < DR2_TAIL, 0, np.where(q > 1.0 - DR2_TAIL, _GRID, k))
        k1, k2 = np.where(called, cut[:, 0::2], 0), np.where(called, cut[:, 1::2], 0)
        ds = k1 + k2
        ds_af = np.where(called, k[:, 0::2] + k[:, 1::2], 0)
        part = np.stack(
            [ds_af.sum(1), ds.sum(1), (ds * ds).sum(1), (k1 * k2).sum(1), called.sum(1)], 1
        )
        out += part.astype(object)  # Python integers from here: exact, unbounded
    return out


def af_dr2(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AF (mean dose / 2; NaN with no call) and DR2 from :func:`dose_sums`.

    DR2 is Beagle 5's estimated squared correlation of estimated and true ALT dose (its
    R2Estimator.doseR2): the variance of the dosages over the variance the true dose has under
    the same posteriors, [sum DS^2 - (sum DS)^2 / n] / [sum E(X^2) - (sum DS)^2 / n] with
    E(X^2) = P(het) + 4 P(hom alt) = DS + 2 p1 p2, over the probabilities with their tails cut;
    0 for a monomorphic site. Computed from the integer sums exactly, then divided once.
    """
    af = np.full(len(sums), np.nan)
    dr2 = np.zeros(len(sums))
    for i, (a_af, a, b, c, n) in enumerate(sums):
        a_af, a, b, c, n = int(a_af), int(a), int(b), int(c), int(n)
        if n == 0:
            continue
        af[i] = a_af / (2 * n * _GRID)
        num = max(n * b - a * a, 0)  # n G^2 (sum DS^2 - (sum DS)^2 / n)
        den = n * (a * _GRID + 2 * c) - a * a  # n G^2 (sum E(X^2) - (sum DS)^2 / n)
        if den / (n * _GRID * _GRID) >= 1e-8:
            dr2[i] = num / den
    return af, dr2


def dosage_r2(p: np.ndarray) -> np.ndarray:
    """Beagle 5's DR2 per row (:func:`af_dr2`) from haplotype ALT probabilities (rows, 2n)."""
    return af_dr2(dose_sums(p))[1]


@dataclass
class _Records:
    """The output rows in position order: panel sites (imputed or typed) and pass-through ones."""

    chrom: str
    pos: np.ndarray
    ref: np.ndarray
    alt: np.ndarray
    probs: np.ndarray  # (rows, 2n) float32, NaN = missing (pass-through only)
    imputed: np.ndarray  # bool (rows,)
    passthrough: np.ndarray  # bool (rows,)


def _vcf_lines(records: _Records, header: list[str], gp: bool) -> Iterator[bytes]:
    """Header, then records in chunks of text (bytes, one per chunk)."""
    yield ("\n".join(header) + "\n").encode()
    fmt = "GT:DS:GP" if gp else "GT:DS"
    p_all = records.probs
    for start in range(0, len(records.pos), _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, len(records.pos))
        p = p_all[start:stop]
        complete = ~np.isnan(p).any(1)
        block = format_samples(np.where(np.isnan(p), 0.0, p), gp)
        sums = dose_sums(p)
        af, dr2 = af_dr2(sums)
        parts: list[bytes] = []
        for i in range(stop - start):
            row = start + i
            info = info_field(af[i], None if records.passthrough[row] else dr2[i], sums[i])
            if records.imputed[row]:
                info += ";IMP"
            parts.append(
                f"{records.chrom}\t{records.pos[row]}\t.\t{records.ref[row]}\t{records.alt[row]}"
                f"\t.\tPASS\t{info}\t{fmt}\t".encode()
            )
            parts.append(block[i].tobytes() if complete[i] else _format_missing_row(p[i], gp))
        yield b"".join(parts)


def _fmt_af(x: float) -> str:
    return "." if not math.isfinite(x) else f"{x:.4g}"


def info_field(af: float, dr2: float | None, sums: Sequence[int]) -> str:
    """``AF=..;DR2=..;DOSESUMS=a|b|c|d|n`` (DR2 left out for a pass-through site): the exact
    integer sums of :func:`dose_sums`, so that batches merge to one run's values."""
    info = f"AF={_fmt_af(af)}"
    if dr2 is not None:
        info += f";DR2={dr2:.2f}"
    return info + ";DOSESUMS=" + "|".join(str(int(x)) for x in sums)


def _contig_length(panel_path: Path, chrom: str) -> int | None:
    """The contig's length from the panel header, when it declares one."""
    from cyvcf2 import VCF

    vcf = VCF(str(panel_path), lazy=True)
    try:
        lengths = dict(zip(vcf.seqnames, vcf.seqlens, strict=False))
    except Exception:  # cyvcf2 raises when the header has no contig lengths
        return None
    finally:
        vcf.close()
    value = lengths.get(chrom)
    return int(value) if value else None


def _header(
    chrom: str, length: int | None, samples: list[str], command: str, gp: bool
) -> list[str]:
    from snvbert import __version__

    contig = f"##contig=<ID={chrom}" + (f",length={length}>" if length else ">")
    return [
        "##fileformat=VCFv4.2",
        f"##filedate={datetime.date.today():%Y%m%d}",
        f"##source=snvbert {__version__}",
        f"##snvbertCommand={command}",
        '##FILTER=<ID=PASS,Description="All filters passed">',
        contig,
        '##INFO=<ID=AF,Number=A,Type=Float,Description="Estimated ALT allele frequency (mean dosage / 2)">',
        '##INFO=<ID=DR2,Number=A,Type=Float,Description="Dosage R-squared: estimated squared '
        'correlation between estimated and true ALT dose (Beagle 5 definition)">',
        '##INFO=<ID=IMP,Number=0,Type=Flag,Description="Imputed marker">',
        '##INFO=<ID=DOSESUMS,Number=1,Type=String,Description="Over the called samples, with p1 '
        "and p2 the haplotype ALT probabilities in thousandths: the sum of DS; with p below 0.05 "
        "as 0 and above 0.95 as 1, the sums of DS, DS^2 (millionths) and p1*p2 (millionths); "
        "and the number of samples, as a|b|c|d|n: the exact sufficient statistics of AF and "
        'DR2, which add up across target batches (python -m snvbert.merge)">',
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        '##FORMAT=<ID=DS,Number=A,Type=Float,Description="Estimated ALT dose [P(RA) + 2*P(AA)]">',
        *(
            ['##FORMAT=<ID=GP,Number=G,Type=Float,Description="Estimated genotype probability">']
            if gp
            else []
        ),
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(samples),
    ]
