"""``ChromosomeHMM``: the Li–Stephens HMM over a set of typed columns, states and jump rates fixed.

The one object every HMM user calls: ``python -m snvbert.impute`` over the target's typed
sites of the whole chromosome (once per chunk of people, not per window), training batches with
``data.hmm.scope=chromosome`` over the chip's typed sites, the classical imputer
(:mod:`snvbert.hmm.imputer`, the README's HMM column), and the per-window HMM over one
window's context columns (:mod:`snvbert.hmm.window`). It holds the states' alleles at the
columns (Beagle's ``CodedSteps``), their genetic positions and the switch probabilities; per
query it picks the states (IBS, :mod:`snvbert.hmm.states`), runs the forward–backward
(:mod:`snvbert.hmm.forward_backward`) and fits the mismatch rate (:mod:`snvbert.hmm.em`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from snvbert.data.encoding import plus_minus
from snvbert.hmm import kernel
from snvbert.hmm.config import IBSConfig
from snvbert.hmm.em import estimate_err
from snvbert.hmm.forward_backward import forward_backward
from snvbert.hmm.model import switch_probabilities
from snvbert.hmm.states import ibs_states

# Largest forward pass (float32) one forward-backward call keeps in memory, per chunk of queries.
HMM_MEMORY_BYTES = 3 * 1024**3


class ChromosomeHMM:
    """The HMM over U columns and N states: the states' alleles, positions and jump rates.

    states (U, N) +-1 the states' alleles at the columns; morgan (U,) the columns' genetic
    positions (increasing); ``ne`` the switch rate's effective size (the jump rate is that of
    all N states, also where IBS keeps fewer); ``ibs`` Beagle's IBS selection of each query's
    states (None: every allowed state).
    """

    def __init__(self, states: Tensor, morgan: Tensor, *, ne: float, ibs: IBSConfig | None) -> None:
        self.states, self.morgan = states, morgan
        self.ne, self.ibs = float(ne), ibs
        self.switch = switch_probabilities(morgan, self.ne, states.shape[1]).to(states.device)

    @classmethod
    def from_panel(
        cls,
        haplotypes: np.ndarray,
        typed_sites: np.ndarray,
        ref_haps: np.ndarray,
        morgans: np.ndarray,
        *,
        ne: float,
        ibs: IBSConfig | None,
        device: torch.device | str = "cpu",
    ) -> ChromosomeHMM:
        """Over a panel's ``typed_sites`` (increasing site indices), its ``ref_haps`` the states.

        haplotypes (n_sites, n_haps) 0/1 (the memory-mapped cache); morgans (n_sites,).
        """
        rows = np.asarray(haplotypes[typed_sites])[:, ref_haps]  # (U, N)
        states = torch.from_numpy(plus_minus(rows)).to(device)
        morgan = torch.from_numpy(np.asarray(morgans[typed_sites], dtype=np.float64)).to(device)
        return cls(states, morgan, ne=ne, ibs=ibs)

    def allowed_states(self, query: Tensor, allowed: Tensor) -> Tensor:
        """(B, N) bool the states each query copies: ``allowed``, narrowed by IBS when set.

        query (U, B) +-1, 0 unobserved.
        """
        if self.ibs is None:
            return allowed
        return ibs_states(query, self.states, self.morgan, allowed, self.ibs)

    def posteriors(self, query: Tensor, allowed: Tensor, err: float) -> Tensor:
        """State posteriors (B, N, U) of queries (U, B) (+-1, 0 unobserved).

        ``allowed`` (B, N) bool the states a query may copy (never its own person's). On a
        CPU the compiled kernel runs over each query's own states (:mod:`snvbert.hmm.kernel`),
        on a GPU the torch pass over all N with a mask; the same arithmetic.
        """
        state_ok = self.allowed_states(query, allowed)
        if self.states.device.type != "cpu":
            return forward_backward(self.states, query, state_ok, self.switch, err)
        compact = self._kernel_posteriors(query, state_ok, err)
        return torch.from_numpy(compact.dense(self.states.shape[1]))

    def compact_posteriors(
        self, query: Tensor, allowed: Tensor, err: float
    ) -> kernel.CompactPosteriors:
        """As :meth:`posteriors`, over each query's own states only (CPU; numpy arrays)."""
        return self._kernel_posteriors(query, self.allowed_states(query, allowed), err)

    def _kernel_posteriors(
        self, query: Tensor, state_ok: Tensor, err: float
    ) -> kernel.CompactPosteriors:
        return kernel.posteriors(
            self.states.cpu().numpy(),
            query.cpu().numpy(),
            state_ok.cpu().numpy(),
            self.switch.cpu().numpy(),
            err,
        )

    def fit_err(
        self,
        query: Tensor,
        allowed: Tensor | None,
        *,
        start: float,
        memory_bytes: int = HMM_MEMORY_BYTES,
    ) -> float:
        """The mismatch rate these queries (U, Q) call for, by EM over the states they copy
        (every allowed one, narrowed by IBS when set: the rate of the HMM that is run).

        On a GPU queries are run as many at a time as ``memory_bytes`` holds: per query the
        forward pass (4 bytes a state and column), the posterior product and the mismatch mask.
        """
        if allowed is None:
            allowed = torch.ones(
                query.shape[1], self.states.shape[1], dtype=torch.bool, device=query.device
            )
        state_ok = self.allowed_states(query, allowed)
        batch = max(1, memory_bytes // max(1, self.states.numel() * 12))
        return estimate_err(
            self.states,
            query,
            state_ok,
            self.switch,
            start=start,
            batch=batch,
            compiled=self.states.device.type == "cpu",
        )

    @staticmethod
    def fits(
        n_cols: int, n_states: int, n_queries: int, memory_bytes: int = HMM_MEMORY_BYTES
    ) -> bool:
        """Whether the forward pass of ``n_queries`` queries fits in ``memory_bytes``."""
        return n_cols * n_queries * n_states * 4 <= memory_bytes
