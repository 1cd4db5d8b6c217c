"""The Li–Stephens HMM: snvbert's spine, in one package.

A query haplotype is a mosaic of the reference haplotypes it copies (Li & Stephens 2003). The
package is split as Beagle 5's ``imp/`` is, one concept a module, each step written once, in
torch, device-agnostic (and, for the CPU, compiled in :mod:`~snvbert.hmm.kernel`):

- :mod:`~snvbert.hmm.config` — the settings (``data.hmm``; :class:`HMMConfig`,
  :class:`IBSConfig` with Beagle's defaults) and their checks; the rule that picks IBS states.
- :mod:`~snvbert.hmm.model` — the transition (switch) and emission (mismatch) model.
- :mod:`~snvbert.hmm.states` — Beagle's IBS state selection (``ImpIbs``).
- :mod:`~snvbert.hmm.forward_backward` — the scaled forward–backward (``ImpLSBaum``), torch.
- :mod:`~snvbert.hmm.kernel` — the same pass compiled for the CPU (numba), each query over its
  own states, and the sparse read-out at untyped sites (minor-allele carriers only).
- :mod:`~snvbert.hmm.em` — the mismatch rate fitted to the targets by EM.
- :mod:`~snvbert.hmm.readout` — posteriors read out at untyped sites (interpolated in genetic
  position), at the retrieved neighbours, and as P(ALT).
- :mod:`~snvbert.hmm.chromosome` — :class:`ChromosomeHMM`, the object imputation, training
  batches and the classical imputer all call.
- :mod:`~snvbert.hmm.window` — the per-window HMM of a training batch's retrieval context.
- :mod:`~snvbert.hmm.imputer` — the classical HMM imputer (the README's HMM column), through the
  same engine.

Alleles are coded +-1 and an unobserved query column 0 (:mod:`snvbert.data.encoding`).
"""

from snvbert.hmm.chromosome import HMM_MEMORY_BYTES, ChromosomeHMM
from snvbert.hmm.config import IBS_MIN_HAPS, HMMConfig, IBSConfig, ibs_by_default, ibs_for_panel
from snvbert.hmm.em import estimate_err
from snvbert.hmm.forward_backward import forward_backward
from snvbert.hmm.model import li_stephens_err, switch_probabilities
from snvbert.hmm.readout import (
    interpolated_dosage,
    neighbour_posteriors,
    panel_dosage,
    select_by_posterior,
    site_interpolation,
)
from snvbert.hmm.states import ibs_states
from snvbert.hmm.window import context_posteriors, copying_posteriors

__all__ = [
    "HMM_MEMORY_BYTES",
    "IBS_MIN_HAPS",
    "ChromosomeHMM",
    "HMMConfig",
    "IBSConfig",
    "context_posteriors",
    "copying_posteriors",
    "estimate_err",
    "forward_backward",
    "ibs_by_default",
    "ibs_for_panel",
    "ibs_states",
    "interpolated_dosage",
    "li_stephens_err",
    "neighbour_posteriors",
    "panel_dosage",
    "select_by_posterior",
    "site_interpolation",
    "switch_probabilities",
]
