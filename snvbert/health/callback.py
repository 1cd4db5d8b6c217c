"""The training-health Lightning callback: measures the figures, has them judged, reports.

:class:`TrainingHealth` gathers, every ``every_n_steps`` optimizer steps (and at each epoch
end), what the checks need: the optimizer's lr, grad and weight norms per part, a copy of the
weights to measure the step's update, one no-grad probe forward (fusion weights, logits), the
batch's neighbours, the logged validation metrics. :mod:`snvbert.health.figures` turns them into
numbers, :mod:`snvbert.health.checks` judges them, and this module reports: ``health/...``
metrics, one warning per problem through the ``snvbert.health`` logger with the number that
shows it and what to do, and at the end of fit ``health.json`` in the run folder and a
one-screen table (:func:`snvbert.health.report.format_table`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from snvbert.health.checks import (
    CHECKS,
    FAIL,
    NA,
    OK,
    WARN,
    FusionFigures,
    HealthThresholds,
    ValidationRecord,
    Verdict,
    check_frozen,
    check_fusion_entropy,
    check_gradients,
    check_loss_scale,
    check_loss_values,
    check_lr,
    check_retrieval,
    check_spread,
    check_updates,
    norm_ratio,
)
from snvbert.health.figures import (
    alignment_counts,
    expected_lr,
    fusion_figures,
    logit_spread,
    norm,
    parameter_groups,
    retrieval_counts,
    val_chip_fingerprint,
)
from snvbert.health.report import NA_HINTS, CheckResult, format_table, worst
from snvbert.utils.io import atomic_path

log = logging.getLogger("snvbert.health")

# Each check costs one extra no-grad forward of the current batch and one copy of the weights;
# every 50 optimizer steps keeps the overhead around 1-2 %.
EVERY_N_STEPS = 50


@dataclass
class _Snapshot:
    """Weights before an optimizer step, to measure the step's update."""

    step: int
    weights: dict[str, list[Tensor]] = field(default_factory=dict)


