"""Genetic positions (Morgans) of panel sites from a PLINK genetic map, as Beagle's ``map=``.

The Li–Stephens switch rate between two sites depends on their genetic distance, not their
physical one: human crossovers cluster in narrow hotspots, so a constant map misplaces most
switches. Without a map, a constant ``CM_PER_MB`` is assumed.
"""

from __future__ import annotations

import os

import numpy as np

from snvbert.errors import SnvbertError

CM_PER_MB = 1.0  # constant map when no genetic map is given (the human average, ~1 cM/Mb)


def genetic_positions(pos: np.ndarray, genetic_map: str | os.PathLike | None) -> np.ndarray:
    """Positions in Morgans, float64: from a PLINK map (chrom, id, cM, bp), linearly interpolated.

    Positions beyond the map's ends take the end's value (no extrapolation).
    """
    if genetic_map is None:
        return np.asarray(pos, dtype=np.float64) * CM_PER_MB / 1e8
    try:
        table = np.loadtxt(genetic_map, usecols=(2, 3), ndmin=2)
    except (OSError, ValueError) as err:
        raise SnvbertError(
            f"cannot be read as a PLINK map (chrom id cM bp): {err}; pass a 4-column PLINK map",
            path=genetic_map,
        ) from err
    if len(table) == 0:
        raise SnvbertError(
            "the genetic map has no rows; pass a 4-column PLINK map", path=genetic_map
        )
    order = np.argsort(table[:, 1], kind="stable")
    cm = table[order, 0]
    if np.any(np.diff(cm) < 0):
        row = int(np.flatnonzero(np.diff(cm) < 0)[0]) + 2
        raise SnvbertError(
            f"genetic positions decrease along the chromosome (sorted row {row}); "
            "fix the map (cM must not decrease with bp)",
            path=genetic_map,
        )
    return np.interp(np.asarray(pos, dtype=np.float64), table[order, 1], cm) / 100.0
