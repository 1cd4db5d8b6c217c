"""The DataModule: windows, splits, masks, curriculum, retrieval — on simulated panels."""

from __future__ import annotations

from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch

from snvbert.callbacks import MaskEpochs
from snvbert.config import datamodule, retriever
from snvbert.data import masks as M
from snvbert.data.agreement import packed_runs
from snvbert.data.curriculum import Curriculum
from snvbert.data.datamodule import SNVDataModule, WindowBatchSampler
from snvbert.data.retrieval import _agreement_runs, neighbour_features, retrieve
from snvbert.data.windows import make_windows, split_people

LEVELS = [{"strategy": "random", "rate": 0.3}, {"strategy": "array", "spacing_bp": 5000}]
# data.hmm in full, per-window over every panel haplotype: the tests below change one key at a time
HMM = {
    "ne": 150000,
    "err": 1e-3,
    "err_max": None,
    "states": "panel",
    "select": "score",
    "ibs": None,
    "scope": "context",
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def make_dm(tiny_sim, cache_dir, **overrides) -> SNVDataModule:
    """conf/data/default.yaml with these keys changed (mappings merge key by key)."""
    kw = dict(
        panel=str(tiny_sim / "panel.vcf.gz"),
        cache_dir=str(cache_dir),
        window={"length": 64, "overlap": 16},
        context_bp=20_000,
        batch_size=3,
        seed=11,
        curriculum={"levels": LEVELS, "advance": "epochs", "epochs_per_level": 1},
        retrieval={"k": 16},
    )
    kw.update(overrides)
    dm = datamodule(**kw)
    dm.setup()
    return dm


# -- windows and splits ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,length,overlap", [(1000, 64, 16), (64, 64, 8), (30, 64, 8), (513, 100, 0)]
)
def test_window_cores_cover_every_site_once(n, length, overlap):
    pos = np.arange(n) * 100 + 1
    windows = make_windows(pos, length, overlap, context_bp=1000)
    counts = np.zeros(n, dtype=int)
    for w in windows:
        assert w.start <= w.core_start < w.core_end <= w.end
        assert w.ctx_start <= w.start and w.end <= w.ctx_end
        assert w.length == min(length, n)
        counts[w.core_start : w.core_end] += 1
    assert (counts == 1).all()


def test_split_keeps_people_whole_and_populations_mixed():
    pops = ["AFR"] * 40 + ["EUR"] * 40 + ["EAS"] * 40
    splits = split_people(120, [0.8, 0.1, 0.1], seed=3, populations=pops)
    allp = np.concatenate(list(splits.values()))
    assert len(allp) == len(set(allp.tolist())) == 120
    for name, people in splits.items():
        mix = Counter(pops[i] for i in people)
        assert len(mix) == 3, (name, mix)
        assert max(mix.values()) - min(mix.values()) <= 1
    assert not np.array_equal(splits["val"], split_people(120, [0.8, 0.1, 0.1], 4, pops)["val"])


# -- masks --------------------------------------------------------------------------------------------
def test_masks_are_pure_and_leave_global_state_alone(tiny_sim, cache_dir):
    dm = make_dm(tiny_sim, cache_dir)
    np.random.seed(123)  # noqa: NPY002 - the global state is what this test watches
    state = np.random.get_state()  # noqa: NPY002
    torch_state = torch.random.get_rng_state()
    ds = dm.dataset
    a = ds[(0, 2, 1, 3, (1, 2, 5))]
    for _ in range(5):
        ds[(0, 2, 0, 4, (1, 2))]
    b = ds[(0, 2, 1, 3, (5,))]  # same person, another batch composition
    c = ds[(0, 3, 1, 3, (5,))]  # next epoch
    after = np.random.get_state()  # noqa: NPY002
    assert all(np.array_equal(x, y) for x, y in zip(state[1:2], after[1:2], strict=True))
    assert state[2:] == after[2:]
    assert torch.equal(torch_state, torch.random.get_rng_state())
    assert torch.equal(a["mask"][4:6], b["mask"]) and torch.equal(a["tokens"][4:6], b["tokens"])
    assert not torch.equal(b["mask"], c["mask"])


def test_array_chip_is_shared_sparse_and_common(tiny_sim, cache_dir):
    dm = make_dm(tiny_sim, cache_dir)
    maf = np.minimum(dm.af, 1 - dm.af)
    chip = M.chip_sites(dm.panel.pos, maf, seed=1, stream=0, epoch=0, spacing_bp=10_000)
    span = dm.panel.pos[-1] - dm.panel.pos[0]
    assert abs(chip.sum() - span / 10_000) <= 0.2 * span / 10_000 + 2
    assert (maf[chip] >= 0.05).all()
    gaps = np.diff(dm.panel.pos[chip])
    assert gaps.min() > 0 and np.median(gaps) > 5_000
    other = M.chip_sites(dm.panel.pos, maf, seed=1, stream=0, epoch=1, spacing_bp=10_000)
    assert not np.array_equal(chip, other)
    batch = dm.dataset[(0, 0, 1, 2, (0, 1, 2))]
    # every haplotype of the batch shares the chip: one hidden pattern
    assert (batch["mask"] == batch["mask"][0]).all()


