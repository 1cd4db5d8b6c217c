"""The Li–Stephens HMM package (snvbert.hmm): each step against an independent numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hmm_oracle import posteriors
from hmm_oracle import switch as oracle_switch

from snvbert.hmm import (
    ChromosomeHMM,
    HMMConfig,
    IBSConfig,
    context_posteriors,
    copying_posteriors,
    estimate_err,
    forward_backward,
    ibs_states,
    kernel,
    li_stephens_err,
    panel_dosage,
    switch_probabilities,
)


def config(**kw) -> HMMConfig:
    """An HMMConfig with every field given (the YAML's role), these ones changed."""
    base = {
        "ne": 150_000.0,
        "err": 0.002,
        "err_max": None,
        "states": "panel",
        "select": "score",
        "ibs": None,
        "scope": "context",
    }
    return HMMConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_copying_posteriors_match_the_reference_hmm():
    """The batched torch HMM over neighbours equals the numpy oracle's forward-backward."""

    rng = np.random.default_rng(3)
    n_panel, n_ctx, k = 40, 60, 12
    panel = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_panel, n_ctx))
    first, second = np.array([3, 5]), np.array([17, 21])
    truth = panel[first].copy()
    truth[:, 30:] = panel[second][:, 30:]  # each query switches source in the middle
    typed = np.zeros(n_ctx, dtype=bool)
    typed[::3] = True
    query = np.where(typed, truth, 0).astype(np.int8)
    pos = np.cumsum(rng.integers(500, 3000, n_ctx))
    others = [
        np.setdiff1d(rng.permutation(n_panel), [f, s])[: k - 2]
        for f, s in zip(first, second, strict=True)
    ]
    idx = torch.from_numpy(
        np.stack(
            [
                np.r_[o[:4], f, o[4:8], s, o[8:]]
                for o, f, s in zip(others, first, second, strict=True)
            ]
        )
    )
    valid = torch.ones(2, k, dtype=torch.bool)
    post = copying_posteriors(
        torch.from_numpy(query),
        torch.from_numpy(panel),
        idx,
        valid,
        torch.from_numpy(pos * 1e-8),
        0,
        n_ctx,
        n_ctx,
        hmm=config(ne=20_000.0, err=0.01, states="neighbours"),
        cols=torch.from_numpy(np.flatnonzero(typed)),
    )  # (2, K, n_ctx)
    assert torch.allclose(post.sum(1), torch.ones(2, n_ctx), atol=1e-5)
    cols = np.flatnonzero(typed)
    d = np.diff(pos[cols] * 1e-8, prepend=pos[cols][0] * 1e-8)
    switch = (1 - np.exp(-4 * 20_000.0 * d / n_panel)).astype(np.float32)
    for row in range(2):
        ref = ((panel[idx[row].numpy()][:, cols] + 1) // 2).T  # (m, K)
        obs = ((query[row, cols] + 1) // 2)[:, None]
        expected = posteriors(obs, ref, switch, 0.01)[:, 0, :]  # (m, K)
        assert np.allclose(post[row][:, cols].T.numpy(), expected, atol=1e-4)
    # the posterior follows the planted mosaic: the first source early, the second late
    for row in range(2):
        assert idx[row, post[row, :, 2].argmax()].item() == first[row]
        assert idx[row, post[row, :, 57].argmax()].item() == second[row]


def test_panel_state_posteriors_match_the_full_reference_hmm():
    """states='panel': the HMM over every allowed panel haplotype, read at the neighbours.

    Equals the numpy oracle's forward-backward over the allowed haplotypes (a genetic map with a
    hotspot, so switch rates vary), at typed columns and, interpolated in genetic position,
    between them; an excluded haplotype (the query's own) gets no posterior mass. The HMM's
    P(ALT) over every panel state (``panel_dosage``) is that posterior summed over ALT carriers.
    """

    rng = np.random.default_rng(5)
    n_panel, n_ctx, k = 30, 50, 8
    panel = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_panel, n_ctx))
    truth = panel[[4, 9]].copy()
    truth[:, 25:] = panel[[11, 2]][:, 25:]
    typed = np.zeros(n_ctx, dtype=bool)
    typed[::4] = True
    query = np.where(typed, truth, 0).astype(np.int8)
    pos = np.cumsum(rng.integers(500, 3000, n_ctx))
    morgan = pos * 1e-8
    morgan[24:] += 0.002  # a 0.2 cM hotspot between columns 23 and 24
    allowed = np.ones((2, n_panel), dtype=bool)
    allowed[0, 0] = allowed[1, [0, 1]] = False  # each query's own haplotypes
    idx = torch.from_numpy(np.stack([rng.permutation(np.arange(1, n_panel))[:k] for _ in range(2)]))
    valid = torch.ones(2, k, dtype=torch.bool)
    cols = np.flatnonzero(typed)
    t_cols = torch.from_numpy(cols)
    hmm = config(ne=50_000.0, err=0.01, states="panel")
    args = (torch.from_numpy(query), torch.from_numpy(panel), torch.from_numpy(allowed))
    panel_post = context_posteriors(*args, torch.from_numpy(morgan), t_cols, hmm)
    post = copying_posteriors(
        *args[:2],
        idx,
        valid,
        torch.from_numpy(morgan),
        0,
        n_ctx,
        n_ctx,
        hmm=hmm,
        cols=t_cols,
        panel_post=panel_post,
    )  # (2, K, n_ctx)
    dose = panel_dosage(
        panel_post, t_cols, *args[1:], torch.from_numpy(morgan), 0, n_ctx, n_ctx
    )  # (2, n_ctx)
    d = np.diff(morgan[cols], prepend=morgan[cols][0])
    switch = (1 - np.exp(-4 * 50_000.0 * d / n_panel)).astype(np.float32)
    for row in range(2):
        ok = np.flatnonzero(allowed[row])
        ref = ((panel[ok][:, cols] + 1) // 2).T  # (m, allowed)
        obs = ((query[row, cols] + 1) // 2)[:, None]
        full = np.zeros((len(cols), n_panel), dtype=np.float32)
        # the reference jumps uniformly over its own states: the allowed ones
        full[:, ok] = posteriors(obs, ref, switch, 0.01)[:, 0, :]
        at_nbrs = full[:, idx[row].numpy()]  # (m, K)
        assert np.allclose(post[row][:, cols].T.numpy(), at_nbrs, atol=1e-4)
        # between typed columns: linear in genetic position
        j = 25  # between typed columns 24 and 28
        w = (morgan[j] - morgan[24]) / (morgan[28] - morgan[24])
        expected = (1 - w) * full[6, idx[row].numpy()] + w * full[7, idx[row].numpy()]
        assert np.allclose(post[row][:, j].numpy(), expected, atol=1e-4)
        # the HMM's own P(ALT) (the net's skip input): the interpolated posterior summed over
        # the haplotypes carrying ALT, at every site, typed or not, and past the end columns
        at_sites = np.stack([np.interp(morgan, morgan[cols], full[:, n]) for n in range(n_panel)])
        expected_dose = (at_sites * (panel > 0)).sum(0)  # (n_ctx,)
        assert np.allclose(dose[row].numpy(), expected_dose, atol=1e-4)
    assert switch.max() > 0.9  # the hotspot really is a near-certain switch
    # at typed sites the HMM returns the typed allele (err=0.01 lets a few disagree)
    typed_alt = torch.from_numpy(query[:, typed] > 0)
    assert ((dose[:, typed] > 0.5) == typed_alt).float().mean() > 0.9


def test_fitted_hmm_error_rate_follows_the_calls_error_rate(tiny_sim, cache_dir):
    """estimate_err (EM on the HMM's mismatch rate) recovers the rate of flipped alleles in
    queries copied from a real simulated panel, and on error-free calls falls to near zero but
    not below Li and Stephens' rate."""
    from snvbert.data.vcf import load_panel

    pan = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=cache_dir, progress=False)
    haps = np.asarray(pan.haplotypes).astype(np.int8)  # (sites, N) 0/1
    cols = np.arange(0, pan.n_sites, 3)
    states = torch.from_numpy(2 * haps[cols] - 1)  # (U, N)
    people = np.arange(0, pan.n_samples, 3)
    queries = np.stack([2 * people, 2 * people + 1], 1).ravel()  # both haplotypes of a third
    allowed = torch.from_numpy(np.repeat(people, 2)[:, None] != np.arange(pan.n_haps)[None] // 2)
    switch = switch_probabilities(torch.from_numpy(pan.pos[cols] * 1e-8), 150_000.0, pan.n_haps)
    rng = np.random.default_rng(3)
    clean = 2 * haps[cols][:, queries] - 1  # (U, Q)
    fitted = {}
    for rate in (0.0, 0.02):
        q = np.where(rng.random(clean.shape) < rate, -clean, clean)
        q[rng.random(clean.shape) < 0.05] = 0  # missing calls are not counted
        q = torch.from_numpy(q.astype(np.int8))
        fitted[rate] = estimate_err(states, q, allowed, switch, start=0.002, batch=32)
    assert 0.014 < fitted[0.02] < 0.028, fitted
    assert li_stephens_err(pan.n_haps) <= fitted[0.0] < fitted[0.02] / 4, fitted
    assert li_stephens_err(2000) == pytest.approx(3.06e-5, rel=0.01)


def _founder_panel(rng, n_founders=6, n_haps=60, n_cols=200, mutation=0.02):
    """Haplotypes copied from a few founders with rare mutations: many near-identical ones."""
    founders = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_founders, n_cols))
    panel = founders[np.arange(n_haps) % n_founders].copy()
    flip = rng.random(panel.shape) < mutation
    panel[flip] *= -1
    return panel


