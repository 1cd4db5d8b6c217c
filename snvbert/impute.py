"""``python -m snvbert.impute``: impute a phased target (array) VCF against a reference panel.

::

    python -m snvbert.impute ckpt=run/checkpoints/last.ckpt panel=panel.vcf.gz \\
        target=array.vcf.gz out=imputed.vcf.gz

The steps, each of which names what it changed:

1. **Checkpoint.** The model, and the description of the data it was trained on (saved by
   :class:`~snvbert.data.datamodule.SNVDataModule` in every checkpoint): the panel fingerprint,
   the window geometry, the retrieval context. A panel with another fingerprint is an error:
   windows and site indices would silently mean something else.
2. **Site matching** by CHROM:POS:REF:ALT (:func:`match_sites`). A ``chr`` prefix difference is
   harmonised; REF/ALT-swapped sites are flipped (never strand-ambiguous A/T, C/G ones); sites
   whose alleles do not match are dropped; target sites absent from the panel are written
   through unchanged. Too little overlap means another build or chromosome: an error.
3. **Queries.** Each target haplotype is observed at its matched, non-missing sites and hidden
   everywhere else: untyped panel sites and missing calls alike are predicted.
4. **Windows** exactly as in training; per window, batches of target people are assembled,
   their neighbours retrieved from the reference haplotypes, and the network run. Each site
   takes the prediction of the one window whose core holds it. The Li–Stephens feature over
   the panel runs once per chunk of people over the whole chromosome's typed sites (switch
   rates from the genetic map the model was trained with, or ``genetic_map=``), not once per
   window.
5. **Output**: a bgzipped, tabix-indexed VCF with phased GT, DS and GP per sample and AF, DR2
   and IMP per site, as Beagle 5 writes them; written atomically.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from snvbert.data.datamodule import assemble_batch, panel_inputs, retrieve
from snvbert.data.genetic_map import genetic_positions
from snvbert.data.retrieval import (
    IBS_DEFAULTS,
    Retriever,
    estimate_err,
    forward_backward,
    ibs_states,
    switch_probabilities,
)
from snvbert.data.vcf import Panel, Target, load_panel, read_target
from snvbert.data.windows import make_windows
from snvbert.errors import SnvbertError
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import write_bgzipped_vcf

log = logging.getLogger("snvbert.impute")

IMPUTE_STREAM = 7
"""Tie-break stream of imputation; training uses 0, evaluation 1-3. Fixed: imputation is
deterministic, the same target gives the same output on every run."""

_STRAND_AMBIGUOUS = frozenset({("A", "T"), ("T", "A"), ("C", "G"), ("G", "C")})
_MIN_OVERLAP_SITES = 5
_MIN_OVERLAP_FRACTION = 0.01
_FIELD = 28  # bytes of one sample column: "a|b:D.DDD:G.GGG,G.GGG,G.GGG" and a tab
_CHUNK_ROWS = 2048  # VCF records formatted at once: bounds memory whatever the panel size


# --- checkpoint ---------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """The network and what imputation must reproduce of its training data."""

    net: torch.nn.Module
    describe: dict[str, Any]
    retrieval: dict[str, Any]


def load_trained(ckpt: str | Path, device: torch.device) -> TrainedModel:
    """Load a checkpoint written by ``snvbert.train``; errors name the file and what to do."""
    from snvbert.model.module import SNVBertModule

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise SnvbertError("checkpoint not found; pass ckpt=PATH to a .ckpt file", path=ckpt)
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise SnvbertError(f"cannot be read as a checkpoint ({err})", path=ckpt) from err
    describe = (raw.get("SNVDataModule") or {}).get("describe") if isinstance(raw, dict) else None
    if not describe:
        raise SnvbertError(
            "holds no description of its training data (SNVDataModule state); pass a checkpoint "
            "written by python -m snvbert.train",
            path=ckpt,
        )
    module = SNVBertModule.load_from_checkpoint(ckpt, map_location=device, weights_only=False)
    module.eval()
    if not isinstance(describe.get("retrieval"), dict):
        raise SnvbertError(
            "lacks the retrieval settings of its training run; retrain with this snvbert version",
            path=ckpt,
        )
    return TrainedModel(module.net, dict(describe), dict(describe["retrieval"]))


# --- site matching ------------------------------------------------------------------------


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


# --- the model over windows -----------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SnvbertError(f"device='{device}' must be auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SnvbertError("device=cuda but no CUDA device is available; use device=cpu")
    return torch.device(device)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU that has it (precision=auto), full precision otherwise."""
    p = str(precision)
    if p == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    if p in ("32", "32-true", "fp32"):
        return None
    if p in ("bf16", "bf16-mixed"):
        return torch.bfloat16
    raise SnvbertError(f"precision='{precision}' must be auto, 32 or bf16")


