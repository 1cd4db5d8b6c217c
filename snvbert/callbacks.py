"""Lightning callbacks that tie the data's epoch and curriculum to the trainer."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from snvbert.utils.checkpoint import load_checkpoint
from snvbert.utils.io import atomic_path

log = logging.getLogger(__name__)


def _datamodule(trainer: L.Trainer) -> Any:
    return getattr(trainer, "datamodule", None)


def at_final_level(trainer: L.Trainer) -> bool:
    """True when this epoch trained at the curriculum's last (array) level, or there is none.

    Asks the training sampler which level its batches had, not the curriculum: the curriculum
    steps in ``on_train_epoch_end``, before checkpointing and early stopping look, and asking
    it would count the last epoch before the final level as a final one.
    """
    dm = _datamodule(trainer)
    curriculum = getattr(dm, "curriculum", None)
    if curriculum is None:
        return True
    trained = dm.sampler("train").last_level
    return (trained if trained is not None else curriculum.level) == curriculum.final_level


class MaskEpochs(L.Callback):
    """Reseeds training masks at each epoch start and steps the curriculum at each epoch end.

    Lightning has already called ``sampler.set_epoch(current_epoch)`` when
    ``on_train_epoch_start`` runs; this hook makes sure (a sampler left behind would silently
    repeat last epoch's masks, the first seed's failure) and logs the level and the
    fingerprints of this epoch's chip and of the validation chip.
    """

    def __init__(self) -> None:
        self._losses: list[float] = []
        self._epoch = -1  # the epoch whose training losses _losses holds

    # A run killed mid-epoch resumes with the losses of that epoch's batches so far (Lightning
    # does not call on_train_epoch_start for an epoch it resumes): the curriculum steps on their
    # mean, as the uninterrupted run's would.
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "losses": list(self._losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = int(state_dict.get("epoch", -1))
        self._losses = [float(x) for x in state_dict.get("losses", [])]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch != trainer.current_epoch:
            self._epoch, self._losses = trainer.current_epoch, []
        dm = _datamodule(trainer)
        if dm is None or not hasattr(dm, "sampler"):
            return
        sampler = dm.sampler("train")
        if sampler.epoch != trainer.current_epoch:
            log.warning(
                "train sampler was at epoch %d in epoch %d: reseeding it now",
                sampler.epoch,
                trainer.current_epoch,
            )
            sampler.set_epoch(trainer.current_epoch)
        level = dm.curriculum.current
        metrics = {
            "data/mask_level": float(dm.curriculum.level),
            "data/mask_rate": float(level.rate if level.strategy != "array" else -1.0),
        }
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)
        log.info(
            "epoch %d: mask level %d/%d (%s), val chip %s",
            trainer.current_epoch,
            dm.curriculum.level,
            dm.curriculum.final_level,
            level.strategy,
            self.val_fingerprint(dm),
        )

    @staticmethod
    def val_fingerprint(dm: Any) -> str:
        """Fingerprint of the validation chip (:meth:`SNVDataModule.val_fingerprint`)."""
        return dm.val_fingerprint()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """A batch masked for another epoch is an error, not a silent repeat of old masks."""
        epochs = batch.get("mask_epoch") if isinstance(batch, dict) else None
        if epochs is not None and len(epochs) and int(epochs[0]) != trainer.current_epoch:
            raise RuntimeError(
                f"training batch {batch_idx} of epoch {trainer.current_epoch} carries the masks "
                f"of epoch {int(epochs[0])}: the train sampler's epoch was not set"
            )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = _datamodule(trainer)
        if dm is None or not hasattr(dm, "curriculum") or not self._losses:
            return
        loss = float(np.mean(self._losses))
        if dm.curriculum.step(loss):
            log.info(
                "curriculum: level %d -> %d (%s) after epoch %d (train loss %.4f)",
                dm.curriculum.level - 1,
                dm.curriculum.level,
                dm.curriculum.current.strategy,
                trainer.current_epoch,
                loss,
            )


class CurriculumEarlyStopping(EarlyStopping):
    """EarlyStopping that counts only epochs at the curriculum's final (array) level."""

    def _should_skip_check(self, trainer: L.Trainer) -> bool:
        return super()._should_skip_check(trainer) or not at_final_level(trainer)


class CurriculumModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose "best" is chosen only among epochs at the final level.

    ``last.ckpt`` is written at every save point, improvement or not (Lightning 2.6 writes it
    only when a top-k checkpoint was saved in the same step), so a resume never repeats epochs,
    and also every ``last_every_n_steps`` optimizer steps (None: only at save points), so a run
    killed mid-epoch loses at most that many steps: ``ckpt_path=.../last.ckpt`` resumes it
    exactly (the same weights and metrics as the run uninterrupted).
    """

    _last_written_step = -1

    def __init__(self, *args: Any, last_every_n_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_steps is not None and int(last_every_n_steps) < 1:
            raise ValueError(f"last_every_n_steps={last_every_n_steps} must be at least 1 or null")
        self.last_every_n_steps = None if last_every_n_steps is None else int(last_every_n_steps)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_steps
        if n and self.save_last and not trainer.sanity_checking and trainer.global_step % n == 0:
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if at_final_level(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        if self._last_written_step != trainer.global_step:
            self._last_written_step = trainer.global_step
            super()._save_last_checkpoint(trainer, monitor_candidates)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name beside their path and renamed when complete
    (a kill during the write leaves the previous file whole), and read with
    ``weights_only=True``: a checkpoint is tensors and plain values, so loading one runs no
    code from it; one that holds anything else is refused in one line.

    Lightning's own writer stages the file in the system's temporary folder and moves it, a
    copy (not a rename) wherever that folder is another file system, as on most clusters.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as sink:
                torch.save(checkpoint, sink)
                sink.flush()
                os.fsync(sink.fileno())

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)