def test_ibs_states_keep_the_longest_identical_by_state_haplotypes():
    """Beagle's IBS state selection: from each 0.1 cM step a query keeps the ``haps`` panel
    haplotypes identical by state with it longest; the union over steps are its HMM states.

    Among near-identical haplotypes (copies of a few founders), the query's true sources are
    kept, every kept haplotype is identical by state with the query over a whole step, none of
    another founder is, a disallowed haplotype never is, and a query's states do not depend on
    the rest of its batch. The HMM over them puts no mass elsewhere.
    """
    rng = np.random.default_rng(3)
    panel = _founder_panel(rng)  # (60, 200): hap h copies founder h % 6
    n_haps, n_cols = panel.shape
    morgan = torch.arange(n_cols, dtype=torch.float64) * 1e-4  # 2 cM: 20 steps of 10 columns
    # rows 0 and 1 copy haplotype 7 (founder 1), then haplotype 20 (founder 2)
    query = np.concatenate([panel[7, :100], panel[20, 100:]])[None].repeat(3, 0)
    query[2] = panel[33]  # founder 3
    query[1, ::7] = 0  # unobserved columns match anything
    allowed = torch.ones(3, n_haps, dtype=torch.bool)
    allowed[1, 7] = False  # the query's own haplotype, say
    q, p = torch.from_numpy(query.T.copy()), torch.from_numpy(panel.T.copy())
    keep = ibs_states(q, p, morgan, allowed, IBSConfig(haps=3, step_cm=0.1, steps=5))
    assert keep[0, 7] and keep[0, 20] and keep[2, 33]
    assert not keep[1, 7] and keep[1, 20]
    assert not (keep & ~allowed).any()
    founder = np.arange(n_haps) % 6
    assert set(founder[keep[0].numpy()]) <= {1, 2} and set(founder[keep[2].numpy()]) == {3}
    assert 3 <= int(keep[0].sum()) <= 3 * 20 and int(keep[0].sum()) < n_haps // 3
    # every kept haplotype agrees with the query over at least one whole step
    steps = [slice(a, a + 10) for a in range(0, n_cols, 10)]
    for row in range(3):
        obs = query[row] != 0
        for h in np.flatnonzero(keep[row].numpy()):
            assert any(np.all((panel[h, s] == query[row, s]) | ~obs[s]) for s in steps)
    alone = ibs_states(q[:, 2:], p, morgan, allowed[2:], IBSConfig(3, 0.1, 5))
    assert torch.equal(alone[0], keep[2])
    # a query that matches no haplotype over any whole step keeps every allowed one
    stranger = -panel[7]
    assert not any(np.all(panel[:, s] == stranger[s], axis=1).any() for s in steps)
    stranger_q = torch.from_numpy(stranger[:, None].copy())
    kept = ibs_states(stranger_q, p, morgan, allowed[1:2], IBSConfig(haps=3))
    assert torch.equal(kept, allowed[1:2])
    # the HMM over the kept states only: posteriors there, summing to one
    cols = torch.arange(n_cols)
    post = context_posteriors(
        torch.from_numpy(query),
        torch.from_numpy(panel),
        allowed,
        morgan,
        cols,
        config(ne=20_000.0, err=0.01, ibs=IBSConfig(3, 0.1, 5)),
    )  # (3, N, U)
    assert float(post.masked_select(~keep[:, :, None].expand_as(post)).abs().max()) == 0.0
    assert torch.allclose(post.sum(1), torch.ones(3, n_cols), atol=1e-4)
    assert post[0, 7, :90].mean() > 0.3 and post[0, 20, 110:].mean() > 0.3


