"""An independent numpy oracle of the Li–Stephens forward–backward, for the tests only.

Written apart from :mod:`snvbert.hmm` (numpy, 0/1 alleles, one loop per site, its own emission
and transition code), so that a test comparing the two would catch a mistake in either.
"""

from __future__ import annotations

import numpy as np


def switch(d: np.ndarray, ne: float, n_states: int) -> np.ndarray:
    """Jump probabilities for genetic gaps d (Morgans): no distance, no jump."""
    return (1.0 - np.exp(-4.0 * ne * np.maximum(d, 0.0) / n_states)).astype(np.float32)


def posteriors(
    obs: np.ndarray,
    ref: np.ndarray,
    switch: np.ndarray,
    err: float,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """State posteriors at typed sites, float32 (m, B, N), by scaled forward-backward.

    obs (m, B) query alleles 0/1, -1 missing (emits 1 for every state); ref (m, N) panel
    alleles; switch (m,) probability of a jump before each site (switch[0] unused); allowed
    (B, N) bool the states each query may copy (None: all), jumps land uniformly on them.
    """
    m, b = obs.shape
    n = ref.shape[1]
    ok = np.ones((b, n), np.float32) if allowed is None else allowed.astype(np.float32)
    pi = ok / ok.sum(1, keepdims=True)

    def emission(j: int) -> np.ndarray:
        match = ref[j][None, :] == obs[j][:, None]  # (B, N)
        e = np.where(match, 1.0 - err, err).astype(np.float32)
        return np.where(obs[j][:, None] < 0, np.float32(1.0), e) * ok

    fwd = np.empty((m, b, n), dtype=np.float32)
    a = emission(0) * pi
    fwd[0] = a / a.sum(1, keepdims=True)
    for j in range(1, m):
        prior = (1 - switch[j]) * fwd[j - 1] + switch[j] * pi  # rows of fwd sum to 1
        a = prior * emission(j)
        fwd[j] = a / a.sum(1, keepdims=True)
    beta = pi.copy()
    for j in range(m - 1, -1, -1):
        post = fwd[j] * beta
        fwd[j] = post / post.sum(1, keepdims=True)  # the posterior replaces the forward value
        if j:
            be = beta * emission(j)
            beta = (1 - switch[j]) * be + switch[j] * (be * pi).sum(1, keepdims=True)
            beta /= beta.sum(1, keepdims=True)
    return fwd