class TrainingHealth(L.Callback):
    """Watches a training run for the seeds' pathologies; warns once per problem.

    Args:
        every_n_steps: check every this many optimizer steps (step 0 is always checked);
            None: :data:`EVERY_N_STEPS`.
        lr_rtol, grad_ratio_min, update_ratio_min, update_ratio_max, entropy_min,
            entropy_patience, spread_min, frozen_atol, loss_ratio_max: thresholds, as
            :class:`snvbert.health.checks.HealthThresholds` describes them; None keeps the
            value of ``thresholds``.
        align_samples: (row, neighbour) pairs whose alleles are compared with the panel over
            the whole window, per check.
        write_json, print_summary: what to do at the end of fit.
        thresholds: the thresholds to start from; None: ``HealthThresholds()``'s defaults.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        lr_rtol: float | None = None,
        grad_ratio_min: float | None = None,
        update_ratio_min: float | None = None,
        update_ratio_max: float | None = None,
        entropy_min: float | None = None,
        entropy_patience: int | None = None,
        spread_min: float | None = None,
        frozen_atol: float | None = None,
        loss_ratio_max: float | None = None,
        align_samples: int = 4,
        write_json: bool = True,
        print_summary: bool = True,
        thresholds: HealthThresholds | None = None,
    ) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(EVERY_N_STEPS if every_n_steps is None else every_n_steps))
        self.thresholds = (thresholds or HealthThresholds()).with_values(
            lr_rtol=lr_rtol,
            grad_ratio_min=grad_ratio_min,
            update_ratio_min=update_ratio_min,
            update_ratio_max=update_ratio_max,
            entropy_min=entropy_min,
            entropy_patience=entropy_patience,
            spread_min=spread_min,
            frozen_atol=frozen_atol,
            loss_ratio_max=loss_ratio_max,
        )
        self.align_samples = int(align_samples)
        self.write_json, self.print_summary = bool(write_json), bool(print_summary)
        self.results: dict[str, CheckResult] = {}
        self._restored: dict[str, Any] | None = None
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.results = {name: CheckResult(name, title) for name, title in CHECKS.items()}
        self.warned: set[tuple[str, str]] = set()
        self.events: list[dict[str, Any]] = []
        self.history: dict[str, list[Any]] = {
            "fusion_entropy": [],
            "logit_spread": [],
            "update_ratio": [],
            "grad_ratio": [],
            "validation": [],
        }
        self._check_step: int | None = None  # optimizer step being checked, if any
        self._step_offset: int | None = 0  # global step at fit start (its first is checked)
        self._snapshot: _Snapshot | None = None
        self._grad_ratios: dict[str, float] = {}
        self._fusion: list[FusionFigures] = []  # every check's, for the collapse's patience
        self._nonfinite_loss: Tensor | None = None  # device counter: no host sync per step
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._epoch_final: bool | None = None
        self._val_ran = False
        self._rng = np.random.default_rng(0x4EA1)
        self.val_fingerprint: str | None = None
        self.json_path: Path | None = None
        self.steps = 0

    # Everything a run has recorded, as plain values (checkpoints load with weights_only): a
    # resumed run carries on the same record, and its health.json is the uninterrupted run's.
    def state_dict(self) -> dict[str, Any]:
        return {
            "warned": sorted(map(list, self.warned)),
            "results": {name: asdict(r) for name, r in self.results.items()},
            "events": self.events,
            "history": self.history,
            "fusion": [list(f) for f in self._fusion],
            "nonfinite_loss": None if self._nonfinite_loss is None else int(self._nonfinite_loss),
            "loss_sum": None if self._loss_sum is None else float(self._loss_sum),
            "loss_count": self._loss_count,
            "epoch_final": self._epoch_final,
            "val_ran": self._val_ran,
            "rng": self._rng.bit_generator.state,
            "val_fingerprint": self.val_fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def _restore(self, state: dict[str, Any], device: torch.device) -> None:
        """The record of :meth:`state_dict` back (a state of an older version: its warnings)."""
        self.warned = {tuple(x) for x in state.get("warned", [])}
        if "results" not in state:
            return
        self.results = {name: CheckResult(**r) for name, r in state["results"].items()}
        self.events, self.history = list(state["events"]), dict(state["history"])
        self._fusion = [FusionFigures(*f) for f in state["fusion"]]
        as_tensor = lambda v: None if v is None else torch.tensor(v, device=device)  # noqa: E731
        self._nonfinite_loss = as_tensor(state["nonfinite_loss"])
        self._loss_sum = as_tensor(state["loss_sum"])
        self._loss_count = int(state["loss_count"])
        self._epoch_final, self._val_ran = state["epoch_final"], bool(state["val_ran"])
        self._rng.bit_generator.state = state["rng"]
        self.val_fingerprint = state["val_fingerprint"]
        self._step_offset = None  # the record goes on: no extra check at the first step

    # -- reporting ---------------------------------------------------------------------------
    def _apply(self, verdicts: Iterable[Verdict], step: int | None) -> None:
        """Record verdicts seen at ``step``: a problem raises its check's result (and warns
        the first time), ok refreshes the figure, n/a says why a check is not measured yet."""
        for v in verdicts:
            result = self.results[v.check]
            if v.status in (WARN, FAIL):
                self._report(v, step)
            elif v.status == OK:
                result.raise_to(OK, v.figure, "", None)
            elif result.status == NA and v.figure:
                result.figure = v.figure

    def _report(self, v: Verdict, step: int | None) -> None:
        """Record a problem; log a warning the first time a (check, subject) goes wrong."""
        self.results[v.check].raise_to(v.status, v.figure, v.hint, step)
        key = (v.check, v.subject)
        if key in self.warned:
            return
        self.warned.add(key)
        where = f" at step {step}" if step is not None else ""
        msg = (
            f"training health [{v.check}] {v.what or CHECKS[v.check]}{where}: {v.figure}. {v.hint}"
        )
        self.events.append(
            {
                "check": v.check,
                "status": v.status,
                "subject": v.subject,
                "step": step,
                "figure": v.figure,
                "message": msg,
            }
        )
        log.warning(msg)

    @property
    def status(self) -> str:
        """Worst status over all checks."""
        return worst(r.status for r in self.results.values())

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "checks": {name: asdict(r) for name, r in self.results.items()},
            "events": self.events,
            "val_fingerprint": self.val_fingerprint,
            "history": self.history,
            "thresholds": {"every_n_steps": self.every_n_steps, **asdict(self.thresholds)},
        }

    def table(self) -> str:
        return format_table(self.results.values())

    # -- fit start / end ---------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reset()
        self._step_offset = trainer.global_step  # a run's first step is checked
        restored, self._restored = self._restored, None
        if restored is not None:  # resumed from a checkpoint: the record goes on
            self._restore(restored, pl_module.device)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._finish(trainer)

    def _finish(self, trainer: L.Trainer) -> None:
        self.steps = int(trainer.global_step)
        for name, result in self.results.items():
            if result.status == NA and not result.hint:
                result.hint = NA_HINTS.get(name, "")
        if not trainer.is_global_zero:
            return
        if self.write_json:
            root = trainer.default_root_dir or trainer.log_dir or "."
            self.json_path = Path(root) / "health.json"
            try:
                with atomic_path(self.json_path) as tmp:
                    tmp.write_text(
                        json.dumps(self.summary(), indent=1, default=_json_default) + "\n"
                    )
            except OSError as err:  # a report must never crash a finished training
                log.warning("could not write %s: %s", self.json_path, err)
                self.json_path = None
        if self.print_summary:
            where = f" (details: {self.json_path})" if self.json_path else ""
            print(f"\ntraining health: {self.status.upper()}{where}\n{self.table()}", flush=True)

    # -- per step ----------------------------------------------------------------------------
    def _net(self, pl_module: L.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", pl_module)
        return getattr(net, "_orig_mod", net)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        first = step == self._step_offset
        self._check_step = step if (first or step % self.every_n_steps == 0) else None
        if self._check_step is not None and isinstance(batch, Mapping):
            self._check_retrieval(trainer, batch, step)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self._check_step is None or step != self._check_step:
            return
        self._check_lr(trainer, pl_module, optimizer, step)
        self._check_gradients(pl_module, step)
        groups = parameter_groups(self._net(pl_module))
        self._snapshot = _Snapshot(
            step, {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
        )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            loss = loss.detach().float()
            bad = (~torch.isfinite(loss)).sum()
            self._nonfinite_loss = (
                bad if self._nonfinite_loss is None else self._nonfinite_loss + bad
            )
            finite = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
            self._loss_sum = finite if self._loss_sum is None else self._loss_sum + finite
            self._loss_count += 1
        step = self._check_step
        if step is None:
            return
        if self._nonfinite_loss is not None:
            self._apply(check_loss_values(int(self._nonfinite_loss)), step)
        figures: dict[str, float] = {}
        snap = self._snapshot
        if snap is not None and trainer.global_step > snap.step:
            figures.update(self._check_updates(trainer, pl_module, snap))
            self._snapshot = None
        figures.update({f"health/grad_ratio/{g}": r for g, r in self._grad_ratios.items()})
        self._grad_ratios = {}
        if isinstance(batch, Mapping):
            figures.update(self._probe(pl_module, batch, step))
        figures = {k: v for k, v in figures.items() if math.isfinite(v)}
        if figures:
            pl_module.log_dict(figures, on_step=True, on_epoch=False, batch_size=1)
        self._check_step = None

    # -- gathering the figures ---------------------------------------------------------------
    def _check_lr(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> None:
        expected = expected_lr(pl_module, trainer, step)
        actual = [float(group["lr"]) for group in optimizer.param_groups]
        self._apply(check_lr(expected, actual, self.thresholds.lr_rtol, step), step)

    def _check_gradients(self, pl_module: L.LightningModule, step: int) -> None:
        self._grad_ratios = {}
        for name, params in parameter_groups(self._net(pl_module)).items():
            trainable = [p for p in params if p.requires_grad]
            if not trainable:
                continue  # frozen on purpose: not this check's business
            grads = [p.grad for p in trainable if p.grad is not None]
            self._grad_ratios[name] = norm_ratio(norm(grads), norm(trainable))
        self.history["grad_ratio"].append([step, dict(self._grad_ratios)])
        self._apply(check_gradients(self._grad_ratios, self.thresholds.grad_ratio_min), step)

    def _check_updates(
        self, trainer: L.Trainer, pl_module: L.LightningModule, snap: _Snapshot
    ) -> dict[str, float]:
        step = snap.step
        groups = parameter_groups(self._net(pl_module))
        lr = getattr(pl_module.hparams, "lr", None)
        ratios: dict[str, float] = {}
        for name, before in snap.weights.items():
            after = groups.get(name)
            if after is None or not any(p.requires_grad for p in after):
                continue
            delta = norm([a.detach() - b for a, b in zip(after, before, strict=True)])
            ratios[name] = norm_ratio(delta, norm(before))
        if not ratios:
            return {}
        self.history["update_ratio"].append([step, dict(ratios)])
        verdicts = check_updates(
            ratios,
            self.thresholds.update_ratio_min,
            self.thresholds.update_ratio_max,
            configured_lr=None if lr is None else float(lr),
            scheduled_lr=expected_lr(pl_module, trainer, step),
        )
        self._apply(verdicts, step)
        return {f"health/update_ratio/{g}": r for g, r in ratios.items()}

    @torch.no_grad()
    def _probe(
        self, pl_module: L.LightningModule, batch: Mapping[str, Any], step: int
    ) -> dict[str, float]:
        """One no-grad forward in eval mode: fusion weights and logits of this batch."""
        net = self._net(pl_module)
        if "tokens" not in batch:
            return {}
        was_training = net.training
        net.eval()
        try:
            try:
                out = net(batch, return_weights=True)
            except TypeError:  # a net without the weights option
                out = net(batch)
        finally:
            net.train(was_training)
        pad = batch.get("pad")
        figures: dict[str, float] = {}
        figures.update(self._check_fusion(out, batch, pad, step))
        figures.update(self._check_spread(out["logits"], pad, step))
        return figures

    def _check_fusion(
        self, out: Mapping[str, Tensor], batch: Mapping[str, Any], pad: Tensor | None, step: int
    ) -> dict[str, float]:
        figures = fusion_figures(out, batch, pad)
        if figures is None:
            return {}
        self.history["fusion_entropy"].append([step, figures.entropy])
        self._fusion.append(figures)
        t = self.thresholds
        self._apply(check_fusion_entropy(self._fusion, t.entropy_min, t.entropy_patience), step)
        return {"health/fusion_entropy": figures.entropy}

    def _check_spread(self, logits: Tensor, pad: Tensor | None, step: int) -> dict[str, float]:
        spread = logit_spread(logits, pad)
        if spread is None:
            return {}
        self.history["logit_spread"].append([step, spread])
        self._apply(check_spread(spread, self.thresholds.spread_min), step)
        return {"health/logit_spread": spread}

    def _check_retrieval(
        self, trainer: L.Trainer, batch: Mapping[str, Any], step: int | None
    ) -> None:
        """Self/own-person retrieval over the whole batch; site alignment on a few entries."""
        counts = retrieval_counts(batch)
        if counts is None:
            return
        dm = getattr(trainer, "datamodule", None)
        # the batch's own training panel (a data module may draw from several)
        panel = dm.panel_for(batch) if hasattr(dm, "panel_for") else getattr(dm, "panel", None)
        haplotypes = getattr(panel, "haplotypes", None)
        checked, bad = alignment_counts(
            haplotypes, batch, counts.valid, self.align_samples, self._rng
        )
        verdicts = check_retrieval(
            counts.neighbours, counts.self_hits, counts.person_hits, checked, bad
        )
        self._apply(verdicts, step)

    # -- validation and epochs ---------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # (Lightning does not call this for an epoch a run resumes mid-way: its record so far,
        # restored, goes on)
        cur = getattr(getattr(trainer, "datamodule", None), "curriculum", None)
        # Read now: the curriculum may step at this epoch's end before our epoch-end hook runs.
        self._epoch_final = True if cur is None else bool(cur.is_final)
        self._loss_sum, self._loss_count = None, 0
        self._val_ran = False

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and isinstance(batch, Mapping):
            self._check_retrieval(trainer, batch, trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_ran = True
        self.val_fingerprint = val_chip_fingerprint(getattr(trainer, "datamodule", None))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation of this epoch has run by now: compare it with the last one and with training."""
        if not self._val_ran or self._loss_count == 0 or self._loss_sum is None:
            return
        epoch, step = trainer.current_epoch, trainer.global_step
        train_loss = float(self._loss_sum) / self._loss_count
        vals = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and "baseline" not in k and v.numel() == 1
        }
        record = ValidationRecord(
            epoch=epoch,
            step=step,
            train_loss=train_loss,
            final_level=self._epoch_final,
            val_fingerprint=self.val_fingerprint,
            val=vals,
        )
        self.history["validation"].append(record)
        log.info(
            "health: epoch %d validation chip %s, val/loss %s, train loss %.4g",
            epoch,
            self.val_fingerprint,
            vals.get("val/loss"),
            train_loss,
        )
        t = self.thresholds
        frozen = check_frozen(self.history["validation"], t.frozen_atol)
        scale = check_loss_scale(
            train_loss, vals.get("val/loss"), t.loss_ratio_max, final_level=self._epoch_final
        )
        self._apply([*frozen, *scale], step)
        figures = {
            name: v.value
            for name, verdicts in (
                ("health/val_change", frozen),
                ("health/train_val_loss_ratio", scale),
            )
            for v in verdicts
            if v.value is not None and math.isfinite(v.value)
        }
        if figures:
            pl_module.log_dict(figures, on_step=False, on_epoch=True, batch_size=1)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Tensor):
        return obj.tolist()
    return str(obj)