def test_compiled_ibs_states_pick_what_the_torch_steps_pick(tiny_sim, cache_dir):
    """The CPU kernel and the batched torch steps are one selection: on a real panel's typed
    sites, with missing calls and disallowed haplotypes, every query keeps the same states
    (both the survivors-and-top-up and the more-than-haps-match branches are met)."""
    from snvbert.data.genetic_map import genetic_positions
    from snvbert.data.vcf import load_panel

    pan = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=cache_dir, progress=False)
    morgans = genetic_positions(pan.pos, tiny_sim / "map.plink")
    typed = np.arange(0, pan.n_sites, 7)
    alleles = np.asarray(pan.haplotypes[typed]).astype(np.int8)
    rng = np.random.default_rng(11)
    query = 2 * alleles[:, :12] - 1
    query[rng.random(query.shape) < 0.1] = 0
    query[rng.random(query.shape) < 0.02] *= -1  # genotype errors
    allowed = torch.from_numpy(rng.random((12, pan.n_haps)) > 0.1)
    allowed[torch.arange(12), torch.arange(12)] = False  # never itself
    args = (
        torch.from_numpy(query),
        torch.from_numpy(2 * alleles - 1),
        torch.from_numpy(morgans[typed]),
        allowed,
    )
    for ibs in (IBSConfig(haps=4, step_cm=0.05, steps=3), IBSConfig(haps=40, steps=7)):
        fast = ibs_states(*args, ibs, compiled=True)
        slow = ibs_states(*args, ibs, compiled=False)
        assert torch.equal(fast, slow)
        assert 0 < int(fast.sum(1).min()) and int(fast.sum(1).max()) < pan.n_haps


