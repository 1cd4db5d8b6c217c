"""``python -m snvbert.train``: fit the retrieval-augmented transformer (Hydra + Lightning).

``train(cfg)`` is pure (config in, metrics and objects out); ``main`` is the thin Hydra entry
point that returns the optimized metric, so Hydra sweepers (Optuna) work unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from snvbert.callbacks import AtomicCheckpointIO
from snvbert.config import build
from snvbert.errors import SnvbertError
from snvbert.model.module import SNVBertModule
from snvbert.utils.cli import user_errors_exit

log = logging.getLogger("snvbert.train")


def auto_precision() -> str:
    """bf16 autocast where the GPU supports it, full precision on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


if not OmegaConf.has_resolver("snvbert_precision"):
    OmegaConf.register_new_resolver("snvbert_precision", auto_precision)


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a config dict (callbacks, loggers)."""
    if not cfg:
        return []
    return [
        build(node) for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node
    ]


def build_module(cfg: DictConfig) -> SNVBertModule:
    """The LightningModule from the composed config: net size, optimizer, schedule, lr, loss."""
    return SNVBertModule(
        net=build(cfg.model),
        optimizer=build(cfg.optimizer),
        scheduler=build(cfg.schedule),
        lr=float(cfg.lr),
        focal_gamma=float(cfg.loss.focal_gamma),
        focal_alpha=cfg.loss.focal_alpha,
        compile=bool(cfg.compile),
    )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit (and optionally test) a model; return the final metrics and the built objects."""
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = build(cfg.data)
    if cfg.model.hmm_skip and datamodule.hmm is None:
        raise SnvbertError(
            "model.hmm_skip=true adds the HMM's P(ALT) to the output, but data.hmm=null: "
            "enable the HMM or set model.hmm_skip=false"
        )
    # Read the data before building the trainer: bad input fails fast, in one line.
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    # Checkpoints are written atomically and read with weights_only=True (AtomicCheckpointIO).
    trainer: L.Trainer = build(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    run_config = {k: v for k, v in cfg.items() if k != "hydra"}  # composed configs may carry it
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(OmegaConf.create(run_config), resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test") and not trainer.fast_dev_run:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def optimized_value(
    name: str | None, metrics: dict[str, float], trainer: L.Trainer
) -> float | None:
    """The value a sweep optimises: the run's best checkpoint score for ``name`` (what one would
    impute with), else its last logged value; None when no metric is optimised.

    A run that never validated (trainer.max_steps reached before the first validation) has no
    value: NaN, with a warning, so that a short run still succeeds and a sweep records the
    trial as failed. A name that validation did not log is a config error.
    """
    if not name:
        return None
    if name not in metrics:
        if not any(k.startswith("val/") for k in metrics):
            log.warning(
                "the run never validated (it stopped at step %d), so optimized_metric '%s' has "
                "no value and the run reports NaN; to validate, train longer or more often "
                "(trainer.max_steps, trainer.val_check_interval, trainer.limit_train_batches)",
                trainer.global_step,
                name,
            )
            return float("nan")
        raise SnvbertError(
            f"optimized_metric '{name}' was not logged; logged metrics: {sorted(metrics)}"
        )
    # NaN (a degenerate trial) is a float Optuna records as a failed trial.
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_score", None)
    if best is not None and getattr(checkpoint, "monitor", None) == name:
        return float(best)
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path="pkg://snvbert.conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    metrics, objects = train(cfg)
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))}
    log.info("final metrics: %s", shown)
    return optimized_value(cfg.get("optimized_metric"), metrics, objects["trainer"])


if __name__ == "__main__":
    main()
