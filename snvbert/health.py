"""Training health: a Lightning callback that says, in plain words, when training goes wrong.

Both seed runs went wrong silently: a learning rate hard-coded inside the optimizer wrapper,
validation metrics that stood still for five epochs, losses summed on one side and averaged
on the other, and a fusion attention over a single key whose softmax is always 1.0. Every one
of those is visible in a number that costs little to compute. :class:`TrainingHealth` computes
those numbers every ``every_n_steps`` optimizer steps (and at each epoch end), logs them as
``health/...`` metrics, warns once per problem through the ``snvbert.health`` logger with the
number that shows it and what to do, and at the end of fit writes ``health.json`` in the run
folder and prints a one-screen summary. ``python -m snvbert.diagnose`` runs a short training
with it and prints the same table.

The checks (README, "When training goes wrong", says what to do about each):

``lr``          optimizer lr vs the configured lr times the configured schedule's factor
``gradients``   per parameter group: no gradient, vanishing gradient, NaN/Inf (loss too)
``fusion``      neighbour attention over a single key, or collapsed (entropy ~ 0) for long
``spread``      logits do not vary across the items of a batch at the same site
``updates``     ||dw|| / ||w|| per group and step: stopped (too small) or unstable (too large)
``frozen_val``  validation metrics identical across epochs while the training loss moves
``loss_scale``  training and validation loss on different scales for the same (final) task
``retrieval``   a query retrieved itself or its own person; neighbour alleles not site-aligned
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from snvbert.model.schedule import FACTORS, lr_at
from snvbert.utils.io import atomic_path

log = logging.getLogger("snvbert.health")

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"
_SEVERITY = {NA: 0, OK: 1, WARN: 2, FAIL: 3}

# Check name -> (what it watches, shown in the table). Order is the table's order.
CHECKS: dict[str, str] = {
    "lr": "optimizer lr = configured schedule",
    "gradients": "every part gets a finite gradient",
    "fusion": "neighbour attention not degenerate",
    "spread": "predictions vary across inputs",
    "updates": "update/weight ratio per step",
    "frozen_val": "validation changes across epochs",
    "loss_scale": "train/val loss on one scale",
    "retrieval": "no self-retrieval, sites aligned",
}

# What to do, per problem. Warnings and the summary quote these.
HINTS: dict[str, str] = {
    "lr": "something sets the lr besides the config: look for a literal lr in "
    "configure_optimizers or an optimizer/scheduler wrapper; the optimizer must get `lr` "
    "times the schedule's factor (snvbert.model.schedule.lr_at)",
    "lr_unknown": "the scheduler is not one of snvbert.model.schedule's; the lr cannot be "
    "recomputed independently",
    "grad_none": "this part gets no gradient at all: a .detach(), a no_grad block, an "
    "integer buffer or an output the loss never uses cuts it off",
    "grad_vanishing": "the gradient is vanishingly small against the weights: check the "
    "residual/normalisation path to this part and the initialisation",
    "nonfinite": "NaN/Inf: lower lr or lengthen warmup, keep trainer.gradient_clip_val, look "
    "for log(0) or division by zero in the loss, try trainer.precision=32-true",
    "fusion_single": "softmax over one key is always 1.0 and learns nothing (the second "
    "seed): retrieve many neighbours (data.retrieval.k in the hundreds)",
    "fusion_collapsed": "the attention puts all weight on one neighbour everywhere: lower lr, "
    "check the neighbour features' scale and the fusion's initialisation",
    "spread": "the model predicts the same whatever the input: the head or the last layers "
    "ignore their input (constant head, dead activations, inputs not reaching the model)",
    "updates_stopped": "the weights are not moving: lr zero or far too small, gradients "
    "clipped to nothing, or parameters missing from the optimizer",
    "updates_unstable": "each step changes the weights by more than 10 %: lower lr, "
    "lengthen warmup, keep gradient clipping",
    "frozen_val": "with fixed validation masks, identical metrics mean the model stopped "
    "changing what it predicts (the first seed): check the lr, the optimizer's parameters and "
    "the update ratios",
    "loss_scale": "one side is not normalised per masked site (the seed summed over the "
    "batch on one side): both losses must be means over masked sites",
    "retrieval_self": "leakage: a query retrieved its own haplotype or its own person; "
    "exclude the query's person from the retrieval panel",
    "retrieval_align": "neighbour alleles do not match the panel at the query's sites: a "
    "window offset or site join is off (the seed's misalignment class)",
}

# Why a check may not have been measured, and how to get it measured.
NA_HINTS: dict[str, str] = {
    "lr": "no lr in hparams, or a scheduler outside snvbert.model.schedule",
    "gradients": "no optimizer step was checked: train for at least one step",
    "fusion": "no neighbours in the batches (no nbr_* keys) or a net without fusion weights",
    "spread": "no batch with at least two items was checked",
    "updates": "no optimizer step completed after a check",
    "frozen_val": "needs validation after two training epochs: raise trainer.max_steps or "
    "lower trainer.limit_train_batches",
    "loss_scale": "needs a validated epoch trained at the final curriculum level: run longer "
    "(trainer.max_steps) or shorten the curriculum",
    "retrieval": "no batch carried nbr_hap, hap and person",
}


@dataclass
class CheckResult:
    """One check's verdict: status, the figure that shows it, what to do."""

    name: str
    title: str
    status: str = NA
    figure: str = ""
    hint: str = ""
    step: int | None = None  # first step the problem was seen
    events: int = 0  # how many times it was seen (warned once)

    def raise_to(self, status: str, figure: str, hint: str, step: int | None) -> None:
        """Keep the worst status; the figure and hint of the worst (first at that level) stay."""
        if status in (WARN, FAIL):
            self.events += 1
        if _SEVERITY[status] > _SEVERITY[self.status]:
            self.status, self.figure, self.hint = status, figure, hint
            if status in (WARN, FAIL):
                self.step = step
        elif status == self.status == OK:
            self.figure = figure


