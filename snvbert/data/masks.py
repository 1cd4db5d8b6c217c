"""Masks: which sites of a query haplotype are hidden and must be predicted.

Every mask is a pure function of its key — (seed, stream, epoch, window, haplotype, strategy,
level) — drawn from a ``numpy.random.Generator`` seeded with exactly that key. The global random
state is never read or written, a mask never looks at the alleles it hides, and it does not
depend on the worker, batch, rank or world size that builds it.

Strategies:

- ``random``: each site hidden with probability ``rate``.
- ``maf``: hidden with a probability that rises as the (training-panel) minor allele frequency
  falls, scaled so that the mean rate over the window is ``rate``.
- ``array``: the real task. One chip — a typed-site set, about one site per ``spacing_bp`` among
  sites with MAF >= ``min_maf`` — is drawn per (seed, stream, epoch) for the whole chromosome and
  shared by every haplotype and window; everything else is hidden. With ``spacing_bp_max`` each
  chip's spacing is drawn log-uniformly from [``spacing_bp``, ``spacing_bp_max``] (per seed,
  stream and epoch: arrays of many densities over training). ``missing_rate`` hides typed
  calls at random per haplotype, and ``error_rate`` flips typed alleles, as real chips do.

The retrieval's tie-break scores (:func:`tie_jitter`) are drawn the same way, keyed on
(seed, stream, epoch, window).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from snvbert.errors import SnvbertError

STRATEGIES = ("random", "maf", "array")
TRAIN_STREAM = 0
EVAL_STREAM = 1


@dataclass(frozen=True)
class MaskLevel:
    """One difficulty level of the curriculum (one entry of ``data.curriculum.levels``)."""

    strategy: str = "random"
    rate: float = 0.15
    maf_power: float = 0.5
    spacing_bp: int = 10_000
    min_maf: float = 0.05
    missing_rate: float = 0.0
    error_rate: float = 0.0
    spacing_bp_max: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SnvbertError(f"mask strategy '{self.strategy}' is not one of {STRATEGIES}")
        for name in ("rate", "missing_rate", "error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SnvbertError(f"mask {name}={value} must lie in [0, 1]")
        if self.spacing_bp <= 0:
            raise SnvbertError(f"mask spacing_bp={self.spacing_bp} must be positive")
        if self.spacing_bp_max is not None and self.spacing_bp_max < self.spacing_bp:
            raise SnvbertError(
                f"mask spacing_bp_max={self.spacing_bp_max} must be at least "
                f"spacing_bp={self.spacing_bp}"
            )

    def spacing(self, *, seed: int, stream: int, epoch: int) -> int:
        """The chip spacing of one (seed, stream, epoch): ``spacing_bp``, or with
        ``spacing_bp_max`` a log-uniform draw between the two."""
        if self.spacing_bp_max is None or self.spacing_bp_max == self.spacing_bp:
            return int(self.spacing_bp)
        u = _rng(seed, stream, epoch, 0x5BAC).random()
        lo, hi = np.log(self.spacing_bp), np.log(self.spacing_bp_max)
        return int(round(float(np.exp(lo + u * (hi - lo)))))

    @property
    def code(self) -> int:
        return STRATEGIES.index(self.strategy)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@lru_cache(maxsize=64)
def _chip_cached(
    pos_bytes: bytes,
    maf_bytes: bytes,
    seed: int,
    stream: int,
    epoch: int,
    spacing_bp: int,
    min_maf: float,
) -> np.ndarray:
    pos = np.frombuffer(pos_bytes, dtype=np.int64)
    maf = np.frombuffer(maf_bytes, dtype=np.float64)
    rng = _rng(seed, stream, epoch, 0xC41F)
    eligible = np.flatnonzero(maf >= min_maf)
    typed = np.zeros(len(pos), dtype=bool)
    if len(eligible) == 0:
        return typed
    # A random phase for the bin grid, then one eligible site at random per bin.
    offset = int(rng.integers(spacing_bp))
    bins = (pos[eligible] - pos[0] + offset) // spacing_bp
    order = rng.permutation(len(eligible))
    _, first = np.unique(bins[order], return_index=True)
    typed[eligible[order[first]]] = True
    typed.flags.writeable = False
    return typed


def chip_sites(
    pos: np.ndarray,
    maf: np.ndarray,
    *,
    seed: int,
    stream: int,
    epoch: int,
    spacing_bp: int = 10_000,
    min_maf: float = 0.05,
) -> np.ndarray:
    """The typed sites (bool per site) of the chip for one (seed, stream, epoch)."""
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    maf = np.ascontiguousarray(maf, dtype=np.float64)
    return _chip_cached(
        pos.tobytes(), maf.tobytes(), seed, stream, epoch, int(spacing_bp), float(min_maf)
    )


def draw_mask(
    level: MaskLevel,
    *,
    seed: int,
    stream: int,
    epoch: int,
    window: int,
    hap: int,
    level_index: int,
    maf: np.ndarray,
    typed: np.ndarray | None = None,
) -> np.ndarray:
    """Hidden sites (True) over one window's retrieval context for one haplotype.

    ``maf`` is the training-panel minor allele frequency of the context sites; ``typed`` the
    chip's typed sites over the same context (required for ``array``).
    """
    n = len(maf)
    rng = _rng(seed, stream, epoch, window, hap, level.code, level_index)
    if level.strategy == "random":
        return rng.random(n) < level.rate
    if level.strategy == "maf":
        weight = (np.asarray(maf, dtype=np.float64) + 1e-3) ** -level.maf_power
        prob = np.clip(level.rate * weight / weight.mean(), 0.0, 1.0) if n else weight
        return rng.random(n) < prob
    if typed is None:
        raise SnvbertError("the array mask strategy needs the chip's typed sites")
    hidden = ~typed
    if level.missing_rate > 0:
        hidden = hidden | (rng.random(n) < level.missing_rate)
    return hidden


def genotype_errors(
    level: MaskLevel, *, seed: int, stream: int, epoch: int, window: int, hap: int, n: int
) -> np.ndarray:
    """Sites (True) whose observed allele a chip would miscall, for one haplotype and window."""
    if level.error_rate <= 0:
        return np.zeros(n, dtype=bool)
    rng = _rng(seed, stream, epoch, window, hap, 0xE440)
    return rng.random(n) < level.error_rate


def fingerprint(*masks: np.ndarray) -> str:
    """A short stable hash of masks, logged so that a frozen metric can be told apart from a frozen mask."""
    digest = hashlib.sha1()
    for mask in masks:
        digest.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    return digest.hexdigest()[:12]


def tie_jitter(n_panel: int, *, seed: int, stream: int, epoch: int, window: int) -> np.ndarray:
    """Seeded tie-breaking scores in [0, 0.5), one per panel haplotype, float32.

    Smaller than one agreement, so retrieval's ranking by inner product never reorders distinct
    distances; never panel order, which in panels sorted by population would favour one ancestry.
    """
    rng = np.random.default_rng([seed & 0xFFFFFFFF, stream, epoch & 0xFFFFFFFF, window, 0x71E])
    return (rng.random(n_panel) * 0.5).astype(np.float32)
