"""Windows of consecutive sites, and splits of people into train / val / test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from snvbert.errors import SnvbertError


@dataclass(frozen=True)
class Window:
    """Sites ``[start, end)`` are the model's input; ``[core_start, core_end)`` the sites it answers for.

    Cores of consecutive windows tile the chromosome exactly once, so stitching predictions needs
    no blending rule: each site takes the prediction of the one window whose core holds it (the
    centre of that window, where it sees the most context on both sides). ``[ctx_start, ctx_end)``
    is the wider retrieval context: the sites within ``context_bp`` of the window.
    """

    index: int
    start: int
    end: int
    core_start: int
    core_end: int
    ctx_start: int
    ctx_end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def make_windows(pos: np.ndarray, length: int, overlap: int, context_bp: int = 0) -> list[Window]:
    """Cut ``len(pos)`` sites into windows of ``length`` sites overlapping by ``overlap``.

    The last window is moved left to end at the last site, so every window but a lone short
    one has the full length. Cores split each overlap at its midpoint.
    """
    n_sites = len(pos)
    if n_sites == 0:
        raise SnvbertError("no sites to cut into windows")
    if length < 1 or not 0 <= overlap < length:
        raise SnvbertError(
            f"window length {length} and overlap {overlap} are inconsistent: need 0 <= overlap < length"
        )
    stride = length - overlap
    starts = list(range(0, max(n_sites - length, 0) + 1, stride))
    if starts[-1] + length < n_sites:
        starts.append(n_sites - length)
    ends = [min(s + length, n_sites) for s in starts]

    cuts = [0]
    for i in range(1, len(starts)):
        # The overlap of windows i-1 and i is [starts[i], ends[i-1]); split it in the middle.
        cuts.append((starts[i] + ends[i - 1]) // 2)
    cuts.append(n_sites)

    pos = np.asarray(pos, dtype=np.int64)
    ctx_lo = np.searchsorted(pos, pos[starts] - context_bp, side="left")
    ctx_hi = np.searchsorted(pos, pos[np.asarray(ends) - 1] + context_bp, side="right")
    return [
        Window(i, s, e, cuts[i], cuts[i + 1], int(lo), int(hi))
        for i, (s, e, lo, hi) in enumerate(zip(starts, ends, ctx_lo, ctx_hi, strict=True))
    ]


def split_people(
    n_samples: int,
    fractions: Sequence[float],
    seed: int,
    populations: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Assign people (never single haplotypes) to ``train``, ``val`` and ``test``.

    Stratified by population so each split keeps the panel's ancestry mix. Sorted sample
    indices per split; every person lands in exactly one split.
    """
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise SnvbertError(f"split fractions {list(fractions)} must be three numbers summing to 1")
    groups = np.zeros(n_samples, dtype=object) if populations is None else np.asarray(populations)
    rng = np.random.default_rng([seed, 0x5E11])
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for group in sorted(set(groups.tolist())):
        members = rng.permutation(np.flatnonzero(groups == group))
        n_val = int(round(fr[1] * len(members)))
        n_test = int(round(fr[2] * len(members)))
        n_train = len(members) - n_val - n_test
        out["train"].append(members[:n_train])
        out["val"].append(members[n_train : n_train + n_val])
        out["test"].append(members[n_train + n_val :])
    splits = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}
    for name in ("train", "val"):
        if fr[("train", "val").index(name)] > 0 and len(splits[name]) == 0:
            raise SnvbertError(
                f"the {name} split is empty: {n_samples} people are too few for fractions "
                f"{list(fractions)}; use a larger panel or other data.split fractions"
            )
    return splits