@dataclass
class _Snapshot:
    """Weights before an optimizer step, to measure the step's update."""

    step: int
    weights: dict[str, list[Tensor]] = field(default_factory=dict)


def _norm(tensors: list[Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([t.detach().float().norm() for t in tensors]))
    )


def expected_lr(pl_module: L.LightningModule, trainer: L.Trainer, step: int) -> float | None:
    """The lr the configuration asks for at optimizer step ``step``; None when unknowable.

    Recomputed from ``hparams.lr`` and the module's scheduler *partial* (its function name and
    keyword arguments, with ``total_steps`` from the trainer as the module passes it) through
    :func:`snvbert.model.schedule.lr_at`, never read back from the optimizer or the scheduler
    object: the seed's bug lived exactly there, in a wrapper that ignored the configured lr.
    """
    lr = getattr(pl_module.hparams, "lr", None)
    if lr is None:
        return None
    factory = getattr(pl_module, "scheduler_factory", None)
    if factory is None:
        return float(lr)  # no schedule: the configured lr throughout
    if isinstance(factory, functools.partial) and factory.func.__name__ in FACTORS:
        name = factory.func.__name__
        kwargs = {
            k: p.default
            for k, p in inspect.signature(factory.func).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        kwargs.update(factory.keywords)
        kwargs["total_steps"] = int(trainer.estimated_stepping_batches)
        names = ("warmup_steps", "total_steps", "warmup_start_factor", "min_factor")
        return lr_at(name, step, float(lr), **{k: kwargs[k] for k in names if k in kwargs})
    return None


def parameter_groups(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Named parts of the net whose gradients and updates are judged separately.

    ``SNVBertNet.param_groups`` (embedding, block.i, fusion, head), with the fusion split by
    depth when there are several, so a detached fusion at one depth is not hidden by the other.
    Any other module: its top-level children.
    """
    if hasattr(net, "param_groups"):
        groups = dict(net.param_groups())
        fusion = getattr(net, "fusion", None)
        if isinstance(fusion, nn.ModuleDict) and len(fusion) > 1 and "fusion" in groups:
            del groups["fusion"]
            groups.update({f"fusion.{d}": list(m.parameters()) for d, m in fusion.items()})
    else:
        groups = {name: list(m.parameters()) for name, m in net.named_children()}
    return {name: ps for name, ps in groups.items() if ps}


class TrainingHealth(L.Callback):
    """Watches a training run for the seeds' pathologies; warns once per problem.

    Args:
        every_n_steps: check every this many optimizer steps (step 0 is always checked).
            Each check costs one extra no-grad forward of the current batch and one copy of
            the weights, so 50 keeps the overhead around 1-2 %.
        lr_rtol: relative tolerance between the optimizer's lr and the configured one.
        grad_ratio_min: below this ||grad|| / ||w||, a group's gradient is vanishing.
        update_ratio_min, update_ratio_max: ||dw|| / ||w|| per step outside these bounds means
            the group stopped moving, or moves unstably.
        entropy_min, entropy_patience: mean normalised fusion entropy below ``entropy_min`` on
            this many consecutive checks is a collapsed attention.
        spread_min: mean over sites of the std of logits across a batch's items below this
            means the predictions do not depend on the input.
        frozen_atol: validation metrics closer than this across epochs count as identical.
        loss_ratio_max: train/val loss ratio above this, or below its inverse, at the final
            curriculum level means the two are on different scales.
        align_samples: (row, neighbour) pairs whose alleles are compared with the panel over
            the whole window, per check.
        write_json, print_summary: what to do at the end of fit.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        lr_rtol: float = 1e-6,
        grad_ratio_min: float = 1e-8,
        update_ratio_min: float = 1e-7,
        update_ratio_max: float = 1e-1,
        entropy_min: float = 0.02,
        entropy_patience: int = 3,
        spread_min: float = 1e-3,
        frozen_atol: float = 1e-6,
        loss_ratio_max: float = 10.0,
        align_samples: int = 4,
        write_json: bool = True,
        print_summary: bool = True,
    ) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self.lr_rtol = float(lr_rtol)
        self.grad_ratio_min = float(grad_ratio_min)
        self.update_ratio_min, self.update_ratio_max = (
            float(update_ratio_min),
            float(update_ratio_max),
        )
        self.entropy_min, self.entropy_patience = float(entropy_min), max(1, int(entropy_patience))
        self.spread_min = float(spread_min)
        self.frozen_atol = float(frozen_atol)
        self.loss_ratio_max = float(loss_ratio_max)
        self.align_samples = int(align_samples)
        self.write_json, self.print_summary = bool(write_json), bool(print_summary)
        self.results: dict[str, CheckResult] = {}
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
        self._step_offset = 0  # global step at fit start (a resumed run checks its first step)
        self._snapshot: _Snapshot | None = None
        self._grad_ratios: dict[str, float] = {}
        self._low_entropy_run = 0
        self._nonfinite_loss: Tensor | None = None  # device counter: no host sync per step
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._epoch_final: bool | None = None
        self._val_ran = False
        self._prev_val: dict[str, Any] | None = None
        self._rng = np.random.default_rng(0x4EA1)
        self.val_fingerprint: str | None = None
        self.json_path: Path | None = None
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"warned": sorted(map(list, self.warned))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = {tuple(x) for x in state_dict.get("warned", [])}

    # -- reporting ---------------------------------------------------------------------------
    def _report(
        self,
        check: str,
        status: str,
        figure: str,
        hint_key: str,
        step: int | None,
        subject: str = "",
        what: str = "",
    ) -> None:
        """Record a verdict; log a warning the first time a (check, subject) goes wrong."""
        hint = HINTS.get(hint_key, "")
        self.results[check].raise_to(status, figure, hint if status in (WARN, FAIL) else "", step)
        if status not in (WARN, FAIL):
            return
        key = (check, subject)
        if key in self.warned:
            return
        self.warned.add(key)
        where = f" at step {step}" if step is not None else ""
        msg = f"training health [{check}] {what or CHECKS[check]}{where}: {figure}. {hint}"
        self.events.append(
            {
                "check": check,
                "status": status,
                "subject": subject,
                "step": step,
                "figure": figure,
                "message": msg,
            }
        )
        log.warning(msg)

    def _ok(self, check: str, figure: str) -> None:
        self.results[check].raise_to(OK, figure, "", None)

    @property
    def status(self) -> str:
        """Worst status over all checks."""
        return max((r.status for r in self.results.values()), key=_SEVERITY.__getitem__)

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "checks": {name: asdict(r) for name, r in self.results.items()},
            "events": self.events,
            "val_fingerprint": self.val_fingerprint,
            "history": self.history,
            "thresholds": {
                "every_n_steps": self.every_n_steps,
                "lr_rtol": self.lr_rtol,
                "grad_ratio_min": self.grad_ratio_min,
                "update_ratio_min": self.update_ratio_min,
                "update_ratio_max": self.update_ratio_max,
                "entropy_min": self.entropy_min,
                "entropy_patience": self.entropy_patience,
                "spread_min": self.spread_min,
                "frozen_atol": self.frozen_atol,
                "loss_ratio_max": self.loss_ratio_max,
            },
        }

    def table(self) -> str:
        return format_table(self.results.values())

    # -- fit start / end ---------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        warned = self.warned
        self.reset()
        self.warned = warned  # restored from a checkpoint on resume: do not repeat warnings
        self._step_offset = trainer.global_step

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
        if self._nonfinite_loss is not None and int(self._nonfinite_loss) > 0:
            self._report(
                "gradients",
                FAIL,
                f"{int(self._nonfinite_loss)} non-finite training loss value(s)",
                "nonfinite",
                step,
                "loss",
                "the training loss is NaN/Inf",
            )
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

    # -- the checks --------------------------------------------------------------------------
    def _check_lr(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: int,
    ) -> None:
        expected = expected_lr(pl_module, trainer, step)
        if expected is None:
            self.results["lr"].raise_to(NA, "", HINTS["lr_unknown"], None)
            return
        worst, actual_at_worst = 0.0, expected
        for group in optimizer.param_groups:
            actual = float(group["lr"])
            err = abs(actual - expected) / max(abs(expected), 1e-30)
            if actual == expected:
                err = 0.0
            if err >= worst:
                worst, actual_at_worst = err, actual
        figure = (
            f"optimizer {actual_at_worst:.4g} vs configured {expected:.4g} (rel. err {worst:.1e})"
        )
        if worst > self.lr_rtol:
            self._report(
                "lr",
                FAIL,
                figure,
                "lr",
                step,
                what="optimizer lr differs from the configured schedule",
            )
        else:
            self._ok("lr", f"rel. err {worst:.0e} (step {step}: {expected:.3g})")

    def _report_parts(
        self,
        check: str,
        status: str,
        hint_key: str,
        step: int,
        kind: str,
        what: str,
        offenders: dict[str, float],
        label: str,
    ) -> None:
        """One warning for all parts with the same problem at one step (not one per block)."""
        if not offenders:
            return
        names = sorted(offenders, key=offenders.__getitem__)
        shown = ", ".join(f"{n} {offenders[n]:.1e}" for n in names[:4])
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        self._report(
            check,
            status,
            f"{label}: {shown}{more}",
            hint_key,
            step,
            f"{kind}:{','.join(sorted(names))}",
            f"{what} in {', '.join(sorted(names))}",
        )

    def _check_gradients(self, pl_module: L.LightningModule, step: int) -> None:
        self._grad_ratios = {}
        nonfinite: dict[str, float] = {}
        missing: dict[str, float] = {}
        vanishing: dict[str, float] = {}
        for name, params in parameter_groups(self._net(pl_module)).items():
            trainable = [p for p in params if p.requires_grad]
            if not trainable:
                continue  # frozen on purpose: not this check's business
            grads = [p.grad for p in trainable if p.grad is not None]
            gnorm = _norm(grads)
            ratio = gnorm / max(_norm(trainable), 1e-30)
            self._grad_ratios[name] = ratio
            if not math.isfinite(gnorm):
                nonfinite[name] = gnorm
            elif not grads or gnorm == 0.0:
                missing[name] = 0.0
            elif ratio < self.grad_ratio_min:
                vanishing[name] = ratio
        self.history["grad_ratio"].append([step, dict(self._grad_ratios)])
        self._report_parts(
            "gradients",
            FAIL,
            "nonfinite",
            step,
            "nonfinite",
            "non-finite gradient",
            nonfinite,
            "||grad||",
        )
        self._report_parts(
            "gradients", FAIL, "grad_none", step, "none", "no gradient", missing, "||grad|| = 0"
        )
        self._report_parts(
            "gradients",
            WARN,
            "grad_vanishing",
            step,
            "vanishing",
            "vanishing gradient",
            vanishing,
            f"||grad||/||w|| < {self.grad_ratio_min:.0e}",
        )
        finite = {n: r for n, r in self._grad_ratios.items() if math.isfinite(r)}
        if finite:
            lo = min(finite, key=finite.__getitem__)
            self._ok("gradients", f"min ||grad||/||w|| {finite[lo]:.1e} ({lo})")

    def _check_updates(
        self, trainer: L.Trainer, pl_module: L.LightningModule, snap: _Snapshot
    ) -> dict[str, float]:
        step = snap.step
        groups = parameter_groups(self._net(pl_module))
        lr = getattr(pl_module.hparams, "lr", None)
        expected = expected_lr(pl_module, trainer, step)
        # Near the end of a schedule that decays to ~0 tiny updates are by design, not a stall.
        decayed = bool(lr and expected is not None and expected < 1e-3 * float(lr))
        ratios: dict[str, float] = {}
        for name, before in snap.weights.items():
            after = groups.get(name)
            if after is None or not any(p.requires_grad for p in after):
                continue
            delta = _norm([a.detach() - b for a, b in zip(after, before, strict=True)])
            ratios[name] = delta / max(_norm(before), 1e-30)
        if not ratios:
            return {}
        self.history["update_ratio"].append([step, dict(ratios)])
        nonfinite = {n: r for n, r in ratios.items() if not math.isfinite(r)}
        stopped = {n: r for n, r in ratios.items() if r < self.update_ratio_min and not decayed}
        unstable = {
            n: r for n, r in ratios.items() if math.isfinite(r) and r > self.update_ratio_max
        }
        self._report_parts(
            "updates",
            FAIL,
            "nonfinite",
            step,
            "nonfinite",
            "non-finite update",
            nonfinite,
            "||dw||/||w||",
        )
        self._report_parts(
            "updates",
            FAIL,
            "updates_stopped",
            step,
            "stopped",
            "no movement",
            stopped,
            f"||dw||/||w|| < {self.update_ratio_min:.0e}",
        )
        self._report_parts(
            "updates",
            WARN,
            "updates_unstable",
            step,
            "unstable",
            "unstable updates",
            unstable,
            f"||dw||/||w|| > {self.update_ratio_max:.0e}",
        )
        finite = {n: r for n, r in ratios.items() if math.isfinite(r)}
        if finite:
            lo, hi = min(finite, key=finite.__getitem__), max(finite, key=finite.__getitem__)
            self._ok("updates", f"{finite[lo]:.1e} ({lo}) .. {finite[hi]:.1e} ({hi})")
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
        valid = batch.get("nbr_valid")
        weights = out.get("fusion_weights")  # (B, H, L, K)
        entropy = out.get("fusion_entropy")
        if valid is None or weights is None or entropy is None:
            return {}
        ent = float(entropy)
        n_valid = valid.sum(1)
        keep = (
            ~pad
            if pad is not None
            else torch.ones(
                weights.shape[0], weights.shape[2], dtype=torch.bool, device=weights.device
            )
        )
        wmax = weights.amax(-1).permute(0, 2, 1)[keep]  # (sites x heads) max weight per query
        all_one = bool((wmax >= 1 - 1e-6).all()) if wmax.numel() else False
        self.history["fusion_entropy"].append([step, ent])
        k_max = int(n_valid.max()) if n_valid.numel() else 0
        figure = f"entropy/log K {ent:.3f}, K = {k_max}, max weight {float(wmax.mean()):.3f} (mean)"
        if k_max <= 1:
            self._report(
                "fusion",
                FAIL,
                f"{k_max} valid neighbour per query: weights are all 1.0",
                "fusion_single",
                step,
                "single",
                "the fusion attends over a single key",
            )
            return {"health/fusion_entropy": ent}
        if all_one or ent < self.entropy_min:
            self._low_entropy_run += 1
        else:
            self._low_entropy_run = 0
        if self._low_entropy_run >= self.entropy_patience:
            self._report(
                "fusion",
                WARN,
                f"{figure}, for {self._low_entropy_run} checks",
                "fusion_collapsed",
                step,
                "collapsed",
                "the fusion attention has collapsed",
            )
        else:
            self._ok("fusion", f"entropy/log K {ent:.3f} (K = {k_max})")
        return {"health/fusion_entropy": ent}

    def _check_spread(self, logits: Tensor, pad: Tensor | None, step: int) -> dict[str, float]:
        if logits.dim() != 2 or logits.shape[0] < 2:
            return {}
        x = logits.float()
        cols = (
            ~pad.any(0)
            if pad is not None
            else torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
        )
        if not bool(cols.any()):
            return {}
        spread = float(x[:, cols].std(0).mean())
        self.history["logit_spread"].append([step, spread])
        if not math.isfinite(spread):
            self._report(
                "spread",
                FAIL,
                f"logits {spread}",
                "nonfinite",
                step,
                "nonfinite",
                "the logits are NaN/Inf",
            )
        elif spread < self.spread_min:
            self._report(
                "spread",
                FAIL,
                f"std of logits across items at a site {spread:.1e} < {self.spread_min:.0e}",
                "spread",
                step,
                "constant",
                "the predictions do not vary across inputs",
            )
        else:
            self._ok("spread", f"logit std across items {spread:.2f}")
        return {"health/logit_spread": spread}

    def _check_retrieval(
        self, trainer: L.Trainer, batch: Mapping[str, Any], step: int | None
    ) -> None:
        """Self/own-person retrieval over the whole batch; site alignment on a few entries."""
        nbr = batch.get("nbr_hap")
        if nbr is None or "hap" not in batch or "person" not in batch:
            return
        valid = batch.get("nbr_valid", nbr >= 0)
        hap, person = batch["hap"], batch["person"]
        self_hits = int(((nbr == hap[:, None]) & valid).sum())
        person_hits = int(((nbr // 2 == person[:, None]) & valid).sum())
        n = int(valid.sum())
        if person_hits:
            self._report(
                "retrieval",
                FAIL,
                f"{person_hits} of {n} neighbours are the query's own "
                f"person ({self_hits} the query haplotype itself)",
                "retrieval_self",
                step,
                "self",
                "a query retrieved itself",
            )
        checked, bad = self._check_alignment(trainer, batch, valid)
        if bad:
            self._report(
                "retrieval",
                FAIL,
                f"{bad} of {checked} spot-checked neighbour alleles differ "
                "from the panel at the query's site",
                "retrieval_align",
                step,
                "align",
                "neighbours are not site-aligned with the query",
            )
        if not person_hits and not bad:
            extra = f", {checked} alleles aligned" if checked else ""
            self._ok("retrieval", f"0 self hits in {n} neighbours{extra}")

    def _check_alignment(
        self, trainer: L.Trainer, batch: Mapping[str, Any], valid: Tensor
    ) -> tuple[int, int]:
        """Compare ``align_samples`` random (row, neighbour) pairs with the panel over the window.

        Whole rows, not single entries: a one-site shift only shows where neighbouring sites
        differ, and rare variants make that uncommon. Returns (entries checked, entries wrong).
        """
        dm = getattr(trainer, "datamodule", None)
        haplotypes = getattr(getattr(dm, "panel", None), "haplotypes", None)
        alleles, site, nbr = batch.get("nbr_alleles"), batch.get("site"), batch["nbr_hap"]
        if haplotypes is None or alleles is None or site is None or self.align_samples <= 0:
            return 0, 0
        pairs = torch.nonzero(valid, as_tuple=False).cpu().numpy()  # (n, 2): row b, neighbour k
        if len(pairs) == 0:
            return 0, 0
        pairs = pairs[
            self._rng.choice(len(pairs), min(self.align_samples, len(pairs)), replace=False)
        ]
        b, k = torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1])
        got = alleles[b, k].cpu().numpy()  # (n, L)
        sites = site[b].cpu().numpy()  # (n, L), -1 at PAD
        haps = nbr[b, k].cpu().numpy()
        checked = bad = 0
        for row_alleles, row_sites, h in zip(got, sites, haps, strict=True):
            real = row_sites >= 0
            truth = np.asarray(haplotypes[row_sites[real], int(h)])
            checked += int(real.sum())
            bad += int((row_alleles[real].astype(np.int64) != truth.astype(np.int64)).sum())
        return checked, bad

    # -- validation and epochs ---------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
        dm = getattr(trainer, "datamodule", None)
        try:
            from snvbert.callbacks import MaskEpochs

            self.val_fingerprint = MaskEpochs.val_fingerprint(dm)
        except Exception:  # any datamodule without the chip machinery
            self.val_fingerprint = None

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
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "final_level": self._epoch_final,
            "val_fingerprint": self.val_fingerprint,
            "val": vals,
        }
        self.history["validation"].append(record)
        log.info(
            "health: epoch %d validation chip %s, val/loss %s, train loss %.4g",
            epoch,
            self.val_fingerprint,
            vals.get("val/loss"),
            train_loss,
        )
        figures = self._check_frozen(record, step)
        figures.update(self._check_loss_scale(record, step))
        if figures:
            pl_module.log_dict(figures, on_step=False, on_epoch=True, batch_size=1)
        self._prev_val = record

    def _check_frozen(self, record: dict[str, Any], step: int) -> dict[str, float]:
        prev = self._prev_val
        if prev is None or not record["val"]:
            return {}
        keys = sorted(set(prev["val"]) & set(record["val"]))
        diffs = [_diff(prev["val"][k], record["val"][k]) for k in keys]
        largest = max(diffs) if diffs else math.inf
        dtrain = abs(record["train_loss"] - prev["train_loss"])
        same_chip = prev["val_fingerprint"] == record["val_fingerprint"]
        if largest <= self.frozen_atol:
            chip = (
                f"validation chip {record['val_fingerprint']} unchanged"
                if same_chip
                else "validation chip changed, metrics did not"
            )
            moved = (
                f"while the training loss moved by {dtrain:.2g}"
                if dtrain > self.frozen_atol
                else "and the training loss did not move either"
            )
            figure = (
                f"{len(keys)} val metrics identical to {largest:.0e} between epochs "
                f"{prev['epoch']} and {record['epoch']} {moved}; {chip}"
            )
            self._report(
                "frozen_val",
                FAIL,
                figure,
                "frozen_val",
                step,
                "frozen",
                "validation metrics are identical across epochs",
            )
        else:
            self._ok(
                "frozen_val", f"largest val change {largest:.1e} (chip {record['val_fingerprint']})"
            )
        return {"health/val_change": largest} if math.isfinite(largest) else {}

    def _check_loss_scale(self, record: dict[str, Any], step: int) -> dict[str, float]:
        val_loss = record["val"].get("val/loss")
        if val_loss is None:
            return {}
        if not record["final_level"]:
            res = self.results["loss_scale"]
            if res.status == NA:
                res.figure = "not at the final curriculum level yet"
            return {}
        ratio = record["train_loss"] / val_loss if val_loss > 0 else math.inf
        figure = f"train/val loss {record['train_loss']:.4g} / {val_loss:.4g} = {ratio:.3g}"
        if not (1 / self.loss_ratio_max <= ratio <= self.loss_ratio_max):
            self._report(
                "loss_scale",
                FAIL,
                figure,
                "loss_scale",
                step,
                "scale",
                "training and validation losses are on different scales",
            )
        else:
            self._ok("loss_scale", figure)
        return {"health/train_val_loss_ratio": ratio} if math.isfinite(ratio) else {}


