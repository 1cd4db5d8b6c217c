"""The +-1 allele code that retrieval and the HMM compute on, in one place.

A haplotype's alleles are +1 (ALT) and -1 (REF); a query site that is hidden or a missing call
is 0. The inner product of two codes is then agreements minus disagreements over the query's
observed sites, and a state matches the query where the codes are equal.
"""

from __future__ import annotations

import numpy as np


def plus_minus(alleles: np.ndarray) -> np.ndarray:
    """Alleles 0/1 as int8 -1/+1."""
    return (2 * np.asarray(alleles).astype(np.int8) - 1).astype(np.int8)


def query_code(alleles: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Observed alleles 0/1 as int8 -1/+1, and 0 where ``hidden``."""
    return np.where(hidden, 0, plus_minus(alleles)).astype(np.int8)


def call_code(calls: np.ndarray) -> np.ndarray:
    """Calls 0/1, -1 missing, as int8 -1/+1, 0 where missing."""
    calls = np.asarray(calls)
    return query_code(np.maximum(calls, 0), calls < 0)
