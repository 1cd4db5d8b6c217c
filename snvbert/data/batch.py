"""The batch: what the DataModule hands the model, key by key.

A batch is a ``dict[str, Tensor]``. Items are (window, person): each brings the person's two
haplotypes as consecutive rows, so rows ``2i`` and ``2i+1`` are one person and diploid dosages are
``p[2i] + p[2i+1]``. All rows of a batch share one window (batches are grouped by window), so
retrieval is one search call per batch.

Shapes: ``B`` rows (haplotypes), ``L`` sites of the window (padded to the configured window
length), ``K`` retrieved neighbours.

From the DataLoader (CPU, built in workers):

- ``tokens``   (B, L) long   0/1 observed allele, ``MASK`` where hidden, ``PAD`` past the window end
- ``alleles``  (B, L) long   true alleles 0/1 (labels; 0 at PAD)
- ``mask``     (B, L) bool   True where the site is hidden and must be predicted (never at PAD)
- ``pad``      (B, L) bool   True past the end of a short window
- ``af``       (B, L) float  ALT frequency in the training panel (never from val/test people)
- ``pos``      (B, L) long   base-pair position (0 at PAD)
- ``site``     (B, L) long   global site index in the panel cache (-1 at PAD)
- ``core``     (B, L) bool   True inside the window's core (the sites this window answers for)
- ``hap``      (B,)   long   global haplotype index in the cache (2 * sample + phase)
- ``person``   (B,)   long   sample index in the cache
- ``window``   (B,)   long   window index (all equal within a batch)
- ``mask_epoch``, ``mask_level``, ``mask_stream`` (B,) long: the key the mask was drawn from
  (training and validation batches of the panel; absent at imputation)

Added by retrieval (``SNVDataModule.on_after_batch_transfer``, on the batch's device):

- ``nbr_hap``    (B, K)    long   global haplotype index of each neighbour
- ``nbr_valid``  (B, K)    bool   False for padding when the panel has fewer than K haplotypes
- ``nbr_score``  (B, K)    float  observed agreements minus disagreements over the context
- ``nbr_alleles``(B, K, L) float  the neighbour's alleles over the window, site-aligned with the query
- ``nbr_left``   (B, K, L) float  run of consecutive observed query sites left of each site (within
                                  the retrieval context) where the neighbour agrees with the query
- ``nbr_right``  (B, K, L) float  the same to the right
- ``nbr_hmm``    (B, K, L) float  Li–Stephens posterior of copying each neighbour at each site
                                  (when ``data.hmm.enabled``); sums to 1 over valid neighbours with
                                  ``data.hmm.states=neighbours``, to the neighbours' share of the
                                  posterior (<= 1) with ``states=panel``
- ``hmm_dose``   (B, L)    float  the HMM's own P(ALT) at each site: its posterior summed over the
                                  states carrying ALT (every allowed panel haplotype with
                                  ``states=panel``, the neighbours otherwise); the net's skip input
"""

from __future__ import annotations

ALLELE_REF = 0
ALLELE_ALT = 1
MASK = 2
PAD = 3
VOCAB_SIZE = 4