def test_switch_probabilities_no_distance_no_jump():
    """The one transition model: 1 - exp(-4 ne d / N); no distance (the first column, a site at
    the position of the one before) gives exactly no jump, as the oracle's does."""
    morgan = torch.tensor([0.0, 0.0, 1e-4, 1e-4, 3e-4], dtype=torch.float64)
    got = switch_probabilities(morgan, 20_000.0, 100)
    d = np.diff(morgan.numpy(), prepend=morgan.numpy()[:1])
    assert torch.equal(got[[0, 1, 3]], torch.zeros(3))
    assert np.allclose(got.numpy(), oracle_switch(d, 20_000.0, 100), rtol=1e-6)
    assert float(got[2]) == pytest.approx(1 - np.exp(-4 * 20_000.0 * 1e-4 / 100))


def test_forward_backward_matches_the_oracle_with_missing_calls_and_disallowed_states():
    """forward_backward (torch, batched) equals the numpy oracle query by query: missing calls
    emit 1, disallowed states get no mass, rows sum to one."""
    rng = np.random.default_rng(8)
    n_cols, n_states, b = 40, 25, 3
    alleles = rng.integers(0, 2, size=(n_cols, n_states))
    truth = alleles[:, [2, 9, 14]].copy()
    truth[20:, 0] = alleles[20:, 5]
    obs = truth.copy()
    obs[rng.random(obs.shape) < 0.15] = -1  # missing calls
    allowed = rng.random((b, n_states)) < 0.8
    allowed[:, [2, 9, 14, 5]] = True
    morgan = np.cumsum(rng.random(n_cols) * 3e-4)
    switch = switch_probabilities(torch.from_numpy(morgan), 30_000.0, n_states)
    state_cols = torch.from_numpy((2 * alleles - 1).astype(np.int8))
    query = torch.from_numpy(np.where(obs < 0, 0, 2 * obs - 1).astype(np.int8))
    post = forward_backward(state_cols, query, torch.from_numpy(allowed), switch, 0.01)
    assert post.shape == (b, n_states, n_cols)
    expected = posteriors(obs, alleles, switch.numpy(), 0.01, allowed)  # (m, B, N)
    assert np.allclose(post.permute(2, 0, 1).numpy(), expected, atol=1e-5)
    assert float(post.masked_select(~torch.from_numpy(allowed)[:, :, None]).abs().max()) == 0.0
    assert torch.allclose(post.sum(1), torch.ones(b, n_cols), atol=1e-5)
    # The compiled CPU pass, each query over its own states only, is the same HMM.
    compact = kernel.posteriors(state_cols.numpy(), query.numpy(), allowed, switch.numpy(), 0.01)
    assert list(compact.n) == list(allowed.sum(1))
    assert np.allclose(compact.dense(n_states).transpose(2, 0, 1), expected, atol=1e-5)
    # ... and its EM statistic is the posterior mass on mismatching observed alleles.
    differs = (state_cols.numpy().T[None] != query.numpy().T[:, None]) & (
        query.numpy().T[:, None] != 0
    )
    want = (expected.transpose(1, 2, 0) * differs).sum((1, 2))
    got = kernel.mismatches(state_cols.numpy(), query.numpy(), allowed, switch.numpy(), 0.01)
    assert np.allclose(got, want, rtol=1e-4)
    torch_err = estimate_err(
        state_cols, query, torch.from_numpy(allowed), switch, start=0.01, batch=2
    )
    kernel_err = estimate_err(
        state_cols, query, torch.from_numpy(allowed), switch, start=0.01, batch=2, compiled=True
    )
    assert kernel_err == pytest.approx(torch_err, rel=1e-4)


