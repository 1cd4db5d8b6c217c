"""Training health: every check fires on a planted fault, and a healthy run raises none.

Each fault is put into a tiny real run of the project's own config (``debug=default`` on the
``tiny_sim`` panel, a handful of steps) or, where a run cannot cheaply produce it, into real
tensors handed to the check directly. One healthy run is shared by the module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from hydra_config import compose_config
from omegaconf import DictConfig, OmegaConf

import snvbert.data.datamodule as datamodule_mod
import snvbert.train as train_mod
from snvbert.callbacks import MaskEpochs
from snvbert.data import masks as M
from snvbert.diagnose import diagnose, prepare, report
from snvbert.health import CHECKS, EVERY_N_STEPS, FAIL, OK, WARN, HealthThresholds, TrainingHealth
from snvbert.health.figures import val_chip_fingerprint
from snvbert.model.module import SNVBertModule
from snvbert.model.net import NeighbourFusion, build_net

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Two curriculum levels, so the second epoch already trains on the final (array) task and the
# train/val loss-scale check has something to compare after two epochs.
TWO_LEVELS = (
    "data.curriculum.levels=[{strategy: random, rate: 0.3},"
    "{strategy: array, spacing_bp: 10000, min_maf: 0.05}]"
)
ARRAY_ONLY = "data.curriculum.levels=[{strategy: array, spacing_bp: 10000, min_maf: 0.05}]"


def compose_cfg(
    run_dir: Path, cache: Path, sim: Path, *overrides: str, name: str = "train"
) -> DictConfig:
    """The real config, as ``python -m snvbert.<name> debug=default ...`` would compose it."""
    return compose_config(
        name,
        run_dir / "run",
        [
            "debug=default",
            f"data.sim_dir={sim}",
            f"paths.cache_dir={cache}",
            f"paths.log_dir={run_dir / 'logs'}",
            "trainer.detect_anomaly=false",
            "callbacks.health.every_n_steps=2",
            *overrides,
        ],
    )


def health_of(objects: dict[str, Any]) -> TrainingHealth:
    return next(cb for cb in objects["trainer"].callbacks if isinstance(cb, TrainingHealth))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("health_cache")


@pytest.fixture
def run(tmp_path: Path, cache: Path, tiny_sim: Path):
    """Train with the given overrides (a few steps by default); return the health callback."""

    def _run(*overrides: str, epochs: int = 1, steps: int = 3) -> TrainingHealth:
        cfg = compose_cfg(
            tmp_path,
            cache,
            tiny_sim,
            f"trainer.max_epochs={epochs}",
            f"trainer.limit_train_batches={steps}",
            *overrides,
        )
        _, objects = train_mod.train(cfg)
        return health_of(objects)

    return _run


@pytest.fixture(scope="module")
def healthy(
    tmp_path_factory: pytest.TempPathFactory, cache: Path, tiny_sim: Path
) -> Iterator[tuple]:
    """One healthy tiny diagnose run (2 epochs of 5 steps), every snvbert.health warning caught."""
    run_dir = tmp_path_factory.mktemp("healthy")
    cfg = compose_cfg(run_dir, cache, tiny_sim, "trainer.max_epochs=2", TWO_LEVELS, name="diagnose")
    handler = _Records()
    logger = logging.getLogger("snvbert.health")
    logger.addHandler(handler)
    try:
        status, health, metrics = diagnose(cfg)
    finally:
        logger.removeHandler(handler)
    assert status == 0
    yield health, handler.records, metrics, run_dir / "run"


def warnings_of(caplog: pytest.LogCaptureFixture, check: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "snvbert.health"
        and r.levelno == logging.WARNING
        and f"[{check}]" in r.getMessage()
    ]


# -- the healthy run ---------------------------------------------------------------------------
def test_healthy_run_reports_every_check_ok_and_no_warning(healthy) -> None:
    health, records, metrics, run_dir = healthy
    assert [r.getMessage() for r in records] == []
    assert health.events == []
    assert {n: r.status for n, r in health.results.items()} == {n: OK for n in CHECKS}, (
        health.table()
    )
    # The figures are logged, and health.json in the run folder holds the same verdicts.
    assert {
        "health/fusion_entropy",
        "health/logit_spread",
        "health/update_ratio/head",
        "health/grad_ratio/fusion.0",
        "health/train_val_loss_ratio",
    } <= set(metrics)
    report_ = json.loads((run_dir / "health.json").read_text())
    assert report_["status"] == OK and report_["steps"] == 10
    assert set(report_["checks"]) == set(CHECKS)
    assert report_["val_fingerprint"] and report_["history"]["validation"][-1]["val_fingerprint"]


def test_healthy_figures_are_meaningful(healthy) -> None:
    """Thresholds sit well away from a healthy run: they would catch a real fault, not noise."""
    health, *_ = healthy
    entropies = [e for _, e in health.history["fusion_entropy"]]
    assert min(entropies) > 10 * health.thresholds.entropy_min
    spreads = [s for _, s in health.history["logit_spread"]]
    assert min(spreads) > 100 * health.thresholds.spread_min
    ratios = [r for _, step in health.history["update_ratio"] for r in step.values()]
    assert (
        min(ratios) > 10 * health.thresholds.update_ratio_min
        and max(ratios) < health.thresholds.update_ratio_max / 10
    )
    grads = [r for _, step in health.history["grad_ratio"] for r in step.values()]
    assert min(grads) > 1e3 * health.thresholds.grad_ratio_min
    val = health.history["validation"]
    assert len(val) == 2 and val[1]["final_level"]
    # debug=default warms up over 1000 steps, so these 10 steps train at ~0.2 x lr and validation
    # moves little; still well clear of "identical".
    change = max(abs(val[1]["val"][k] - val[0]["val"][k]) for k in ("val/loss", "val/r2", "val/f1"))
    assert change > 10 * health.thresholds.frozen_atol


# -- planted faults, one per check -------------------------------------------------------------
class HardCodedLr(SNVBertModule):
    """The first seed's bug: the optimizer wrapper uses its own lr, not the configured one."""

    def configure_optimizers(self) -> dict[str, Any]:
        out = super().configure_optimizers()
        for group in out["optimizer"].param_groups:
            group["lr"] = 1.5e-4
        out["lr_scheduler"]["scheduler"].base_lrs = [1.5e-4] * len(out["optimizer"].param_groups)
        return out


