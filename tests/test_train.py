"""The Hydra configs and the training entry point, on a tiny simulated panel."""

from __future__ import annotations

import csv
import inspect
import logging
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from hydra_config import compose_config

from snvbert.train import build_module, train
from snvbert.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    """The group's options; a leading ``_`` marks a file the options extend (model/_base)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_train(tmp_path: Path, sim: Path, *overrides: str):
    return compose_config(
        "train",
        tmp_path / "run",
        [
            f"data.sim_dir={sim}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            *overrides,
        ],
    )


@pytest.mark.parametrize("group", ["model", "schedule", "experiment", "trainer", "logger", "debug"])
def test_every_option_composes_and_builds(tmp_path, tiny_sim, group):
    choices = options(group)
    assert choices, group
    for choice in choices:
        if group == "trainer" and choice in ("gpu", "ddp") and not torch.cuda.is_available():
            cfg = compose_train(tmp_path, tiny_sim, f"{group}={choice}")
            assert cfg.trainer.accelerator == "gpu"  # composes; building needs a GPU
            continue
        cfg = compose_train(tmp_path, tiny_sim, f"{group}={choice}")
        module = build_module(cfg)
        assert module.hparams.lr == cfg.lr
        if group in ("trainer", "logger"):
            instantiate(cfg[group]) if group == "trainer" else [
                instantiate(v) for v in cfg.logger.values()
            ]


def test_cli_lr_reaches_the_config(tmp_path, tiny_sim):
    cfg = compose_train(tmp_path, tiny_sim, "model=large", "lr=1e-4")
    assert cfg.lr == 1e-4 and cfg.model.d_model == 256 and cfg.model.n_layer == 12


@pytest.mark.parametrize(
    ("experiment", "size", "lr", "warmup", "gamma"),
    [("v13", (128, 8, 4), 5e-5, 10000, 2.5), ("v14", (256, 12, 8), 1e-4, 20000, 2.0)],
)
def test_seed_experiments_keep_their_settings(
    tmp_path, tiny_sim, experiment, size, lr, warmup, gamma
):
    """The experiments write only what differs from the defaults; this pins the seed's runs
    against a change of those defaults."""
    cfg = compose_train(tmp_path, tiny_sim, f"experiment={experiment}")
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.model.n_head, cfg.model.dropout) == (
        *size,
        0.1,
    )
    assert cfg.schedule._target_ == "snvbert.model.schedule.cosine"
    assert (cfg.lr, cfg.schedule.warmup_steps, cfg.loss.focal_gamma) == (lr, warmup, gamma)


def test_lightning_overrides_as_lightning_users_type_them(tmp_path, tiny_sim):
    """Lightning's usual Trainer arguments are in conf/trainer/default.yaml with Lightning's own
    defaults, so they override without a ``+``; the model's and the loss's keys likewise."""
    defaults = compose_train(tmp_path, tiny_sim).trainer
    signature = inspect.signature(L.Trainer).parameters
    for key in ("max_steps", "val_check_interval", "accumulate_grad_batches", "limit_test_batches"):
        assert defaults[key] == signature[key].default, key
    cfg = compose_train(
        tmp_path,
        tiny_sim,
        "model=large",
        "lr=1e-4",
        "trainer.max_steps=12",
        "trainer.val_check_interval=5",
        "trainer.accumulate_grad_batches=2",
        "model.dropout=0.2",
        "model.hmm_skip=false",
        "loss.focal_gamma=1.0",
    )
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_steps == 12 and trainer.accumulate_grad_batches == 2
    assert trainer.val_check_interval == 5
    module = build_module(cfg)
    assert module.net.config.dropout == 0.2 and module.net.config.hmm_skip is False
    assert module.hparams.focal_gamma == 1.0 and module.hparams.lr == 1e-4


def test_run_too_short_to_validate_exits_0_and_warns(tmp_path, tiny_sim, caplog):
    """``trainer.max_steps`` below the first validation: the command trains, tests, warns that
    it never validated and returns NaN (what a sweep records as a failed trial), not exit 2."""
    cfg = compose_train(
        tmp_path,
        tiny_sim,
        "debug=default",
        "trainer.detect_anomaly=false",
        "trainer.max_steps=2",
        "trainer.limit_test_batches=2",
        "test=true",
    )
    with caplog.at_level(logging.WARNING, logger="snvbert.train"):
        value = train_main(cfg)  # the command's own body, as `python -m snvbert.train ...` runs it
    assert math.isnan(value)
    assert "never validated" in caplog.text and "optimized_metric 'val/r2'" in caplog.text


@pytest.mark.parametrize("experiment", [[], ["experiment=accuracy"]])
def test_fast_dev_run(tmp_path, tiny_sim, experiment):
    """One training and one validation batch run; experiment=accuracy's validation batch (the
    array task) runs the chromosome-wide, IBS-state HMM (data.hmm.scope=chromosome)."""
    cfg = compose_train(tmp_path, tiny_sim, "debug=fdr", *experiment)
    metrics, objects = train(cfg)
    assert objects["trainer"].state.finished
    assert "train/loss" in metrics or "train/loss_step" in metrics
    if experiment:
        assert objects["datamodule"].hmm.scope == "chromosome"
        assert objects["datamodule"].dataset.hmm_chromosome
        assert "val/baseline_hmm_r2" in metrics


def read_csv_metrics(run_dir: Path) -> list[dict]:
    files = list(run_dir.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    with open(files[0]) as fh:
        return list(csv.DictReader(fh))


def test_short_run_learns_and_validation_moves(tmp_path, tiny_sim):
    """A few epochs on the tiny panel: val loss changes each epoch, F1 and r² beat the untrained model."""
    common = [
        "model=tiny",
        "data.window.length=64",
        "data.window.overlap=16",
        "data.context_bp=50000",
        "data.retrieval.k=32",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "test=false",
        "schedule.warmup_steps=10",
        "data.curriculum.levels=[{strategy: random, rate: 0.3},{strategy: array, spacing_bp: 5000}]",
        "trainer.limit_val_batches=10",
        # start from uniform neighbour weights (no near-HMM prior) and without the HMM skip
        # (whose start is the HMM itself), so learning must show
        "model.fusion_init_sharpness=[0.0,0.0]",
        "model.hmm_skip=false",
    ]
    cfg = compose_train(
        tmp_path / "t",
        tiny_sim,
        *common,
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=20",
        "lr=2e-3",
    )
    L.seed_everything(int(cfg.seed))
    judge = L.Trainer(
        accelerator="cpu",
        logger=False,
        limit_val_batches=10,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    m0 = judge.validate(build_module(cfg), datamodule=instantiate(cfg.data), verbose=False)[0]
    m1, objects = train(cfg)
    rows = [r for r in read_csv_metrics(tmp_path / "t" / "run") if r.get("val/loss")]
    losses = [float(r["val/loss"]) for r in rows]
    assert len(losses) == 3 and len(set(losses)) == 3, losses
    assert m1["val/r2"] > m0["val/r2"] and m1["val/f1"] > m0["val/f1"], (m0, m1)
    lrs = [r for r in read_csv_metrics(tmp_path / "t" / "run") if r.get("lr-AdamW/pg1")]
    assert lrs, "LearningRateMonitor wrote no lr column"
    ckpts = sorted(p.name for p in (tmp_path / "t" / "run" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and all("r2" not in name for name in ckpts)


def test_multirun_gives_each_job_its_folder(tmp_path, tiny_sim):
    cmd = [
        sys.executable,
        "-m",
        "snvbert.train",
        "-m",
        "debug=fdr",
        "lr=1e-4,2e-4",
        f"data.sim_dir={tiny_sim}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "optimized_metric=null",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "logs").glob("debug/multiruns/*/*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    assert {"lr=0.0001" in j.read_text() or "lr=1e-4" in j.read_text() for j in jobs} == {
        True,
        False,
    }


def test_bad_panel_is_one_line(tmp_path):
    bad = tmp_path / "panel.vcf.gz"
    bad.write_text("not a vcf\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snvbert.train",
            f"data.panel={bad}",
            f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "trainer.max_epochs=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("snvbert: error:") and str(bad) in last


def test_hmm_skip_without_the_hmm_is_a_config_error(tmp_path, tiny_sim):
    """The skip needs the HMM's dosage: refused before any data is read, not deep in a step."""
    from snvbert.errors import SnvbertError

    cfg = compose_train(tmp_path, tiny_sim, "data.hmm=null")
    with pytest.raises(SnvbertError, match="model.hmm_skip=false"):
        train(cfg)
    cfg = compose_train(tmp_path, tiny_sim, "data.hmm=null", "model.hmm_skip=false")
    assert build_module(cfg).net.config.hmm_skip is False