def test_array_density_varies_by_epoch_within_spacing_bp_max(tiny_sim, cache_dir):
    levels = [{"strategy": "array", "spacing_bp": 3000, "spacing_bp_max": 30000}]
    dm = make_dm(tiny_sim, cache_dir, curriculum={"levels": levels})
    level = dm.curriculum.levels[0]
    spacings = [level.spacing(seed=dm.seed, stream=0, epoch=e) for e in range(12)]
    assert all(3000 <= s <= 30000 for s in spacings) and len(set(spacings)) > 6
    assert spacings == [level.spacing(seed=dm.seed, stream=0, epoch=e) for e in range(12)]
    span = dm.panel.pos[-1] - dm.panel.pos[0]
    for epoch in (0, int(np.argmax(spacings)), int(np.argmin(spacings))):
        typed = dm.dataset.chip(0, epoch, level).sum()
        assert typed <= span / spacings[epoch] + 2  # at most one site per bin of the drawn spacing
    dense, sparse = (
        dm.dataset.chip(0, int(f(spacings)), level).sum() for f in (np.argmin, np.argmax)
    )
    assert dense > 2 * sparse
    fixed = M.MaskLevel("array", spacing_bp=3000)
    assert {fixed.spacing(seed=1, stream=0, epoch=e) for e in range(5)} == {3000}
    with pytest.raises(M.SnvbertError, match="spacing_bp_max"):
        M.MaskLevel("array", spacing_bp=3000, spacing_bp_max=2000)


def test_masks_do_not_look_at_alleles():
    level = M.MaskLevel("maf", rate=0.2)
    maf = np.linspace(0.001, 0.5, 500)
    key = dict(seed=1, stream=0, epoch=0, window=3, hap=7, level_index=0)
    m1 = M.draw_mask(level, maf=maf, **key)
    assert 0.12 < m1.mean() < 0.28
    assert m1[:100].mean() > m1[-100:].mean()  # rarer sites hidden more often
    assert np.array_equal(m1, M.draw_mask(level, maf=maf, **key))


def test_masks_do_not_depend_on_batching_or_rank(tiny_sim, cache_dir, monkeypatch):
    dm = make_dm(tiny_sim, cache_dir)
    people = dm.splits["train"]

    def collect(world):
        got = {}
        for rank in range(world):
            sampler = WindowBatchSampler(
                4, people, 1 + world, seed=5, stream=0, shuffle=True, level=lambda: 1
            )
            monkeypatch.setattr(sampler, "_rank_world", lambda r=rank: (r, world))
            sampler.set_epoch(1)
            for desc in sampler:
                batch = dm.dataset[desc]
                for row, hap in enumerate(batch["hap"].tolist()):
                    got[(desc[3], hap)] = batch["mask"][row]
        return got

    one, two = collect(1), collect(2)
    assert (
        set(one)
        == set(two)
        == {(w, h) for w in range(4) for p in people for h in (2 * p, 2 * p + 1)}
    )
    assert all(torch.equal(one[k], two[k]) for k in one)