def test_lr_overridden_in_configure_optimizers_is_caught_once(run, monkeypatch, caplog) -> None:
    monkeypatch.setattr(train_mod, "SNVBertModule", HardCodedLr)
    health = run(steps=3)  # checked at steps 0 and 2
    lr = health.results["lr"]
    assert lr.status == FAIL and lr.step == 0 and lr.events >= 2, health.table()
    assert "1.5e-04" in lr.figure or "0.00015" in lr.figure
    assert len(warnings_of(caplog, "lr")) == 1  # once per problem, however often it is seen


def test_single_key_fusion_is_caught(run) -> None:
    health = run("data.retrieval.k=1")
    fusion = health.results["fusion"]
    assert fusion.status == FAIL and "1 valid neighbour" in fusion.figure, health.table()


def test_detached_fusion_branch_gets_no_gradient(run, monkeypatch) -> None:
    original = NeighbourFusion.forward

    def detached(self, x, *args):  # the fusion's contribution reaches the loss without gradient
        new_x, summary, w, ent = original(self, x, *args)
        return x + (new_x - x).detach(), summary.detach(), w, ent

    monkeypatch.setattr(NeighbourFusion, "forward", detached)
    health = run()
    grads = health.results["gradients"]
    assert grads.status == FAIL and grads.figure.startswith("||grad|| = 0: fusion"), health.table()
    subjects = [e["subject"] for e in health.events if e["check"] == "gradients"]
    assert subjects == ["none:fusion.0,fusion.2"]  # one warning, and nothing else: the blocks learn