@pytest.mark.slow
def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path, tiny_sim):
    cmd = [
        sys.executable,
        "-m",
        "snvbert.train",
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "debug=fdr",
        f"data.sim_dir={tiny_sim}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    best = list((tmp_path / "logs").glob("debug/multiruns/*/optimization_results.yaml"))
    assert len(best) == 1 and "best_value" in best[0].read_text()
    assert len(list((tmp_path / "logs").glob("debug/multiruns/*/*/.hydra"))) == 2


def test_best_checkpoint_is_from_the_final_level_and_resume_continues(tmp_path, tiny_sim):
    """Best is chosen among final-level epochs only; last.ckpt is current; resume picks up the
    step, the curriculum level and the lr schedule where they were."""
    common = [
        "debug=default",
        "trainer.detect_anomaly=false",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "schedule.warmup_steps=4",
        "data.curriculum.levels=[{strategy: random, rate: 0.3},{strategy: array, spacing_bp: 5000}]",
    ]
    cfg = compose_train(
        tmp_path,
        tiny_sim,
        *common,
        "trainer.max_epochs=2",
        "callbacks.model_checkpoint.save_top_k=-1",
    )
    _, objects = train(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    # every final-level epoch is kept (save_top_k=-1); epoch 0 trained at level 0 must not be
    assert sorted(p.name for p in ckpt_dir.glob("epoch*.ckpt")) == ["epoch001.ckpt"]
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert last["global_step"] == objects["trainer"].global_step == 6
    assert last["SNVDataModule"]["curriculum"]["level"] == 1

    resumed_cfg = compose_train(
        tmp_path, tiny_sim, *common, "trainer.max_epochs=3", f"ckpt_path={ckpt_dir / 'last.ckpt'}"
    )
    _, resumed = train(resumed_cfg)
    trainer, module = resumed["trainer"], resumed["module"]
    assert trainer.global_step == 9 and resumed["datamodule"].curriculum.level == 1
    sched = trainer.lr_scheduler_configs[0].scheduler
    expected = module.hparams.lr * sched.lr_lambdas[0](trainer.global_step)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    assert sched.last_epoch == trainer.global_step  # the warmup did not restart


def test_weight_averaging_checkpoints_and_imputes_the_average(tmp_path, tiny_sim):
    """experiment=accuracy's EMAWeightAveraging: a checkpoint's state_dict holds the average
    (what validation scored) and its current_model_state the raw weights; imputation loads the
    average. 2 epochs of 3 steps, averaged (decay 0.5) from the second epoch on."""
    cfg = compose_train(
        tmp_path,
        tiny_sim,
        "debug=default",
        "trainer.detect_anomaly=false",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "+callbacks.weight_averaging._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
        "+callbacks.weight_averaging.decay=0.5",
        "+callbacks.weight_averaging.update_starting_at_step=${trainer.limit_train_batches}",
    )
    train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    average, current = last["state_dict"], last["current_model_state"]
    assert average.keys() == current.keys()
    moved = [k for k in average if not torch.equal(average[k], current[k])]
    assert moved and all(k.startswith("net.") for k in moved)
    assert int(last["averaging_state"]["n_averaged"]) == 3  # steps 3, 4 and 5 (0-based)
    from snvbert.impute import load_trained

    net = load_trained(tmp_path / "run" / "checkpoints" / "last.ckpt", torch.device("cpu")).net
    name = moved[0]
    assert torch.equal(net.state_dict()[name.removeprefix("net.")], average[name])


def test_training_on_two_panels_sees_both_and_its_checkpoint_imputes(
    tmp_path, tiny_sim, monkeypatch
):
    """data.panel as a list: batches of both panels train and validate (the health checks
    read each batch's own panel), and the checkpoint names both and imputes either."""
    from snvbert.impute import impute
    from snvbert.simulate import simulate

    other = tmp_path / "other"
    simulate(other, seed=12, size="tiny", panel=20)
    panels = f"[{tiny_sim / 'panel.vcf.gz'},{other / 'panel.vcf.gz'}]"
    cfg = compose_train(
        tmp_path,
        tiny_sim,
        "debug=default",
        f"data.panel={panels}",
        "trainer.detect_anomaly=false",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=4",
    )
    from snvbert.data.datamodule import PanelMixture
    from snvbert.health.callback import TrainingHealth

    seen: list[int] = []
    build = PanelMixture.__getitem__

    def counted(self, desc):
        seen.append(int(desc[-1]))
        return build(self, desc)

    monkeypatch.setattr(PanelMixture, "__getitem__", counted)
    _, objects = train(cfg)
    assert set(seen) == {0, 1}
    (health,) = [c for c in objects["trainer"].callbacks if isinstance(c, TrainingHealth)]
    # the alignment spot-check read each batch's own panel: batches of the 40-haplotype panel
    # checked against the 120-haplotype one would differ
    retrieval = health.summary()["checks"]["retrieval"]
    assert retrieval["status"] == "ok" and "aligned" in retrieval["figure"], retrieval
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    described = torch.load(ckpt, weights_only=True)["SNVDataModule"]["describe"]
    assert [p["haplotypes"] for p in described["panels"]] == [120, 40]
    for sim, own in ((tiny_sim, True), (other, False)):
        summary = impute(
            ckpt,
            sim / "panel.vcf.gz",
            sim / "array.vcf.gz",
            tmp_path / f"imputed-{own}.vcf.gz",
            cache_dir=tmp_path / "cache",
            progress=False,
            genetic_map=sim / "map.plink",
        )
        assert summary["panel"]["training_panel"] is own