def _diff(a: float, b: float) -> float:
    """|a - b|, with NaN equal to NaN (empty MAF bins stay NaN every epoch)."""
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Tensor):
        return obj.tolist()
    return str(obj)


def format_table(results: Any, width: int = 100) -> str:
    """A plain-text table: check, status, figure, and what to do for anything not ok."""
    rows = list(results)
    name_w = max(len("check"), *(len(r.name) for r in rows))
    lines = [f"{'check':<{name_w}}  status  figure", f"{'-' * name_w}  ------  {'-' * 40}"]
    for r in rows:
        figure = r.figure or ("(not measured in this run)" if r.status == NA else "")
        if r.step is not None and r.status in (WARN, FAIL):
            figure += f" [step {r.step}]"
        wrapped = _wrap(figure, name_w + 10, width) or [""]
        lines.append(f"{r.name:<{name_w}}  {r.status:<6}  {wrapped[0].strip()}")
        lines.extend(wrapped[1:])
        if r.hint and r.status in (WARN, FAIL, NA):
            lines.extend(_wrap(f"-> {r.hint}", name_w + 10, width))
    return "\n".join(lines)


def _wrap(text: str, indent: int, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(
        text, width=width, initial_indent=" " * indent, subsequent_indent=" " * (indent + 3)
    )