def test_chromosome_hmm_reads_out_every_site_as_the_oracle_interpolates(tiny_sim, cache_dir):
    """ChromosomeHMM over a real panel's typed sites, read out at every panel site
    (kernel.sparse_dosage, the classical imputer's read-out, summing only each site's
    minor-allele carriers): the oracle's posteriors interpolated linearly in genetic position,
    summed over ALT carriers. Its EM fit falls to Li and Stephens' rate on error-free calls
    copied from panel haplotypes."""
    from snvbert.data.genetic_map import genetic_positions
    from snvbert.data.vcf import load_panel
    from snvbert.hmm.readout import site_interpolation

    pan = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=cache_dir, progress=False)
    morgans = genetic_positions(pan.pos, tiny_sim / "map.plink")
    typed = np.arange(3, pan.n_sites, 40)
    refs = np.arange(4, pan.n_haps)  # the first two people are the queries
    hmm = ChromosomeHMM.from_panel(pan.haplotypes, typed, refs, morgans, ne=50_000.0, ibs=None)
    truth = np.asarray(pan.haplotypes[typed])[:, :4].astype(np.int8)  # (U, 4)
    query = torch.from_numpy(2 * truth - 1)
    allowed = torch.ones(4, len(refs), dtype=torch.bool)
    post = hmm.compact_posteriors(query, allowed, 0.01)
    carriers_csr = kernel.MinorCarriers.from_panel(pan.haplotypes, refs, chunk=97)
    left, right, w = site_interpolation(
        torch.from_numpy(typed), torch.from_numpy(morgans), 0, pan.n_sites
    )
    dose = kernel.sparse_dosage(
        post, carriers_csr, len(refs), left.numpy(), right.numpy(), w.numpy()
    )
    assert carriers_csr.minor_alt.any() and not carriers_csr.minor_alt.all()  # both codings met
    alleles = np.asarray(pan.haplotypes[typed])[:, refs]
    switch = oracle_switch(np.diff(morgans[typed], prepend=morgans[typed][0]), 50_000.0, len(refs))
    oracle = posteriors(truth, alleles, switch, 0.01)  # (U, 4, N)
    carriers = np.asarray(pan.haplotypes)[:, refs].astype(np.float64)  # (sites, N)
    for row in range(4):
        at_sites = np.stack(
            [np.interp(morgans, morgans[typed], oracle[:, row, n]) for n in range(len(refs))], 1
        )
        want = np.clip((at_sites * carriers).sum(1), 0, 1)
        assert np.allclose(dose[:, row], want, atol=1e-4)
    fitted = hmm.fit_err(query, allowed, start=0.002)
    assert li_stephens_err(len(refs)) <= fitted < 0.002