# -- the epoch reaches the workers ------------------------------------------------------------------
class MaskProbe(L.LightningModule):
    """Records the masks the trainer actually receives, train and val."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[str, int, dict]] = []

    def _record(self, split, batch):
        keep = {
            k: batch[k].cpu()
            for k in (
                "mask",
                "hap",
                "window",
                "mask_epoch",
                "mask_level",
                "mask_stream",
                "nbr_hap",
                "person",
            )
        }
        self.seen.append((split, self.current_epoch, keep))

    def training_step(self, batch, batch_idx):
        self._record("train", batch)
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self._record("val", batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run_probe(dm, epochs=3, train_batches=3, val_batches=2):
    probe = MaskProbe()
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=train_batches,
        limit_val_batches=val_batches,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MaskEpochs()],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(probe, datamodule=dm)
    return probe.seen


def expected_mask(dm, batch):
    window = dm.windows[int(batch["window"][0])]
    hidden, _ = dm.dataset.hidden_and_errors(
        int(batch["mask_stream"][0]),
        int(batch["mask_epoch"][0]),
        int(batch["mask_level"][0]),
        window,
        batch["hap"].numpy(),
    )
    off = window.start - window.ctx_start
    return torch.from_numpy(hidden[:, off : off + window.length])


@pytest.mark.parametrize("persistent", [True, False])
def test_worker_masks_follow_the_epoch(tiny_sim, cache_dir, persistent):
    dm = make_dm(
        tiny_sim,
        cache_dir,
        num_workers=2,
        persistent_workers=persistent,
        curriculum={"levels": [{"strategy": "random", "rate": 0.3}]},
    )
    seen = run_probe(dm)
    train = [(e, b) for s, e, b in seen if s == "train"]
    assert sorted({e for e, _ in train}) == [0, 1, 2]
    for epoch, batch in train:
        assert (batch["mask_epoch"] == epoch).all()
        n = dm.windows[int(batch["window"][0])].length
        assert torch.equal(batch["mask"][:, :n], expected_mask(dm, batch))
    # the same (window, haplotype) gets a different mask in each epoch
    by_item: dict = {}
    for epoch, batch in train:
        for row, hap in enumerate(batch["hap"].tolist()):
            by_item.setdefault((int(batch["window"][0]), hap), {})[epoch] = batch["mask"][row]
    repeated = [v for v in by_item.values() if len(v) > 1]
    for masks_by_epoch in repeated:
        values = list(masks_by_epoch.values())
        assert not all(torch.equal(values[0], v) for v in values[1:])
    val = [(e, b) for s, e, b in seen if s == "val"]
    first = [b for e, b in val if e == 0]
    for epoch in (1, 2):
        later = [b for e, b in val if e == epoch]
        assert len(later) == len(first)
        for a, b in zip(first, later, strict=True):
            assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["hap"], b["hap"])


def test_per_epoch_validation_masks_change(tiny_sim, cache_dir):
    dm = make_dm(
        tiny_sim,
        cache_dir,
        val_mask="per_epoch",
        curriculum={"levels": [{"strategy": "random", "rate": 0.3}]},
    )
    seen = run_probe(dm, epochs=2, train_batches=1, val_batches=1)
    val = [b for s, e, b in seen if s == "val"]
    assert len(val) == 2
    assert not torch.equal(val[0]["mask"], val[1]["mask"])


def test_curriculum_advances_and_validation_uses_final_level(tiny_sim, cache_dir):
    dm = make_dm(tiny_sim, cache_dir)
    seen = run_probe(dm, epochs=3, train_batches=2, val_batches=1)
    levels = {e: int(b["mask_level"][0]) for s, e, b in seen if s == "train"}
    assert levels == {0: 0, 1: 1, 2: 1}
    assert all(int(b["mask_level"][0]) == 1 for s, e, b in seen if s == "val")
    state = dm.state_dict()
    fresh = make_dm(tiny_sim, cache_dir)
    fresh.load_state_dict(state)
    assert fresh.curriculum.level == 1 and fresh.curriculum.is_final


def test_curriculum_plateau():
    levels = [M.MaskLevel("random", 0.1), M.MaskLevel("random", 0.3), M.MaskLevel("array")]
    c = Curriculum(levels, advance="plateau", epochs_per_level=1, patience=2, min_delta=0.01)
    assert not c.step(1.0) and not c.step(0.9) and not c.step(0.895)
    assert c.step(0.899) and c.level == 1
    assert [c.step(0.5), c.step(0.5), c.step(0.5)] == [False, False, True]
    assert c.is_final and not c.step(0.1) and c.level == 2


# -- retrieval -----------------------------------------------------------------------------------------
def brute_force_scores(query, panel):
    observed = query != 0
    agree = ((panel[None, :, :] == query[:, None, :]) & observed[:, None, :]).sum(-1)
    disagree = ((panel[None, :, :] != query[:, None, :]) & observed[:, None, :]).sum(-1)
    return agree - disagree


@pytest.mark.parametrize("engine", ["torch", "faiss"])
def test_retrieval_equals_brute_force_masked_hamming(engine):
    rng = np.random.default_rng(0)
    panel = rng.choice([-1, 1], size=(300, 80)).astype(np.int8)
    query = rng.choice([-1, 1], size=(12, 80)).astype(np.int8)
    query[rng.random(query.shape) < 0.6] = 0
    exclude = np.zeros((12, 300), dtype=bool)
    exclude[np.arange(12), np.arange(12)] = True
    jitter = torch.from_numpy(rng.random(300).astype(np.float32) * 0.5)
    scores, idx, valid = retriever(k=25, engine=engine).search(
        torch.from_numpy(query).float(),
        torch.from_numpy(panel).float(),
        jitter,
        torch.from_numpy(exclude),
    )
    truth = brute_force_scores(query, panel)
    truth[exclude] = -(10**6)
    for q in range(12):
        assert valid[q].all()
        got = truth[q, idx[q].numpy()]
        assert np.array_equal(got, scores[q].numpy().astype(int))
        assert np.array_equal(np.sort(got)[::-1], np.sort(truth[q])[::-1][:25])  # tie-aware
        assert q not in idx[q].tolist()


def test_approximate_indexes_find_most_neighbours():
    rng = np.random.default_rng(1)
    panel = rng.choice([-1, 1], size=(500, 64)).astype(np.float32)
    query = torch.from_numpy(panel[:20].copy())
    query[:, ::2] = 0
    jitter = torch.zeros(500)
    exact = retriever(k=10).search(query, torch.from_numpy(panel), jitter)[1]
    for index in ("ivf", "hnsw"):
        approx = retriever(k=10, engine="faiss", index=index, nlist=8, nprobe=8).search(
            query, torch.from_numpy(panel), jitter
        )[1]
        recall = np.mean(
            [
                len(set(a.tolist()) & set(b.tolist())) / 10
                for a, b in zip(approx, exact, strict=True)
            ]
        )
        assert recall >= 0.7, (index, recall)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_a_faiss_index_is_built_once_per_window_and_serves_every_batch(index):
    """Imputation searches one window's panel once per batch of people: the index is built at
    the first batch and reused (the same results as a fresh index each time); another window
    (another panel tensor) or other observed columns build a new one."""
    rng = np.random.default_rng(2)
    panel = torch.from_numpy(rng.choice([-1, 1], size=(400, 60)).astype(np.float32))
    jitter = torch.from_numpy(rng.random(400).astype(np.float32) * 0.5)
    chip = torch.zeros(60, dtype=torch.bool)
    chip[::3] = True
    settings = {"k": 10, "engine": "faiss", "index": index, "nlist": 8, "nprobe": 8}
    reused = retriever(**settings)
    for batch in range(3):
        query = torch.from_numpy(rng.choice([-1, 1], size=(8, 60)).astype(np.float32)) * chip
        got = reused.search(query, panel, jitter)
        fresh = retriever(**settings).search(query, panel, jitter)
        assert all(torch.equal(a, b) for a, b in zip(got, fresh, strict=True)), batch
    assert reused.index_builds == 1
    reused.search(query, panel.clone(), jitter)  # the next window
    assert reused.index_builds == 2
    reused.search(query * (torch.arange(60) != 0), panel, jitter)  # other columns observed
    assert reused.index_builds == 3


def test_ties_are_broken_by_seed_not_panel_index():
    panel = torch.ones(200, 30)  # all identical: every panel haplotype ties
    query = torch.ones(1, 30)
    picks = []
    from snvbert.data.masks import tie_jitter

    for window in range(20):
        jitter = torch.from_numpy(tie_jitter(200, seed=1, stream=0, epoch=0, window=window))
        picks += retriever(k=10).search(query, panel, jitter)[1][0].tolist()
    assert 60 < np.mean(picks) < 140  # index order would give a mean of 4.5
    again = torch.from_numpy(tie_jitter(200, seed=1, stream=0, epoch=0, window=0))
    assert retriever(k=10).search(query, panel, again)[1][0].tolist() == picks[:10]


def test_neighbour_runs_on_a_planted_pattern():
    # Context of 10 sites, window = columns 3..7. Query observes sites 0,2,4,6,8,9.
    query = torch.tensor([[1, 0, -1, 0, 1, 0, 1, 0, -1, 1]], dtype=torch.int8)
    panel = torch.tensor(
        [
            [1, 1, -1, 1, 1, -1, 1, 1, -1, 1],  # agrees everywhere observed
            [1, 1, 1, 1, 1, -1, 1, 1, -1, 1],  # disagrees at site 2
            [1, 1, -1, 1, 1, -1, -1, 1, -1, 1],  # disagrees at site 6
        ],
        dtype=torch.int8,
    )
    idx = torch.tensor([[0, 1, 2]])
    alleles, left, right = neighbour_features(query, panel, idx, 3, 5, 6)
    assert alleles.shape == (1, 3, 6)
    assert alleles[0, 0, :5].tolist() == [1, 1, 0, 1, 1] and alleles[0, 0, 5] == 0
    # window sites are context columns 3,4,5,6,7
    assert left[0, 0, :5].tolist() == [2, 2, 3, 3, 4]
    assert right[0, 0, :5].tolist() == [4, 3, 3, 2, 2]
    assert left[0, 1, :5].tolist() == [0, 0, 1, 1, 2]
    assert left[0, 2, :5].tolist() == [2, 2, 3, 3, 0]
    assert right[0, 2, :5].tolist() == [1, 0, 0, 2, 2]


def test_no_self_or_same_person_retrieval_and_site_alignment(tiny_sim, cache_dir):
    dm = make_dm(tiny_sim, cache_dir, curriculum={"levels": LEVELS})
    train_people = set(dm.splits["train"].tolist())
    sampler = dm.sampler("train")
    n_checked = 0
    for desc in list(sampler)[:: max(1, len(sampler) // 40)]:
        batch = retrieve(dm.dataset[desc], dm.retriever)
        nbr_person = batch["nbr_hap"] // 2
        assert (nbr_person != batch["person"][:, None]).all()
        assert set(nbr_person[batch["nbr_valid"]].tolist()) <= train_people
        # site alignment: neighbour alleles are the panel's alleles at the window's sites
        sites = batch["site"][0]
        real = sites >= 0
        hap = batch["nbr_hap"][0, 0].item()
        truth = torch.from_numpy(
            np.asarray(dm.panel.haplotypes[sites[real].numpy(), hap]).astype(np.float32)
        )
        assert torch.equal(batch["nbr_alleles"][0, 0, real], truth)
        n_checked += 1
    assert n_checked >= 20
    for split in ("val", "test"):
        for desc in list(dm.sampler(split))[:5]:
            batch = retrieve(dm.dataset[desc], dm.retriever)
            assert set((batch["nbr_hap"] // 2).flatten().tolist()) <= train_people
            assert not set(batch["person"].tolist()) & train_people


def test_neighbours_change_with_the_mask(tiny_sim, cache_dir):
    dm = make_dm(
        tiny_sim, cache_dir, curriculum={"levels": [{"strategy": "array", "spacing_bp": 5000}]}
    )
    a = retrieve(dm.dataset[(0, 0, 0, 2, (3, 4))], dm.retriever)
    b = retrieve(dm.dataset[(0, 1, 0, 2, (3, 4))], dm.retriever)
    assert not torch.equal(a["nbr_hap"], b["nbr_hap"])
    # the best neighbour agrees with the query at the typed sites it retrieved on
    top = a["nbr_alleles"][:, 0]
    typed = ~a["mask"] & ~a["pad"]
    assert (top[typed] == a["alleles"][typed].float()).float().mean() > 0.9


def test_training_af_leaves_the_query_person_out(tiny_sim, cache_dir):
    dm = make_dm(tiny_sim, cache_dir)
    person = int(dm.splits["train"][0])
    batch = dm.dataset[(0, 0, 0, 1, (person,))]
    window = dm.windows[1]
    sites = np.arange(window.start, window.end)
    panel_haps = dm.dataset.panel_haps
    others = panel_haps[(panel_haps // 2) != person]
    expected = np.asarray(dm.panel.haplotypes[sites][:, others]).mean(1)
    assert np.allclose(batch["af"][0, : len(sites)].numpy(), expected, atol=1e-6)
    assert torch.equal(batch["af"][0], batch["af"][1])
    val_person = int(dm.splits["val"][0])
    val = dm.dataset[(1, 0, 0, 1, (val_person,))]
    assert np.allclose(val["af"][0, : len(sites)].numpy(), dm.af[sites], atol=1e-6)


def test_genetic_map_positions_and_bad_maps(tmp_path, tiny_sim, cache_dir):
    """A PLINK map is interpolated in bp; bad maps are one-line errors naming the file; the
    simulated map beside a panel is picked up and recorded for imputation."""
    from snvbert.data.genetic_map import genetic_positions
    from snvbert.errors import SnvbertError

    good = tmp_path / "good.map"
    good.write_text("20\t.\t0.0\t1000\n20\t.\t1.0\t2000\n20\t.\t1.5\t102000\n")
    morgans = genetic_positions(np.array([500, 1500, 2000, 52000, 200000]), good)
    assert np.allclose(morgans, [0.0, 0.005, 0.01, 0.0125, 0.015])
    assert np.allclose(genetic_positions(np.array([0, 10**6]), None), [0.0, 0.01])
    down = tmp_path / "down.map"
    down.write_text("20\t.\t1.0\t1000\n20\t.\t0.5\t2000\n")
    with pytest.raises(SnvbertError, match="down.map.*decrease"):
        genetic_positions(np.array([1500]), down)
    junk = tmp_path / "junk.map"
    junk.write_text("not a map\n")
    with pytest.raises(SnvbertError, match="junk.map.*PLINK map"):
        genetic_positions(np.array([1500]), junk)

    dm = datamodule(panel=str(tiny_sim / "panel.vcf.gz"), cache_dir=str(cache_dir))
    dm.setup()
    assert dm.describe()["genetic_map"] == str((tiny_sim / "map.plink").resolve())
    expected = genetic_positions(dm.panel.pos, tiny_sim / "map.plink")
    batch = dm.dataset[(0, 0, 0, 1, tuple(int(p) for p in dm.splits["train"][:2]))]
    w = dm.windows[1]
    assert np.allclose(batch["ctx_morgan"].numpy(), expected[w.ctx_start : w.ctx_end])
    missing = datamodule(
        panel=str(tiny_sim / "panel.vcf.gz"),
        cache_dir=str(cache_dir),
        genetic_map=str(tmp_path / "absent.map"),
    )
    with pytest.raises(SnvbertError, match="absent.map"):
        missing.setup()


def test_select_by_posterior_finds_the_copied_haplotypes(tiny_sim, cache_dir):
    """data.hmm.select=posterior: the neighbours are the haplotypes the panel-state HMM copies
    in the window. A query made of two panel haplotypes' pieces gets both as neighbours, the
    query's own person never, and the batch keeps the retrieval contract."""
    from snvbert.errors import SnvbertError
    from snvbert.hmm import HMMConfig, context_posteriors, select_by_posterior

    rng = np.random.default_rng(11)
    n_panel, n_ctx = 40, 80
    panel = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_panel, n_ctx))
    truth = panel[6].copy()
    truth[40:] = panel[21][40:]
    query = np.where(np.arange(n_ctx) % 2 == 0, truth, 0).astype(np.int8)[None, :]
    q, p = torch.from_numpy(query), torch.from_numpy(panel)
    allowed = torch.ones(1, n_panel, dtype=torch.bool)
    allowed[0, 6 ^ 1] = False  # say 7 is the query's own second haplotype
    cols = torch.nonzero(q[0] != 0).squeeze(1)
    morgan = torch.from_numpy(np.arange(n_ctx) * 2e-4)
    post = context_posteriors(
        q, p, allowed, morgan, cols, HMMConfig.parse({**HMM, "ne": 20_000.0, "err": 0.01})
    )
    assert post.shape == (1, n_panel, cols.numel())
    scores, idx, valid = select_by_posterior(post, cols, 30, 20, 5, q, p, allowed)
    assert {6, 21} <= set(idx[0].tolist()) and 7 not in idx[0].tolist()
    assert bool(valid.all()) and bool((scores[0, :-1] >= scores[0, 1:]).all())

    dm = make_dm(
        tiny_sim,
        cache_dir,
        hmm={**HMM, "err": 0.002, "select": "posterior"},
        retrieval={"k": 16},
    )
    persons = tuple(int(x) for x in dm.splits["train"][:2])
    batch = retrieve(dm.dataset[(0, 0, 1, 1, persons)], dm.retriever, dm.hmm)
    own = torch.from_numpy(np.repeat(np.asarray(persons), 2))
    assert batch["nbr_hap"].shape == (4, 16)
    assert not bool((batch["nbr_hap"] // 2 == own[:, None]).any())
    assert torch.isfinite(batch["nbr_hmm"]).all()
    with pytest.raises(SnvbertError, match="needs data.hmm.states=panel"):
        make_dm(tiny_sim, cache_dir, hmm={**HMM, "states": "neighbours", "select": "posterior"})


def test_training_batches_draw_the_hmm_mismatch_rate_and_validation_keeps_err(tiny_sim, cache_dir):
    """data.hmm.err_max: each training batch's HMM mismatch rate is drawn log-uniformly from
    [err, err_max], the same for the same step (a resumed run draws alike); validation uses err.
    The drawn rate reaches the batch: the HMM's P(ALT) of one batch differs between two draws."""
    from snvbert.errors import SnvbertError

    hmm = {**HMM, "err": 1e-4, "err_max": 0.05}
    dm = make_dm(tiny_sim, cache_dir, hmm=hmm)
    drawn = np.array([dm.batch_hmm(True, step).err for step in range(400)])
    assert drawn.min() >= 1e-4 and drawn.max() <= 0.05
    # log-uniform: about a quarter of the draws in each quarter of the log range
    quarter = np.floor(4 * np.log(drawn / 1e-4) / np.log(0.05 / 1e-4)).clip(0, 3)
    assert np.all(np.bincount(quarter.astype(int), minlength=4) > 60)
    assert dm.batch_hmm(True, 7) == dm.batch_hmm(True, 7)
    assert dm.batch_hmm(False, 7).err == 1e-4 and dm.batch_hmm(False, 8).err == 1e-4
    assert all(dm.batch_hmm(t, 3).err_max is None for t in (True, False))

    persons = tuple(int(x) for x in dm.splits["train"][:2])
    low, high = np.argmin(drawn), np.argmax(drawn)
    doses = [
        retrieve(dm.dataset[(0, 0, 1, 1, persons)], dm.retriever, dm.batch_hmm(True, int(s)))[
            "hmm_dose"
        ]
        for s in (low, high)
    ]
    assert not torch.allclose(doses[0], doses[1], atol=1e-4)

    without = make_dm(tiny_sim, cache_dir, hmm={**hmm, "err_max": None})
    assert without.batch_hmm(True, 3).err == 1e-4
    for bad, match in (({"err_max": 1e-5}, "err_max=1e-05 must lie in"), ({"err": 0.7}, "err=0.7")):
        with pytest.raises(SnvbertError, match=match):
            make_dm(tiny_sim, cache_dir, hmm={**hmm, **bad})


def test_hmm_ibs_config_fills_beagle_defaults_and_rejects_bad_values(tiny_sim, cache_dir):
    """data.hmm.ibs: Beagle's defaults fill what is not given; unknown keys and impossible
    values are one-line config errors; the setting reaches training batches (their HMM)."""
    from snvbert.errors import SnvbertError
    from snvbert.hmm import IBSConfig

    hmm = HMM
    dm = make_dm(tiny_sim, cache_dir, hmm={**hmm, "ibs": {"haps": 4}})
    assert dm.hmm.ibs == IBSConfig(haps=4, step_cm=0.1, steps=7)
    without = make_dm(tiny_sim, cache_dir, hmm={**hmm, "ibs": None}).hmm
    assert without.ibs is None
    persons = tuple(int(x) for x in dm.splits["train"][:2])
    doses = [
        retrieve(dm.dataset[(0, 0, 1, 1, persons)], dm.retriever, h)["hmm_dose"]
        for h in (without, dm.hmm)
    ]
    assert not torch.allclose(doses[0], doses[1], atol=1e-4)
    for bad, match in (
        ({"hap": 4}, "unknown key.*hap; it takes haps, step_cm, steps"),
        ({"haps": 0}, "needs haps >= 1"),
        ({"step_cm": 0}, "step_cm > 0"),
    ):
        with pytest.raises(SnvbertError, match=match):
            make_dm(tiny_sim, cache_dir, hmm={**hmm, "ibs": bad})
    with pytest.raises(SnvbertError, match="data.hmm.ibs needs data.hmm.states=panel"):
        make_dm(tiny_sim, cache_dir, hmm={**hmm, "states": "neighbours", "ibs": {}})


def test_hmm_scope_chromosome_gives_training_the_chromosome_wide_hmm(tiny_sim, cache_dir):
    """data.hmm.scope=chromosome: an array batch's panel-state HMM runs over the chip's typed
    sites of the whole chromosome, as imputation's does. Its calls away from the window's context
    are the truth at the chip with the level's missing calls and errors (drawn once per epoch,
    the same for every window), inside it the window's own; where the context is the whole
    chromosome it is the per-window HMM exactly; a dense (random) level keeps the per-window
    HMM; a bad scope is a one-line error."""
    from snvbert.errors import SnvbertError

    noisy = [LEVELS[0], {**LEVELS[1], "missing_rate": 0.1, "error_rate": 0.05}]
    hmm = {**HMM, "ibs": {"haps": 4}}
    dm = make_dm(
        tiny_sim, cache_dir, curriculum={"levels": noisy}, hmm={**hmm, "scope": "chromosome"}
    )
    ds = dm.dataset
    persons = tuple(int(x) for x in dm.splits["train"][:2])
    haps = np.array([2 * persons[0], 2 * persons[0] + 1, 2 * persons[1], 2 * persons[1] + 1])
    chip = np.flatnonzero(ds.chip(0, 3, ds.levels[1]))
    truth = np.asarray(ds.haplotypes[chip])[:, haps].T.astype(int)  # (B, U)
    batches = [ds[(0, 3, 1, w, persons)] for w in (0, len(ds.windows) - 1)]
    for w, batch in zip((0, len(ds.windows) - 1), batches, strict=True):
        window = ds.windows[w]
        assert torch.equal(
            batch["hmm_states"].T,
            2
            * torch.from_numpy(np.asarray(ds.haplotypes[chip])[:, ds.panel_haps].T.astype(np.int8))
            - 1,
        )
        q = batch["hmm_query"].numpy().T.astype(int)  # (B, U)
        lo, hi = batch["hmm_span"].tolist()
        assert (chip[lo:hi] >= window.ctx_start).all() and (chip[lo:hi] < window.ctx_end).all()
        assert lo > 0 or hi < len(chip)  # the chip reaches beyond this context
        seen = q != 0
        assert 0.8 < seen.mean() < 1.0  # missing calls are 0
        wrong = seen & (q != 2 * truth - 1)
        assert 0 < wrong.sum() < 0.15 * seen.sum()  # a few errors, otherwise the truth
        # inside the context: exactly the window's query
        assert np.array_equal(q[:, lo:hi], batch["query_ctx"].numpy()[:, batch["hmm_cols"].numpy()])
    outside = np.ones(len(chip), dtype=bool)
    for batch in batches:
        lo, hi = batch["hmm_span"].tolist()
        outside[lo:hi] = False
    assert outside.any()
    a, b = (batch["hmm_query"].numpy()[outside] for batch in batches)
    assert np.array_equal(a, b)  # away from both windows: the same calls
    # the chromosome-wide HMM feeds the features; the random level keeps the per-window one
    out = retrieve(dict(batches[0]), dm.retriever, dm.hmm)
    assert not any(key in out for key in ("hmm_query", "hmm_states", "hmm_span"))
    ctx_only = make_dm(tiny_sim, cache_dir, curriculum={"levels": noisy}, hmm=hmm)
    ref = retrieve(ctx_only.dataset[(0, 3, 1, 0, persons)], ctx_only.retriever, ctx_only.hmm)
    assert not torch.allclose(out["hmm_dose"], ref["hmm_dose"], atol=1e-3)
    assert "hmm_query" not in ds[(0, 3, 0, 0, persons)]
    # a context as wide as the chromosome: the same HMM either way
    wide = {"curriculum": {"levels": noisy}, "context_bp": 10**8}
    full = make_dm(tiny_sim, cache_dir, hmm={**hmm, "scope": "chromosome"}, **wide)
    per_window = make_dm(tiny_sim, cache_dir, hmm=hmm, **wide)
    for w in (0, 2):
        got = retrieve(full.dataset[(0, 3, 1, w, persons)], full.retriever, full.hmm)
        want = retrieve(
            per_window.dataset[(0, 3, 1, w, persons)], per_window.retriever, per_window.hmm
        )
        assert torch.allclose(got["hmm_dose"], want["hmm_dose"], atol=1e-5)
        assert torch.allclose(got["nbr_hmm"], want["nbr_hmm"], atol=1e-5)
    for bad, match in (
        ({"scope": "genome"}, "data.hmm.scope='genome' must be one of"),
        (
            {"scope": "chromosome", "states": "neighbours", "ibs": None},
            "needs data.hmm.states=panel",
        ),
    ):
        with pytest.raises(SnvbertError, match=match):
            make_dm(tiny_sim, cache_dir, hmm={**hmm, **bad})


def test_compiled_agreement_runs_equal_the_cumulative_maximum_definition() -> None:
    """packed_runs (numba, CPU) reads the runs neighbour_features defines by cumulative maxima:
    at sites before the first and after the last feature column, on them and between, with
    unobserved columns carried over, for rows with several pairs, one or none."""
    g = torch.Generator().manual_seed(3)
    B, N, C, K = 5, 40, 90, 7
    panel = (torch.randint(0, 2, (N, C), generator=g) * 2 - 1).to(torch.int8)
    idx = torch.randint(0, N, (B, K), generator=g)
    # queries copy a neighbour with a few mismatches, some columns unobserved
    query = panel[idx[:, 0]].clone()
    flip = torch.rand(B, C, generator=g) < 0.1
    query[flip] = -query[flip]
    query[torch.rand(B, C, generator=g) < 0.3] = 0
    cols = torch.nonzero((query != 0).any(0)).squeeze(1)
    rows = torch.tensor([0, 0, 0, 2, 3, 3, 3, 3])  # rows 1 and 4: no pair
    at = torch.tensor([0, int(cols[0]), 45, 46, C - 1, int(cols[-1]), 10, 80])
    left_runs, right_runs, n_before, n_upto = _agreement_runs(query, panel, idx, cols, at)
    expected_left, expected_right = left_runs[rows, :, n_before], right_runs[rows, :, n_upto]
    args = [query[:, cols], panel[:, cols], idx, rows, n_before, n_upto]
    left, right = packed_runs(*(t.numpy() for t in args))
    assert torch.equal(torch.from_numpy(left).long(), expected_left.long())
    assert torch.equal(torch.from_numpy(right).long(), expected_right.long())
    assert expected_left.max() > 3 and (expected_left == 0).any()  # runs long and empty
    args[3] = rows.flip(0)
    with pytest.raises(ValueError, match="increasing"):
        packed_runs(*(t.numpy() for t in args))


# -- several training panels --------------------------------------------------------------------
@pytest.fixture(scope="module")
def second_sim(tmp_path_factory):
    """Another tiny panel (another seed, 20 people): the second of a two-panel data module."""
    from snvbert.simulate import simulate

    out = tmp_path_factory.mktemp("second_sim")
    simulate(out, seed=12, size="tiny", panel=20)
    return out


def test_two_panels_give_batches_of_each_with_its_own_people_masks_and_hmm(
    tiny_sim, second_sim, cache_dir
):
    panels = [str(tiny_sim / "panel.vcf.gz"), str(second_sim / "panel.vcf.gz")]
    hmm = {**HMM, "scope": "chromosome", "err": "auto"}
    dm = make_dm(tiny_sim, cache_dir, panel=panels, hmm=hmm)
    alone = make_dm(tiny_sim, cache_dir, hmm=hmm)  # panel 0 by itself
    assert [p.panel.n_haps for p in dm.parts] == [120, 40]
    # each panel's HMM is resolved for its own size (Li and Stephens' rate for 120 and 40 haps)
    assert dm.parts[0].hmm.err != dm.parts[1].hmm.err
    assert dm.batch_hmm(False, 0, 1) == dm.parts[1].hmm.for_step(dm.seed, 0, None)
    for split in ("train", "val"):
        sampler = dm.sampler(split)
        sampler.set_epoch(1)
        descs = list(sampler)
        assert len(descs) == len(sampler)
        per_panel = Counter(d[-1] for d in descs)
        for i, part in enumerate(dm.parts):  # every batch of every panel, once
            one = WindowBatchSampler(
                len(part.windows),
                part.splits[split],
                dm.batch_size,
                seed=1,
                stream=0,
                shuffle=False,
                level=lambda: 0,
            )
            assert per_panel[i] == len(one)
            people = {p for d in descs if d[-1] == i for p in d[4]}
            assert people == set(part.splits[split].tolist())
        if split == "val":  # taken in turn: a validation cut short still spans both panels
            assert {d[-1] for d in descs[:2]} == {0, 1}
    # a batch of panel 1 is built from panel 1 and says so; panel 0's equal the one-panel module's
    desc = next(d for d in dm.sampler("train") if d[-1] == 1)
    batch = dm.dataset[desc]
    assert (batch["panel_index"] == 1).all()
    truth = np.asarray(dm.parts[1].panel.haplotypes)
    w = dm.parts[1].windows[desc[3]]
    haps = np.stack([2 * np.array(desc[4]), 2 * np.array(desc[4]) + 1], 1).ravel()
    labels = batch["alleles"][:, : w.length].numpy()
    np.testing.assert_array_equal(labels, truth[w.start : w.end, haps].T)
    assert dm.panel_for(batch) is dm.parts[1].panel
    for split in ("train", "val"):  # a random-mask batch and an array one (with its HMM query)
        desc0 = next(d for d in dm.sampler(split) if d[-1] == 0)
        a, b = dm.dataset[desc0], alone.dataset[desc0[:-1]]
        for key in ("tokens", "alleles", "af", *(("hmm_query",) if split == "val" else ())):
            torch.testing.assert_close(a[key], b[key])
    described = dm.describe()
    assert described["panel_fingerprint"] == dm.parts[0].panel.fingerprint
    assert [p["haplotypes"] for p in described["panels"]] == [120, 40]


def test_one_genetic_map_for_two_panels_is_a_one_line_error(tiny_sim, second_sim, cache_dir):
    from snvbert.errors import SnvbertError

    panels = [str(tiny_sim / "panel.vcf.gz"), str(second_sim / "panel.vcf.gz")]
    with pytest.raises(SnvbertError, match="one per panel"):
        make_dm(tiny_sim, cache_dir, panel=panels, genetic_map=str(tiny_sim / "map.plink"))