class ConstantHead(torch.nn.Module):
    """A head that ignores its input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*x.shape[:-1], 1)


def test_constant_head_predictions_do_not_vary(run, monkeypatch) -> None:
    build = train_mod.build_module

    def with_constant_head(cfg):
        module = build(cfg)
        module.net.head = ConstantHead()
        return module

    monkeypatch.setattr(train_mod, "build_module", with_constant_head)
    # Without the HMM skip, whose logit would vary however dead the head is (the Baselines
    # callback's val/baseline_hmm_r2 beside val/r2 shows whether the net adds to the HMM).
    health = run("model.hmm_skip=false")
    spread = health.results["spread"]
    assert spread.status == FAIL and "0.0e+00" in spread.figure, health.table()


def test_frozen_model_with_fixed_validation_masks(run) -> None:
    health = run("lr=0.0", epochs=2, steps=2)
    frozen = health.results["frozen_val"]
    assert frozen.status == FAIL, health.table()
    assert "training loss moved" in frozen.figure and health.val_fingerprint in frozen.figure
    assert health.results["updates"].status == FAIL  # and the reason is visible too


class SummedValLoss(SNVBertModule):
    """The seed's scale bug: validation loss summed over masked sites, training loss averaged."""

    def _loss(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        loss = super()._loss(logits, batch)
        return loss if self.training else loss * batch["mask"].sum()


def test_loss_summed_on_one_side(run, monkeypatch) -> None:
    monkeypatch.setattr(train_mod, "SNVBertModule", SummedValLoss)
    health = run(ARRAY_ONLY)
    scale = health.results["loss_scale"]
    assert scale.status == FAIL and "train/val loss" in scale.figure, health.table()


def _patch_retrieval(monkeypatch, fault) -> None:
    original = datamodule_mod.retrieve

    def faulty(batch, *args, **kwargs):
        return fault(original(batch, *args, **kwargs))

    monkeypatch.setattr(datamodule_mod, "retrieve", faulty)


def test_retrieval_returning_the_query_is_caught(run, monkeypatch) -> None:
    def self_first(batch):
        batch["nbr_hap"][:, 0] = batch["hap"]
        batch["nbr_alleles"][:, 0] = batch["alleles"].float()
        return batch

    _patch_retrieval(monkeypatch, self_first)
    health = run(steps=2)
    retrieval = health.results["retrieval"]
    assert retrieval.status == FAIL and "own person" in retrieval.figure, health.table()
    assert [e["subject"] for e in health.events if e["check"] == "retrieval"] == ["self"]


def test_misaligned_neighbours_are_caught(run, monkeypatch) -> None:
    def shifted(batch):  # neighbour alleles one site off: a skipped site shifting the list
        batch["nbr_alleles"] = batch["nbr_alleles"].roll(1, dims=2)
        return batch

    _patch_retrieval(monkeypatch, shifted)
    health = run(steps=2)
    retrieval = health.results["retrieval"]
    assert retrieval.status == FAIL and "spot-checked" in retrieval.figure, health.table()


class NanLoss(SNVBertModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 1 else loss


def test_nan_loss_and_gradients_are_caught(run, monkeypatch) -> None:
    monkeypatch.setattr(train_mod, "SNVBertModule", NanLoss)
    health = run(steps=4)
    grads = health.results["gradients"]
    assert grads.status == FAIL and "nan" in grads.figure.lower(), health.table()
    assert any(e["subject"] == "loss" for e in health.events)


def test_unstable_updates_are_caught(run) -> None:
    health = run("lr=0.5", "schedule.warmup_steps=0", steps=1)
    updates = health.results["updates"]
    assert updates.status == WARN and "> 1e-01" in updates.figure, health.table()


# -- checks on real tensors (faults a short run cannot cheaply produce) --------------------------
def _batch(b: int = 4, k: int = 8, length: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    left = torch.randint(0, 6, (b, k, length), generator=g).float()
    return {
        "tokens": torch.randint(0, 3, (b, length), generator=g),
        "pad": torch.zeros(b, length, dtype=torch.bool),
        "pos": torch.arange(length).repeat(b, 1) * 1000 + 5000,
        "af": torch.rand(b, length, generator=g) * 0.5,
        "nbr_valid": torch.ones(b, k, dtype=torch.bool),
        "nbr_left": left,
        "nbr_right": left.flip(-1),
        "nbr_score": torch.randn(b, k, generator=g),
        "nbr_alleles": torch.randint(0, 2, (b, k, length), generator=g).float(),
        "hmm_dose": torch.rand(b, length, generator=g),
        "alleles": torch.randint(0, 2, (b, length), generator=g),
        "mask": torch.ones(b, length, dtype=torch.bool),
    }


def test_collapsed_fusion_attention_after_patience() -> None:
    """One-hot weights over K=8 keys (entropy 0) on `entropy_patience` checks in a row: warned."""
    health = TrainingHealth(entropy_patience=3)
    batch = _batch()
    onehot = torch.zeros(4, 2, 16, 8)
    onehot[..., 3] = 1.0
    out = {"fusion_weights": onehot, "fusion_entropy": torch.tensor(0.0)}
    for step in range(2):
        health._check_fusion(out, batch, batch["pad"], step)
        assert health.results["fusion"].status == OK
    health._check_fusion(out, batch, batch["pad"], 2)
    assert health.results["fusion"].status == WARN and "0.000" in health.results["fusion"].figure
    # A real net's weights: not collapsed.
    fresh = TrainingHealth()
    real = build_net("tiny")(batch, return_weights=True)
    for step in range(4):
        fresh._check_fusion(real, batch, batch["pad"], step)
    assert fresh.results["fusion"].status == OK


def test_vanishing_gradient_in_one_group() -> None:
    net = build_net("tiny")
    batch = _batch()
    out = net(batch)
    torch.nn.functional.binary_cross_entropy_with_logits(
        out["logits"], batch["alleles"].float()
    ).backward()
    for p in net.blocks[1].parameters():
        p.grad.mul_(1e-12)
    health = TrainingHealth()
    holder = torch.nn.Module()
    holder.net = net
    health._check_gradients(holder, step=0)
    grads = health.results["gradients"]
    assert grads.status == WARN and "< 1e-08: block.1 " in grads.figure, health.table()
    assert [e["subject"] for e in health.events] == ["vanishing:block.1"]


# -- where the thresholds come from -----------------------------------------------------------
def _composed(name: str, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_thresholds_have_one_source_and_the_cli_gets_the_python_defaults() -> None:
    """conf/callbacks/default.yaml names every knob (so overrides need no `+`) and states no
    value: the defaults live in HealthThresholds and TrainingHealth alone."""
    node = _composed("train").callbacks.health
    knobs = OmegaConf.to_container(node)
    assert knobs.pop("_target_") == "snvbert.health.TrainingHealth"
    fields = {f.name for f in dataclasses.fields(HealthThresholds)}
    assert set(knobs) == {"every_n_steps"} | fields and set(knobs.values()) == {None}
    cli, python = instantiate(node), TrainingHealth()
    assert cli.thresholds == python.thresholds == HealthThresholds()
    assert cli.every_n_steps == python.every_n_steps == EVERY_N_STEPS
    assert cli.summary()["thresholds"] == python.summary()["thresholds"]


def test_threshold_overrides_on_the_command_line() -> None:
    node = _composed(
        "train", "callbacks.health.lr_rtol=1e-5", "callbacks.health.entropy_patience=5"
    ).callbacks.health
    health = instantiate(node)
    assert health.thresholds == HealthThresholds(lr_rtol=1e-5, entropy_patience=5)
    diag = instantiate(_composed("diagnose", "callbacks.health.every_n_steps=7").callbacks.health)
    assert diag.every_n_steps == 7 and diag.print_summary is False
    assert diag.thresholds == HealthThresholds()
    assert instantiate(_composed("diagnose").callbacks.health).every_n_steps == 5


def test_validation_chip_fingerprint_is_the_datamodules_chip(tmp_path, cache, tiny_sim) -> None:
    """Both callbacks fingerprint the chip PanelWindows.chip draws for validation, as the chip
    was fingerprinted before they asked the datamodule for it."""
    cfg = compose_cfg(tmp_path, cache, tiny_sim, ARRAY_ONLY)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    final, sampler = dm.curriculum.levels[-1], dm.sampler("val")
    typed = M.chip_sites(
        dm.panel.pos,
        np.minimum(dm.af, 1 - dm.af),
        seed=dm.seed,
        stream=sampler.stream,
        epoch=sampler.mask_epoch,
        spacing_bp=final.spacing_bp,
        min_maf=final.min_maf,
    )
    assert MaskEpochs.val_fingerprint(dm) == val_chip_fingerprint(dm) == M.fingerprint(typed)
    assert val_chip_fingerprint(object()) is None  # a datamodule without the chip machinery


# -- the diagnose command ----------------------------------------------------------------------
def test_diagnose_config_only_shortens_the_run(tmp_path, cache, tiny_sim) -> None:
    cfg = prepare(compose_cfg(tmp_path, cache, tiny_sim, name="diagnose"))
    assert cfg.task_name == "diagnose" and cfg.test is False and cfg.trainer.max_steps == 300
    assert cfg.trainer.limit_train_batches == 5 and cfg.trainer.limit_val_batches == 2  # debug's
    assert cfg.callbacks.health._target_ == "snvbert.health.TrainingHealth"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = compose("diagnose", overrides=["callbacks=none"])
    plain = prepare(plain)
    assert plain.trainer.limit_train_batches == 60 and plain.trainer.limit_val_batches == 10
    assert plain.callbacks.health._target_ == "snvbert.health.TrainingHealth"


def test_report_table_names_every_check(healthy) -> None:
    health, *_ = healthy
    text = report(health, health.steps)
    for name in CHECKS:
        assert name in text
    assert "overall: OK (8 ok)" in text


def test_diagnose_command_exits_1_on_a_failed_check(tmp_path, cache, tiny_sim) -> None:
    """``python -m snvbert.diagnose debug=default lr=0``: the table, health.json, exit status 1."""
    cmd = [
        sys.executable,
        "-m",
        "snvbert.diagnose",
        "debug=default",
        f"data.sim_dir={tiny_sim}",
        f"paths.cache_dir={cache}",
        f"paths.log_dir={tmp_path}",
        "~callbacks.progress_bar",
        "+trainer.enable_progress_bar=false",
        "lr=0",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "overall: FAIL" in result.stdout and "check       status  figure" in result.stdout
    assert "frozen_val  fail" in result.stdout and "updates     fail" in result.stdout
    assert len(list(tmp_path.glob("diagnose/runs/*/health.json"))) == 1