def test_hmm_config_is_checked_and_resolved_as_imputation_resolves_it():
    """data.hmm takes exactly its keys; auto values follow imputation's rules for the panel
    size; checkpoints of earlier versions, which left out keys at their then-defaults, load."""
    from snvbert.errors import SnvbertError
    from snvbert.hmm import IBS_MIN_HAPS

    yaml = {**config().to_dict(), "err": "auto", "ibs": "auto", "err_max": 0.01}
    cfg = HMMConfig.parse(yaml)
    small, large = cfg.resolved(600), cfg.resolved(IBS_MIN_HAPS + 2)
    assert small.ibs is None and large.ibs == IBSConfig()
    assert large.err == pytest.approx(li_stephens_err(IBS_MIN_HAPS + 2)) and large.err_max == 0.01
    assert HMMConfig.parse(large.to_dict()) == large  # what a checkpoint records reads back
    assert HMMConfig.parse({**yaml, "ibs": {"haps": 4}}).ibs == IBSConfig(haps=4)
    old = HMMConfig.from_checkpoint({"ne": 20000.0, "err": 0.002})
    assert (old.states, old.select, old.scope, old.ibs, old.err_max) == (
        "neighbours",
        "score",
        "context",
        None,
        None,
    )
    for bad, match in (
        ({"enabled": True}, "unknown: enabled"),
        ({"states": "all"}, "states='all' must be one of"),
        ({"err": 0.7}, "err=0.7 must be auto or lie in"),
        ({"ibs": {"hap": 3}}, "unknown key.*hap; it takes haps, step_cm, steps"),
        ({"states": "neighbours"}, "needs data.hmm.states=panel"),
    ):
        with pytest.raises(SnvbertError, match=match):
            HMMConfig.parse({**yaml, **bad})
    missing = {k: v for k, v in yaml.items() if k != "scope"}
    with pytest.raises(SnvbertError, match="missing: scope"):
        HMMConfig.parse(missing)