def predict(
    model: TrainedModel,
    panel: Panel,
    typed_sites: np.ndarray,
    typed_alleles: np.ndarray,
    query_persons: np.ndarray,
    ref_persons: np.ndarray,
    af: np.ndarray,
    *,
    k: int,
    batch_size: int,
    morgans: np.ndarray | None = None,
    hmm_err: float | None = None,
    hmm_ibs: dict[str, Any] | None | str = "train",
    device: torch.device,
    autocast: torch.dtype | None,
    progress: bool = True,
) -> np.ndarray:
    """P(ALT) per panel site and target haplotype, float32 (n_sites, 2 * n_targets).

    typed_sites (m,) increasing panel site indices observed in the target; typed_alleles
    (m, 2 * n_targets) int8 0/1, -1 where a call is missing (hidden, so predicted).
    query_persons (n_targets,) the person id of each target in retrieval exclusion: a panel
    index when the target is also a panel person (so it never retrieves itself), else negative.
    morgans (n_sites,) the panel sites' genetic positions (None: a constant 1 cM/Mb).
    hmm_err the HMM's mismatch rate (None: the one the model was trained with). hmm_ibs the
    panel-state HMM's IBS state selection (:func:`ibs_states` keyword arguments; None: every
    reference haplotype is a state; "train": as the model was trained).
    """
    describe = model.describe
    length = int(describe["window"]["length"])
    windows = make_windows(
        panel.pos, length, int(describe["window"]["overlap"]), int(describe["context_bp"])
    )
    seed = int(describe.get("seed", 1))
    retrieval = {key: v for key, v in model.retrieval.items() if key != "k"}
    retriever = Retriever(k=k, **retrieval)
    ref_persons = np.asarray(ref_persons, dtype=np.int64)
    ref_haps = np.stack([2 * ref_persons, 2 * ref_persons + 1], 1).ravel()
    n_targets = len(query_persons)
    probs = np.full((panel.n_sites, 2 * n_targets), np.nan, dtype=np.float32)
    chunks = [np.arange(i, min(i + batch_size, n_targets)) for i in range(0, n_targets, batch_size)]
    hmm = describe.get("hmm")
    if hmm is not None and hmm_err is not None:
        hmm = {**hmm, "err": float(hmm_err)}
    if hmm is not None and hmm_ibs != "train":
        hmm = {key: v for key, v in hmm.items() if key != "ibs"}
        hmm |= {} if hmm_ibs is None else {"ibs": hmm_ibs}
    whole = _whole_chromosome_hmm(hmm, typed_sites, len(ref_haps), batch_size)
    if hmm is not None and hmm.get("states") == "panel" and not whole:
        log.info("the chromosome-wide HMM would not fit in memory: the HMM runs per window")
    if whole:
        morgans = genetic_positions(panel.pos, None) if morgans is None else morgans
        ref_typed, switch = _typed_states(panel, typed_sites, ref_haps, morgans, hmm, device)
        typed_morgan = torch.from_numpy(morgans[typed_sites]).to(device)

    bar = tqdm(
        total=len(windows) * len(chunks),
        desc="imputing",
        unit=" batches",
        file=sys.stderr,
        disable=None if progress else True,
    )
    # People outer, windows inner: each chunk's HMM runs once over the whole chromosome.
    for people in chunks:
        rows = np.stack([2 * people, 2 * people + 1], 1).ravel()  # rows 2i, 2i+1: one person
        persons = np.repeat(query_persons[people], 2)
        haps = np.where(persons >= 0, 2 * persons + np.tile([0, 1], len(people)), -1 - rows)
        calls_all = typed_alleles[:, rows]  # (m, B) 0/1, -1 missing
        post_all = None
        if whole:
            q = hmm_query(calls_all).to(device)
            allowed = _allowed_states(persons, ref_persons).to(device)
            if hmm.get("ibs") is not None:
                allowed = ibs_states(q, ref_typed, typed_morgan, allowed, **hmm["ibs"])
            post_all = forward_backward(
                ref_typed, q, allowed, switch, float(hmm["err"])
            )  # (B, N, m)
        for window in windows:
            c0, c1 = window.ctx_start, window.ctx_end
            ctx_rows = np.asarray(panel.haplotypes[c0:c1])  # (C, n_panel_haps)
            side = panel_inputs(
                ctx_rows, ref_haps, ref_persons, window, seed=seed, stream=IMPUTE_STREAM, epoch=0
            )
            lo, hi = np.searchsorted(typed_sites, [c0, c1])
            cols = typed_sites[lo:hi] - c0
            calls = calls_all[lo:hi].T  # (B, m_w)
            hidden = np.ones((len(rows), c1 - c0), dtype=bool)
            hidden[:, cols] = calls < 0
            observed = np.zeros((len(rows), c1 - c0), dtype=np.int8)
            observed[:, cols] = np.maximum(calls, 0)
            batch = assemble_batch(
                window,
                length,
                observed,
                observed,
                hidden,
                pos=panel.pos,
                morgans=morgans,
                af=af,
                haps=haps,
                persons=persons,
            )
            batch = {key: v.to(device) for key, v in (batch | side).items()}
            panel_post = None
            if post_all is not None and hi > lo:
                panel_post = (post_all[:, :, lo:hi], torch.from_numpy(cols).to(device))
            batch = retrieve(batch, retriever, hmm, panel_post)
            with (
                torch.inference_mode(),
                torch.autocast(
                    device.type, dtype=autocast or torch.float32, enabled=autocast is not None
                ),
            ):
                logits = model.net(batch)["logits"]
            p = torch.sigmoid(logits.float())[:, : window.length].cpu().numpy()  # (B, W)
            cs, ce = window.core_start - window.start, window.core_end - window.start
            probs[window.core_start : window.core_end, rows[0] : rows[-1] + 1] = p[:, cs:ce].T
            bar.update()
    bar.close()
    return probs


