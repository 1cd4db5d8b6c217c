"""SNVBertNet and SNVBertModule on synthetic batches that follow snvbert/data/batch.py exactly."""

from __future__ import annotations

import functools
import math
from dataclasses import fields
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from hydra_config import compose_config

from snvbert.data.batch import MASK, PAD
from snvbert.model.module import SNVBertModule
from snvbert.model.net import DEFAULTS, SIZES, NetConfig, SNVBertNet, build_net
from snvbert.model.schedule import cosine, lr_at


def _runs(agree: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Run of consecutive observed sites strictly left of each site where ``agree`` holds.

    agree (B, K, L) bool; observed (B, L) bool. Masked sites neither extend nor break a run.
    """
    B, K, Ln = agree.shape
    out = torch.zeros(B, K, Ln)
    run = torch.zeros(B, K)
    for site in range(Ln):
        out[:, :, site] = run
        obs = observed[:, None, site]
        run = torch.where(obs, torch.where(agree[:, :, site], run + 1, torch.zeros_like(run)), run)
    return out


def make_fake_batch(
    B: int = 16,
    L: int = 64,
    K: int = 16,
    mask_rate: float = 0.5,
    n_pad: int = 0,
    seed: int = 0,
    K_valid: int | None = None,
) -> dict[str, torch.Tensor]:
    """A batch with the keys, dtypes and shapes of snvbert/data/batch.py, whose neighbours carry signal.

    Each query haplotype is a mosaic: a copy of one panel haplotype up to a random switch site
    and of another after it (as Li-Stephens copying makes them). Both sources are among the K
    neighbours, at random slots; the other neighbours are independent draws from the allele
    frequencies. ``nbr_left``/``nbr_right`` are the true agreement runs over observed sites, so
    the right neighbour at each site is findable exactly the way the real data makes it.
    """
    g = torch.Generator().manual_seed(seed)
    assert B % 2 == 0 and K >= 2
    af = (torch.rand(L, generator=g) * 0.45 + 0.02).expand(B, L).clone()  # (B, L)
    nbr = (torch.rand(B, K, L, generator=g) < af[:, None, :]).float()  # (B, K, L)
    slots = torch.stack([torch.randperm(K, generator=g)[:2] for _ in range(B)])  # (B, 2)
    switch = torch.randint(L // 4, 3 * L // 4, (B,), generator=g)
    rows = torch.arange(B)
    left_src, right_src = nbr[rows, slots[:, 0]], nbr[rows, slots[:, 1]]  # (B, L)
    alleles = torch.where(torch.arange(L)[None, :] < switch[:, None], left_src, right_src).long()

    pad = torch.zeros(B, L, dtype=torch.bool)
    if n_pad:
        pad[:, L - n_pad :] = True
    mask = (torch.rand(B, L, generator=g) < mask_rate) & ~pad
    tokens = torch.where(mask, torch.full_like(alleles, MASK), alleles)
    tokens = torch.where(pad, torch.full_like(alleles, PAD), tokens)
    alleles = alleles.masked_fill(pad, 0)
    nbr = nbr.masked_fill(pad[:, None, :], 0.0)
    observed = ~mask & ~pad
    agree = nbr == alleles[:, None, :].float()
    left = _runs(agree, observed)
    right = _runs(agree.flip(-1), observed.flip(-1)).flip(-1)
    score = ((2 * agree.float() - 1) * observed[:, None, :]).sum(-1)  # agreements - disagreements
    valid = torch.ones(B, K, dtype=torch.bool)
    if K_valid is not None:
        valid[:, K_valid:] = False
    pos = (torch.arange(L) * 150 + 1_000_000).expand(B, L).masked_fill(pad, 0)
    site = torch.arange(L).expand(B, L).masked_fill(pad, -1)
    # The HMM's P(ALT) stand-in: the runs rule ((left+1)(right+1))^4 over the valid neighbours,
    # an HMM-like estimate from the same data (the real one comes from retrieval).
    logw = 4.0 * (torch.log1p(left) + torch.log1p(right))
    w = torch.softmax(logw.masked_fill(~valid[:, :, None], float("-inf")), dim=1)
    hmm_dose = (w * nbr).sum(1).masked_fill(pad, 0.0)  # (B, L)
    return {
        "tokens": tokens,
        "alleles": alleles,
        "mask": mask,
        "pad": pad,
        "af": af.masked_fill(pad, 0.0),
        "pos": pos,
        "site": site,
        "core": ~pad,
        "hap": torch.arange(B),
        "person": torch.arange(B) // 2,
        "window": torch.zeros(B, dtype=torch.long),
        "nbr_hap": torch.arange(K).expand(B, K) + 1000,
        "nbr_valid": valid,
        "nbr_score": score,
        "nbr_alleles": nbr,
        "nbr_left": left,
        "nbr_right": right,
        "hmm_dose": hmm_dose,
    }


def _masked_bce(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    m = batch["mask"]
    return F.binary_cross_entropy_with_logits(logits[m], batch["alleles"][m].float()).item()


def _train(net: SNVBertNet, batches: list[dict[str, torch.Tensor]], steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    net.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = F.binary_cross_entropy_with_logits(
            net(b)["logits"][b["mask"]], b["alleles"][b["mask"]].float()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def test_shapes_and_padding_invariance() -> None:
    torch.manual_seed(0)
    net = build_net("tiny").eval()
    batch = make_fake_batch(B=4, L=32, K=8, n_pad=7)
    out = net(batch, return_weights=True)
    assert out["logits"].shape == (4, 32)
    assert out["fusion_weights"].shape == (4, net.config.fusion_heads, 32, 8)
    assert out["fusion_entropy"].ndim == 0 and 0 < out["fusion_entropy"] < 1
    # Whatever sits at PAD positions must not change a prediction inside the window.
    other = dict(batch)
    other["tokens"] = batch["tokens"].masked_fill(batch["pad"], 1)
    other["af"] = batch["af"].masked_fill(batch["pad"], 0.3)
    other["pos"] = batch["pos"].masked_fill(batch["pad"], 9_999_999)
    keep = ~batch["pad"]
    torch.testing.assert_close(net(other)["logits"][keep], out["logits"][keep])
    # Without retrieval keys the net still runs (fusion skipped) and says so with a NaN entropy.
    plain = {k: v for k, v in batch.items() if not k.startswith("nbr_")}
    assert torch.isnan(net(plain)["fusion_entropy"])


def test_gradient_reaches_every_param_group() -> None:
    torch.manual_seed(0)
    net = build_net("tiny", dropout=0.1)
    groups = net.param_groups()
    assert set(groups) == {"embedding", "block.0", "block.1", "fusion", "head"}
    assert sum(len(v) for v in groups.values()) == len(list(net.parameters()))
    batch = make_fake_batch(B=4, L=32, K=8)
    net(batch)["logits"][batch["mask"]].sum().backward()
    for name, params in groups.items():
        norm = sum(p.grad.abs().sum().item() for p in params if p.grad is not None)
        assert norm > 0, f"no gradient reaches {name}"


def test_single_neighbour_fusion_is_degenerate() -> None:
    """The second seed's failure: softmax over one key is 1.0 whatever the query; entropy 0."""
    net = build_net("tiny").eval()
    out = net(make_fake_batch(B=4, L=32, K=4, K_valid=1), return_weights=True)
    w = out["fusion_weights"].permute(0, 2, 1, 3)[out["ran"]]  # where the network ran
    assert torch.all(w[..., 0] == 1.0) and torch.all(w[..., 1:] == 0.0)
    assert out["fusion_entropy"].item() == 0.0


@pytest.fixture
def one_thread():
    """Small tensors gain nothing from intra-op threads, and on a busy shared machine spinning
    worker threads make a many-step loop many times slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fusion_learns_from_uniform_start_and_beats_allele_frequency(one_thread) -> None:
    """Started with uniform neighbour weights (no init prior), training must find the signal."""
    torch.manual_seed(0)
    train = [make_fake_batch(B=16, L=48, K=64, seed=s) for s in range(8)]
    val = make_fake_batch(B=16, L=48, K=64, seed=99)
    # No HMM skip either: the fusion alone has to find the copied sources.
    net = build_net("tiny", dropout=0.0, fusion_init_sharpness=(0.0, 0.0), hmm_skip=False)
    uniform = net(val)["fusion_entropy"].item()
    assert uniform > 0.99  # all weights equal: normalised entropy 1
    af_baseline = _masked_bce(torch.logit(val["af"]), val)
    # A uniform blend of the neighbours is about the allele frequency.
    assert _masked_bce(net(val)["logits"], val) > 0.9 * af_baseline
    _train(net, train, steps=60, lr=3e-3)
    out = net(val)
    assert _masked_bce(out["logits"], val) < 0.7 * af_baseline
    assert out["fusion_entropy"].item() < 0.8  # < log K: weights concentrate on the copied sources


@pytest.mark.parametrize("hmm_skip", [False, True])
def test_init_prior_already_beats_allele_frequency(hmm_skip: bool) -> None:
    torch.manual_seed(0)
    val = make_fake_batch(B=16, L=48, K=64, seed=99)
    net = build_net("tiny", dropout=0.0, hmm_skip=hmm_skip).eval()
    assert _masked_bce(net(val)["logits"], val) < _masked_bce(torch.logit(val["af"]), val)


def test_hmm_skip_starts_at_the_hmm_and_learns_beyond_it(one_thread) -> None:
    """model.hmm_skip: at step 0 the net predicts the batch's HMM P(ALT); trained, it improves on
    an HMM that is blurred (here half the dose is the allele frequency), and a batch without
    the HMM's dosage is a clear error, not a silent logit of 0."""
    torch.manual_seed(0)

    def blurred(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "hmm_dose": 0.5 * batch["hmm_dose"] + 0.5 * batch["af"]}

    train = [blurred(make_fake_batch(B=16, L=48, K=64, seed=s)) for s in range(8)]
    val = blurred(make_fake_batch(B=16, L=48, K=64, seed=99))
    net = build_net("tiny", dropout=0.0).eval()
    p0 = torch.sigmoid(net(val)["logits"])
    assert (p0 - val["hmm_dose"])[~val["pad"]].abs().max() < 0.1
    hmm_bce = _masked_bce(torch.logit(val["hmm_dose"], eps=1e-4), val)
    assert abs(_masked_bce(net(val)["logits"], val) - hmm_bce) < 0.02 * hmm_bce
    _train(net, train, steps=60, lr=3e-3)
    assert _masked_bce(net(val)["logits"], val) < 0.8 * hmm_bce
    with pytest.raises(ValueError, match="hmm_skip"):
        net({k: v for k, v in val.items() if k != "hmm_dose"})


@pytest.mark.parametrize("size", sorted(SIZES))
def test_size_configs_state_only_the_size_and_build_as_in_python(size: str, tmp_path: Path) -> None:
    """conf/model/<size>.yaml writes no default of conf/model/_base.yaml a second time, and
    ``model=<size>`` on the command line builds the net ``build_net(size)`` builds in Python."""
    written = SIZES[size]
    assert {"d_model", "n_layer", "n_head"} <= set(written) <= {f.name for f in fields(NetConfig)}
    repeated = {k: v for k, v in written.items() if k in DEFAULTS and DEFAULTS[k] == v}
    assert not repeated, f"conf/model/{size}.yaml repeats _base.yaml's defaults {repeated}"
    cfg = compose_config("train", tmp_path, [f"model={size}"])
    assert instantiate(cfg.model).config == build_net(size).config
    # flat overrides of a size's key and of a NetConfig default, as on the command line
    cfg = compose_config(
        "train", tmp_path, [f"model={size}", "model.dropout=0.2", "model.hmm_skip=false"]
    )
    net = instantiate(cfg.model)
    assert net.config == build_net(size, dropout=0.2, hmm_skip=False).config
    assert net.config.fusion_layers == (0, written["n_layer"])


def _loader(batches: list[dict[str, torch.Tensor]]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


@pytest.mark.parametrize("lr", [1e-3, 3e-4])
def test_module_lr_is_configured_lr_times_schedule(lr: float, tmp_path: Path) -> None:
    """A real Trainer run: the optimizer's lr at every step is lr x the schedule's formula."""
    torch.manual_seed(0)
    sched = {"warmup_steps": 3, "warmup_start_factor": 0.2, "min_factor": 0.1}
    module = SNVBertModule(
        net=build_net("tiny"),
        optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.01),
        scheduler=functools.partial(cosine, **sched),
        lr=lr,
        focal_gamma=2.0,
    )
    seen: list[tuple[int, list[float]]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(
                (trainer.global_step, [g["lr"] for g in trainer.optimizers[0].param_groups])
            )

    steps = 6
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    batches = [make_fake_batch(B=4, L=32, K=8, seed=s) for s in range(3)]
    trainer.fit(module, _loader(batches), _loader(batches[:2]))
    assert [s for s, _ in seen] == list(range(steps))
    for step, lrs in seen:
        want = lr_at("cosine", step, lr, total_steps=steps, **sched)
        assert lrs == pytest.approx([want, want], rel=1e-12)
    assert seen[0][1][0] == pytest.approx(0.2 * lr)
    metrics = trainer.callback_metrics
    for key in (
        "train/loss",
        "val/loss",
        "val/f1",
        "val/acc",
        "val/f1_rare",
        "val/f1_common",
        "val/r2",
        "val/r2_maf_0.05_0.5",
    ):
        assert key in metrics, key

    # The checkpoint rebuilds the same net (strict load) from its stored config alone.
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = SNVBertModule.load_from_checkpoint(ckpt).eval()  # torch's safe default loading
    assert loaded.hparams.lr == lr and loaded.hparams.net == module.hparams.net
    module.eval()
    b = batches[0]
    torch.testing.assert_close(loaded.net(b)["logits"], module.net(b)["logits"])
    pred = loaded.predict_step(b, 0)
    assert set(pred) >= {"prob", "site", "hap", "core"}
    assert ((pred["prob"] >= 0) & (pred["prob"] <= 1)).all()


def test_weight_decay_spares_norms_biases_embeddings() -> None:
    net = build_net("tiny")
    decay, no_decay = net.decay_split()
    assert all(p.ndim == 2 for p in decay)
    emb = {id(net.embed.tok.weight), id(net.embed.pos.weight)}
    assert emb <= {id(p) for p in no_decay}
    assert len(decay) + len(no_decay) == len(list(net.parameters()))
    assert net.count_parameters() == sum(p.numel() for p in net.parameters())
    assert math.isfinite(net.count_parameters())


def test_fusion_stays_finite_under_bf16_autocast() -> None:
    """The fusion runs in fp32 under autocast: a unanimous neighbour vote must not become inf."""
    torch.manual_seed(0)
    net = SNVBertNet(d_model=32, n_layer=2, n_head=2, dropout=0.0).eval()
    batch = make_fake_batch(B=4, L=16, K=8)
    batch["nbr_alleles"] = torch.ones_like(batch["nbr_alleles"])  # every neighbour says ALT
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = net(batch)
    assert torch.isfinite(out["logits"]).all()
    plain = net(batch)["logits"]
    assert torch.allclose(out["logits"].float(), plain, atol=0.25)


def test_certain_sites_take_the_hmm_and_leave_the_network_s_sequence() -> None:
    """model.hmm_certain: a hidden site whose HMM P(ALT) is within eps of 0 or 1 outputs the
    HMM skip exactly and is not in the network's sequence (nothing about it reaches any other
    site); typed and uncertain sites keep their window positions, so with no certain site the
    output is the ungated network's; a row left with no site trains without NaN."""
    torch.manual_seed(0)
    batch = make_fake_batch(B=6, L=48, K=8, n_pad=5)
    dose = batch["hmm_dose"].clone()
    certain = batch["mask"] & (torch.rand(dose.shape) < 0.6)
    dose[certain] = torch.where(torch.rand(dose.shape) < 0.5, 1e-5, 1 - 1e-5)[certain]
    dose[~certain] = dose[~certain].clamp(0.01, 0.99)
    batch["hmm_dose"] = dose
    # the last row: every site hidden and certain
    batch["tokens"][-1, :43] = MASK
    batch["mask"][-1, :43] = True
    batch["hmm_dose"][-1, :43] = 1e-5
    certain[-1, :43] = True
    gated = build_net("tiny", hmm_certain=1e-3).eval()
    full = build_net("tiny", hmm_certain=0.0).eval()
    full.load_state_dict(gated.state_dict())
    out = gated(batch, return_weights=True)
    # packed, attention stays within each row: every row gives what it gives alone
    for row in range(batch["tokens"].shape[0]):
        alone = gated({k: v[row : row + 1] for k, v in batch.items()}, return_weights=True)
        for key in ("logits", "fusion_weights"):
            torch.testing.assert_close(alone[key][0], out[key][row])
    skip = gated.hmm_gain * torch.logit(batch["hmm_dose"], eps=1e-4)
    assert torch.equal(out["logits"][certain], skip[certain])
    assert torch.equal(out["ran"], ~batch["pad"] & ~certain)
    assert not torch.allclose(out["logits"][out["ran"]], skip[out["ran"]])
    # what lies at certain sites never reaches another site
    other = {k: v.clone() for k, v in batch.items()}
    for key in ("nbr_left", "nbr_right", "nbr_alleles"):
        other[key] = other[key].masked_fill(certain[:, None, :], 0.0)
    other["af"] = other["af"].masked_fill(certain, 0.49)
    torch.testing.assert_close(gated(other)["logits"], out["logits"])
    # no certain site: the gated network is the ungated one
    loose = {**batch, "hmm_dose": batch["hmm_dose"].clamp(0.01, 0.99)}
    keep = ~batch["pad"]
    torch.testing.assert_close(gated(loose)["logits"][keep], full(loose)["logits"][keep])
    # and it trains: gradients finite, reaching the blocks, with the empty row in the batch
    gated.train()
    loss = F.binary_cross_entropy_with_logits(
        gated(batch)["logits"][batch["mask"]], batch["alleles"][batch["mask"]].float()
    )
    loss.backward()
    grads = [p.grad for p in gated.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert gated.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_common_hidden_sites_take_the_hmm_with_hmm_common_maf() -> None:
    """model.hmm_common_maf: a hidden site whose panel MAF is at least the cap takes the HMM
    skip whatever its P(ALT) and leaves the network's sequence; typed sites of any MAF and rare
    uncertain hidden ones run; with no common site the capped net is the uncapped one; a cap
    outside (0, 0.5] is refused."""
    torch.manual_seed(0)
    batch = make_fake_batch(B=6, L=48, K=8, n_pad=4)
    batch["hmm_dose"] = batch["hmm_dose"].clamp(0.05, 0.95)  # uncertain everywhere
    batch["af"] = torch.rand(batch["af"].shape)
    maf = torch.minimum(batch["af"], 1 - batch["af"])
    hidden = (batch["tokens"] == MASK) & ~batch["pad"]
    common = hidden & (maf >= 0.2)
    capped = build_net("tiny", hmm_certain=1e-3, hmm_common_maf=0.2).eval()
    free = build_net("tiny", hmm_certain=1e-3).eval()
    free.load_state_dict(capped.state_dict())
    out = capped(batch)
    assert common.any() and (hidden & ~common).any()
    assert ((batch["tokens"] != MASK) & ~batch["pad"] & (maf >= 0.2) & out["ran"]).any()
    assert torch.equal(out["ran"], ~batch["pad"] & ~common)
    skip = capped.hmm_gain * torch.logit(batch["hmm_dose"], eps=1e-4)
    assert torch.equal(out["logits"][common], skip[common])
    assert not torch.allclose(free(batch)["logits"][common], skip[common])
    rare = {**batch, "af": batch["af"] * 0.19}  # every MAF below the cap
    keep = ~batch["pad"]
    torch.testing.assert_close(capped(rare)["logits"][keep], free(rare)["logits"][keep])
    for bad in (0.0, 0.6):
        with pytest.raises(ValueError, match="hmm_common_maf"):
            build_net("tiny", hmm_common_maf=bad)


def test_a_checkpoint_loads_without_lightning_and_old_ones_keep_their_behaviour() -> None:
    """impute loads the net from the checkpoint dict alone (no Lightning import); a config
    written before model.hmm_certain existed runs the network everywhere, as it did then."""
    from snvbert.model.net import net_from_checkpoint

    module = SNVBertModule(build_net("tiny"))
    raw = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    net = net_from_checkpoint(raw)
    assert net.config == module.net.config and not net.training
    theirs = module.net.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in net.state_dict().items())
    old = {k: v for k, v in raw["hyper_parameters"]["net"].items() if k != "hmm_certain"}
    assert net_from_checkpoint({**raw, "hyper_parameters": {"net": old}}).config.hmm_certain == 0
    assert SNVBertModule(old).net.config.hmm_certain == 0
    older = {k: v for k, v in old.items() if k != "hmm_common_maf"}
    assert (
        net_from_checkpoint({**raw, "hyper_parameters": {"net": older}}).config.hmm_common_maf
        is None
    )
    assert module.net.config.hmm_certain == DEFAULTS["hmm_certain"] > 0