# Largest chromosome-wide HMM forward pass kept in memory (float32), per chunk of people.
HMM_MEMORY_BYTES = 3 * 1024**3


def _typed_states(
    panel: Panel,
    typed_sites: np.ndarray,
    ref_haps: np.ndarray,
    morgans: np.ndarray,
    hmm: dict[str, Any],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The HMM's states at the typed sites: (m, N) +-1 reference alleles, and (m,) switch rates."""
    ref_typed = torch.from_numpy(
        2 * np.asarray(panel.haplotypes[typed_sites])[:, ref_haps].astype(np.int8) - 1
    ).to(device)
    switch = switch_probabilities(
        torch.from_numpy(morgans[typed_sites]), float(hmm["ne"]), len(ref_haps)
    ).to(device)
    return ref_typed, switch


def hmm_query(calls: np.ndarray) -> torch.Tensor:
    """Calls (m, B) 0/1, -1 missing, as the HMM's query: int8 +-1, 0 where missing."""
    return torch.from_numpy(np.where(calls < 0, 0, 2 * calls.astype(np.int8) - 1).astype(np.int8))


def _allowed_states(persons: np.ndarray, ref_persons: np.ndarray) -> torch.Tensor:
    """(B, N) bool: which reference haplotypes each query may copy (never its own person's)."""
    return torch.from_numpy(persons[:, None] != np.repeat(ref_persons, 2)[None, :])


# At most this many typed sites and target haplotypes inform the estimated HMM error rate.
ERR_FIT_SITES = 4000
ERR_FIT_HAPS = 256


def fit_hmm_err(
    model: TrainedModel,
    panel: Panel,
    typed_sites: np.ndarray,
    typed_alleles: np.ndarray,
    query_persons: np.ndarray,
    ref_persons: np.ndarray,
    morgans: np.ndarray,
    device: torch.device,
) -> float | None:
    """The HMM mismatch rate these targets call for (EM, :func:`estimate_err`); None without HMM.

    Genotyping errors and phase switches raise it, an error-free array lowers it towards Li and
    Stephens' value; a fixed rate is right for one kind of array only (on the 5 Mb scenario the
    whole-panel HMM's r² is 0.9719 at 1e-4 and 0.9714 at 0.002 on the clean array, 0.9620 and
    0.9646 on the realistic one, with 0.5 % genotype errors). At most ERR_FIT_SITES typed sites
    (the middle ones) and ERR_FIT_HAPS target haplotypes are used, the HMM over the reference
    haplotypes.
    """
    hmm = model.describe.get("hmm")
    if hmm is None or len(typed_sites) < 2:
        return None
    m = len(typed_sites)
    lo = max(0, (m - ERR_FIT_SITES) // 2)
    sites = slice(lo, lo + ERR_FIT_SITES)
    ref_haps = np.stack([2 * ref_persons, 2 * ref_persons + 1], 1).ravel()
    ref_typed, switch = _typed_states(panel, typed_sites[sites], ref_haps, morgans, hmm, device)
    calls = typed_alleles[sites, :ERR_FIT_HAPS]
    persons = np.repeat(query_persons, 2)[:ERR_FIT_HAPS]
    q, allowed = hmm_query(calls).to(device), _allowed_states(persons, ref_persons).to(device)
    # per query: the forward pass (4 bytes a state and site), the posterior product and mask
    batch = max(1, HMM_MEMORY_BYTES // max(1, ref_typed.numel() * 12))
    return estimate_err(ref_typed, q, allowed, switch, start=float(hmm["err"]), batch=batch)


def _whole_chromosome_hmm(
    hmm: dict[str, Any] | None, typed_sites: np.ndarray, n_states: int, batch_size: int
) -> bool:
    """Whether imputation runs the panel-state HMM once per chromosome (else once per window).

    Once per chromosome is exact where training's per-window HMM is an approximation (its
    context is the window's, not the chromosome's) and costs one pass instead of one per
    window; it keeps (typed sites x 2 x batch_size x reference haplotypes) floats in memory.
    """
    if hmm is None or hmm.get("states") != "panel" or len(typed_sites) == 0:
        return False
    return len(typed_sites) * 2 * batch_size * n_states * 4 <= HMM_MEMORY_BYTES


# --- VCF output -------------------------------------------------------------------------------


def _digits(thousandths: np.ndarray) -> np.ndarray:
    """'d.ddd' as ASCII bytes (..., 5) for integers 0..9999 (thousandths)."""
    v = thousandths.astype(np.int64)
    out = np.stack([v // 1000 % 10, np.zeros_like(v), v // 100 % 10, v // 10 % 10, v % 10], -1)
    out = (out + ord("0")).astype(np.uint8)
    out[..., 1] = ord(".")
    return out


def format_samples(p: np.ndarray) -> np.ndarray:
    """Sample columns for complete rows: uint8 (rows, n_samples, 28) of fixed-width text.

    p (rows, 2 * n_samples) P(ALT) per haplotype. Every field has a fixed width (GT 3, DS 5,
    GP 17 characters), so the whole block is filled with numpy, no per-genotype formatting: 40k
    sites x 100 people take well under a second. The last byte of a row is a newline.
    """
    rows, n = p.shape[0], p.shape[1] // 2
    p1, p2 = p[:, 0::2].astype(np.float64), p[:, 1::2].astype(np.float64)
    g0, g1, g2 = (1 - p1) * (1 - p2), p1 * (1 - p2) + (1 - p1) * p2, p1 * p2
    buf = np.empty((rows, n, _FIELD), dtype=np.uint8)
    buf[..., 0] = np.where(p1 > 0.5, ord("1"), ord("0"))
    buf[..., 1] = ord("|")
    buf[..., 2] = np.where(p2 > 0.5, ord("1"), ord("0"))
    buf[..., 3] = ord(":")
    buf[..., 4:9] = _digits(np.rint((p1 + p2) * 1000))
    buf[..., 9] = ord(":")
    buf[..., 10:15] = _digits(np.rint(g0 * 1000))
    buf[..., 15] = ord(",")
    buf[..., 16:21] = _digits(np.rint(g1 * 1000))
    buf[..., 21] = ord(",")
    buf[..., 22:27] = _digits(np.rint(g2 * 1000))
    buf[..., 27] = ord("\t")
    buf[:, -1, 27] = ord("\n")
    return buf


def _format_missing_row(p: np.ndarray) -> str:
    """Sample columns of a pass-through row with missing calls (NaN): rare, so plain Python."""
    fields = []
    for a, b in zip(p[0::2], p[1::2], strict=True):
        if np.isnan(a) or np.isnan(b):
            fields.append("./.:.:.")
            continue
        g = ((1 - a) * (1 - b), a * (1 - b) + (1 - a) * b, a * b)
        fields.append(f"{int(a)}|{int(b)}:{a + b:.3f}:{g[0]:.3f},{g[1]:.3f},{g[2]:.3f}")
    return "\t".join(fields) + "\n"


def dosage_r2(p: np.ndarray) -> np.ndarray:
    """Beagle 5's DR2 per row, from haplotype ALT probabilities p (rows, 2 * n_samples).

    The estimated squared correlation of estimated and true ALT dose: the variance of the
    dosages over the variance the true dose has under the same posteriors,
    [sum DS^2 - (sum DS)^2 / n] / [sum E(X^2) - (sum DS)^2 / n], with E(X^2) = P(het) + 4 P(hom
    alt); 0 for a monomorphic site (Beagle's R2Estimator.doseR2).
    """
    p1, p2 = p[:, 0::2].astype(np.float64), p[:, 1::2].astype(np.float64)
    n = p1.shape[1]
    ds = p1 + p2
    ex2 = p1 * (1 - p2) + (1 - p1) * p2 + 4 * p1 * p2
    mean_term = ds.sum(1) ** 2 / n
    num = np.maximum((ds * ds).sum(1) - mean_term, 0.0)
    den = ex2.sum(1) - mean_term
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den < 1e-8, 0.0, num / den)


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


def _vcf_lines(records: _Records, header: list[str]) -> Iterator[str]:
    """Header, then records in chunks of text (one string per chunk)."""
    yield "\n".join(header) + "\n"
    p_all = records.probs
    for start in range(0, len(records.pos), _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, len(records.pos))
        p = p_all[start:stop]
        complete = ~np.isnan(p).any(1)
        block = format_samples(np.where(np.isnan(p), 0.0, p))
        ds = p[:, 0::2].astype(np.float64) + p[:, 1::2]
        af = np.nanmean(ds, axis=1) / 2 if p.shape[1] else np.zeros(len(p))
        dr2 = dosage_r2(np.where(np.isnan(p), 0.0, p))
        parts: list[str] = []
        for i in range(stop - start):
            row = start + i
            info = f"AF={_fmt_af(af[i])}"
            if not records.passthrough[row]:
                info += f";DR2={dr2[i]:.2f}"
            if records.imputed[row]:
                info += ";IMP"
            parts.append(
                f"{records.chrom}\t{records.pos[row]}\t.\t{records.ref[row]}\t{records.alt[row]}"
                f"\t.\tPASS\t{info}\tGT:DS:GP\t"
            )
            if complete[i]:
                parts.append(block[i].tobytes().decode("ascii"))
            else:
                parts.append(_format_missing_row(p[i]))
        yield "".join(parts)


def _fmt_af(x: float) -> str:
    return "." if not math.isfinite(x) else f"{x:.4g}"


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


def _header(chrom: str, length: int | None, samples: list[str], command: str) -> list[str]:
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
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        '##FORMAT=<ID=DS,Number=A,Type=Float,Description="Estimated ALT dose [P(RA) + 2*P(AA)]">',
        '##FORMAT=<ID=GP,Number=G,Type=Float,Description="Estimated genotype probability">',
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(samples),
    ]


# --- the whole job ----------------------------------------------------------------------------


def _resolve_hmm_err(value: str | float | None) -> str | float | None:
    """impute's hmm_err: 'auto', 'train' (None: the checkpoint's value) or a rate in (0, 0.5)."""
    if value == "auto":
        return "auto"
    if value in ("train", None):
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = float("nan")
    if not 0.0 < rate < 0.5:
        raise SnvbertError(f"hmm_err={value} must be auto, train or a rate between 0 and 0.5")
    return rate


# Beagle's imp-states: with more reference haplotypes than this, its IBS selection chooses the
# states. Measured: the IBS states beat every haplotype as states with 2,000 of them (both 5 Mb
# scenarios, every MAF bin) and lose with 600 (the demo panel: 0.904 against 0.909 overall;
# Beagle too is better there with every haplotype a state, 0.914 against 0.913).
IBS_MIN_HAPS = 1600


def _resolve_hmm_states(
    value: str, trained: dict[str, Any] | None, n_ref_haps: int
) -> dict[str, Any] | None | str:
    """impute's hmm_states as predict's hmm_ibs: ibs_states keyword arguments, None or "train".

    ``ibs``: the haplotypes Beagle's IBS selection keeps (the checkpoint's data.hmm.ibs, else
    Beagle's defaults); ``panel``: every reference haplotype; ``train``: as in training;
    ``auto``: ``ibs`` with more than IBS_MIN_HAPS reference haplotypes, else ``panel``.
    """
    if value == "auto":
        value = "ibs" if n_ref_haps > IBS_MIN_HAPS else "panel"
    return {"ibs": trained or dict(IBS_DEFAULTS), "panel": None, "train": "train"}[value]


def impute(
    ckpt: str | Path,
    panel: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    reference: str = "all",
    k: int | None = None,
    genetic_map: str | Path | None = None,
    hmm_err: str | float = "auto",
    hmm_states: str = "auto",
    cache_dir: str | Path = ".snvbert_cache",
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Impute ``target`` against ``panel`` with the model in ``ckpt``; write ``out``.

    ``reference`` chooses the retrieval panel: ``all`` panel people (the targets are outside
    people, as for Beagle) or only the ``train`` people of the checkpoint. ``k`` neighbours per
    query (None: as in training). ``genetic_map`` a PLINK map for the HMM feature's switch
    rates (None: the map the model was trained with, if any). ``hmm_err`` the HMM feature's
    mismatch rate: ``auto`` fits it to the targets (:func:`fit_hmm_err`), ``train`` keeps the
    training value, a number sets it. ``hmm_states`` the panel-state HMM's states
    (:func:`_resolve_hmm_states`). Returns a summary: site counts by kind and every adjustment.
    """
    started = time.perf_counter()
    panel_path, target_path, out = Path(panel), Path(target), Path(out)
    if reference not in ("all", "train"):
        raise SnvbertError(f"reference='{reference}' must be 'all' or 'train'")
    if int(batch_size) < 1:
        raise SnvbertError(f"batch_size={batch_size} must be at least 1")
    err = _resolve_hmm_err(hmm_err)
    if hmm_states not in ("auto", "ibs", "panel", "train"):
        raise SnvbertError(f"hmm_states={hmm_states} must be auto, ibs, panel or train")
    dev = _resolve_device(str(device))
    autocast = _autocast_dtype(str(precision), dev)
    model = load_trained(ckpt, dev)
    describe = model.describe
    trained_ibs = (describe.get("hmm") or {}).get("ibs")

    pan = load_panel(panel_path, cache_dir=cache_dir, progress=progress)
    if pan.fingerprint != describe["panel_fingerprint"]:
        raise SnvbertError(
            f"is not the panel this model was trained on (its fingerprint is "
            f"{pan.fingerprint[:16]}, the checkpoint's {ckpt} expects "
            f"{describe['panel_fingerprint'][:16]}); pass the training panel",
            path=panel_path,
        )
    tgt, match, calls = prepare_target(pan, target_path, panel_path)
    n_matched = len(match.panel_index)
    counts = dict(match.counts)
    counts["chr_renamed"] = tgt.n_sites if tgt.chrom != pan.chrom else 0
    counts.update({f"skipped_{why}": n for why, n in tgt.skipped.items()})

    name_to_index = {s: i for i, s in enumerate(pan.samples)}
    if reference == "all":
        ref_persons = np.arange(pan.n_samples, dtype=np.int64)
    else:
        ref_persons = np.array(
            sorted(name_to_index[s] for s in describe["train_samples"] if s in name_to_index),
            dtype=np.int64,
        )
    # A target who is also a panel person keeps its panel index, so it never retrieves itself.
    query_persons = np.array(
        [name_to_index.get(s, -1 - i) for i, s in enumerate(tgt.samples)], dtype=np.int64
    )
    counts["targets_in_panel"] = int((query_persons >= 0).sum())
    # The targets' own alleles never inform their inputs (as in training, leave them out).
    af_people = np.setdiff1d(ref_persons, query_persons[query_persons >= 0])
    ibs = _resolve_hmm_states(hmm_states, trained_ibs, 2 * len(ref_persons))
    af = pan.alt_freq(af_people)
    k_used = int(k if k is not None else model.retrieval.get("k", 128))
    gmap = genetic_map if genetic_map is not None else describe.get("genetic_map")
    if gmap is not None and not Path(gmap).exists():
        raise SnvbertError(
            "genetic map not found (the model was trained with it); pass genetic_map=PATH",
            path=gmap,
        )
    morgans = genetic_positions(pan.pos, gmap)
    if err == "auto":
        err = fit_hmm_err(
            model, pan, match.panel_index, calls, query_persons, ref_persons, morgans, dev
        )
        if err is not None:
            log.info("HMM mismatch rate fitted to the targets: %.2g", err)

    probs = predict(
        model,
        pan,
        match.panel_index,
        calls,
        query_persons,
        ref_persons,
        af,
        k=k_used,
        batch_size=int(batch_size),
        morgans=morgans,
        hmm_err=err,
        hmm_ibs=ibs,
        device=dev,
        autocast=autocast,
        progress=progress,
    )
    n_written = write_imputed(
        out,
        pan,
        tgt,
        match,
        calls,
        probs,
        panel_path,
        command or _api_command(ckpt, panel_path, target_path, out),
    )
    seconds = time.perf_counter() - started
    summary = {
        "out": str(out),
        "targets": tgt.n_samples,
        "reference_people": int(len(ref_persons)),
        "k": k_used,
        "genetic_map": None if gmap is None else str(gmap),
        "hmm_err": err if err is not None else (describe.get("hmm") or {}).get("err"),
        "hmm_ibs": trained_ibs if ibs == "train" else ibs,
        "sites": {
            "written": n_written,
            "imputed": pan.n_sites - n_matched,
            "typed": n_matched,
            "passthrough": len(match.passthrough),
            "missing_calls_imputed": int((calls < 0).sum()),
        },
        "adjustments": counts,
        "seconds": round(seconds, 2),
    }
    return summary


def prepare_target(
    pan: Panel, target_path: Path, panel_path: Path
) -> tuple[Target, SiteMatch, np.ndarray]:
    """Read, check and match a target: (target, site match, alleles at matched panel sites).

    The alleles (m, 2n) int8 are recoded where REF/ALT were swapped; -1 = missing call.
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


def write_imputed(
    out: Path,
    pan: Panel,
    tgt: Target,
    match: SiteMatch,
    calls: np.ndarray,
    probs: np.ndarray,
    panel_path: Path,
    command: str,
) -> int:
    """Write the output VCF: typed calls as given, predictions elsewhere; returns its records.

    ``probs`` (n_panel_sites, 2n) P(ALT) is overwritten at typed, non-missing calls.
    """
    typed = calls >= 0
    probs[match.panel_index] = np.where(typed, calls, probs[match.panel_index])
    imputed = np.ones(pan.n_sites, dtype=bool)
    imputed[match.panel_index] = False
    records = _merge_passthrough(pan, tgt, match, probs, imputed)
    header = _header(pan.chrom, _contig_length(panel_path, pan.chrom), tgt.samples, command)
    write_bgzipped_vcf(_vcf_lines(records, header), out)
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


def _api_command(ckpt: Path | str, panel: Path, target: Path, out: Path) -> str:
    return f"impute ckpt={ckpt} panel={panel} target={target} out={out}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary for people: what was imputed, typed, passed through, dropped, flipped."""
    s, a = summary["sites"], summary["adjustments"]
    dropped = {
        key.removeprefix("dropped_"): v for key, v in a.items() if key.startswith("dropped_") and v
    }
    skipped = {
        key.removeprefix("skipped_"): v for key, v in a.items() if key.startswith("skipped_") and v
    }
    lines = [
        f"wrote      {summary['out']} ({s['written']:,} records, {summary['targets']:,} people)",
        f"imputed    {s['imputed']:,} panel sites absent from the target, and "
        f"{s['missing_calls_imputed']:,} missing calls at typed sites",
        f"typed      {s['typed']:,} target sites matched to the panel "
        f"({a['flipped']:,} with REF/ALT swapped, recoded)",
        f"passed     {s['passthrough']:,} target-only sites written through unchanged",
        "dropped    "
        + (", ".join(f"{v:,} {why.replace('_', ' ')}" for why, v in dropped.items()) or "none"),
    ]
    if skipped:
        lines.append("skipped    " + ", ".join(f"{v:,} {why}" for why, v in skipped.items()))
    if a.get("chr_renamed"):
        lines.append(f"renamed    {a['chr_renamed']:,} target sites to the panel's chromosome name")
    if a.get("targets_in_panel"):
        lines.append(
            f"note       {a['targets_in_panel']} target people are also panel people; "
            "they never retrieve their own haplotypes"
        )
    lines.append(f"reference  {summary['reference_people']:,} panel people, k={summary['k']}")
    if summary.get("hmm_err") is not None:
        ibs = summary.get("hmm_ibs")
        states = (
            "every reference haplotype"
            if ibs is None
            else (
                f"IBS-selected ({ibs['haps']} a {ibs['step_cm']:g} cM step over {ibs['steps']} steps)"
            )
        )
        lines.append(f"hmm        mismatch rate {summary['hmm_err']:.2g}, states: {states}")
    lines.append(f"time       {summary['seconds']:.1f} s")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://snvbert.conf", config_name="impute")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    for key in ("ckpt", "panel", "target", "out"):
        if not cfg.get(key):
            raise SnvbertError(
                f"set {key}=PATH (python -m snvbert.impute ckpt=... panel=... "
                "target=... out=imputed.vcf.gz)"
            )
    summary = impute(
        cfg.ckpt,
        cfg.panel,
        cfg.target,
        cfg.out,
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision=str(cfg.precision),
        reference=cfg.reference,
        k=cfg.retrieval.k,
        genetic_map=cfg.genetic_map,
        hmm_err=cfg.hmm_err,
        hmm_states=str(cfg.hmm_states),
        cache_dir=cfg.cache_dir,
        progress=cfg.progress,
        command="python -m snvbert.impute " + " ".join(sys.argv[1:]),
    )
    print(format_summary(summary), flush=True)


if __name__ == "__main__":
    main()
