"""The training-health checks as pure functions: figures in, verdicts out.

Nothing here knows about Lightning, a trainer, a module or a tensor. Each ``check_*`` takes the
numbers a run produced (grad norms per part, update ratios, fusion entropies, validation
metrics, ...) and the thresholds, and returns a list of :class:`Verdict` (status, the figure
that shows it, what to do). :class:`snvbert.health.TrainingHealth` measures the figures during
training and reports the verdicts; tests plant figures and call the checks directly.

:class:`HealthThresholds` holds the thresholds, and is the one place their defaults live.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

OK, WARN, FAIL, NA = "ok", "warn", "fail", "n/a"

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

# Near the end of a schedule that decays to ~0, tiny updates are by design, not a stall: the
# "stopped" verdict is off once the scheduled lr is below this fraction of the configured one.
DECAYED_LR_FRACTION = 1e-3


@dataclass(frozen=True)
class HealthThresholds:
    """Where a figure turns into a warning or a failure.

    The defaults below are the only ones: ``conf/callbacks/default.yaml`` names every field
    with ``null`` ("the default"), so that ``callbacks.health.lr_rtol=1e-5`` works on the
    command line without ``+`` while the values live here, and ``TrainingHealth()`` in Python
    judges exactly as ``python -m snvbert.train`` does. (The reverse, values in the YAML and
    none in code, would leave the Python API without defaults, or reading a config file.)

    Attributes:
        lr_rtol: relative tolerance between the optimizer's lr and the configured one.
        grad_ratio_min: below this ||grad|| / ||w||, a part's gradient is vanishing.
        update_ratio_min, update_ratio_max: ||dw|| / ||w|| per step outside these bounds means
            the part stopped moving, or moves unstably.
        entropy_min, entropy_patience: mean normalised fusion entropy below ``entropy_min``
            (or all weight on one key) on this many consecutive checks is a collapsed attention.
        spread_min: mean over sites of the std of logits across a batch's items below this
            means the predictions do not depend on the input.
        frozen_atol: validation metrics closer than this across epochs count as identical.
        loss_ratio_max: train/val loss ratio above this, or below its inverse, at the final
            curriculum level means the two are on different scales.
    """

    lr_rtol: float = 1e-6
    grad_ratio_min: float = 1e-8
    update_ratio_min: float = 1e-7
    update_ratio_max: float = 1e-1
    entropy_min: float = 0.02
    entropy_patience: int = 3
    spread_min: float = 1e-3
    frozen_atol: float = 1e-6
    loss_ratio_max: float = 10.0

    def __post_init__(self) -> None:  # values from YAML or a command line arrive as anything
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            value = max(1, int(value)) if f.name == "entropy_patience" else float(value)
            object.__setattr__(self, f.name, value)

    def with_values(self, **values: Any) -> HealthThresholds:
        """A copy with the given fields changed; ``None`` keeps the field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class Verdict:
    """One check's judgement of one set of figures.

    Attributes:
        check: the check's name (a key of :data:`CHECKS`).
        status: ``ok``, ``warn``, ``fail`` or ``n/a``.
        figure: the number(s) that show it, in words.
        hint: what to do (empty when ok).
        subject: what the problem is about; a run warns once per (check, subject).
        what: the warning's headline (default: the check's title).
        value: the figure as one number, where there is one to log.
    """

    check: str
    status: str
    figure: str
    hint: str = ""
    subject: str = ""
    what: str = ""
    value: float | None = None


def _problem(
    check: str, status: str, figure: str, hint_key: str, subject: str = "", what: str = ""
) -> Verdict:
    return Verdict(check, status, figure, HINTS[hint_key], subject, what)


def _parts(
    check: str,
    status: str,
    hint_key: str,
    kind: str,
    what: str,
    offenders: Mapping[str, float],
    label: str,
) -> list[Verdict]:
    """One verdict for all parts with the same problem (not one per block)."""
    if not offenders:
        return []
    names = sorted(offenders, key=offenders.__getitem__)
    shown = ", ".join(f"{n} {offenders[n]:.1e}" for n in names[:4])
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    ordered = sorted(names)
    return [
        _problem(
            check,
            status,
            f"{label}: {shown}{more}",
            hint_key,
            f"{kind}:{','.join(ordered)}",
            f"{what} in {', '.join(ordered)}",
        )
    ]


def norm_ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, with a zero denominator counted as 1e-30."""
    return numerator / max(denominator, 1e-30)


# -- per optimizer step ------------------------------------------------------------------------
def check_lr(
    configured: float | None, actual: Sequence[float], rtol: float, step: int
) -> list[Verdict]:
    """The optimizer's lr per parameter group against the configured schedule's at ``step``.

    ``configured`` is None when it cannot be recomputed (no lr, or an unknown scheduler): n/a.
    """
    if configured is None:
        return [Verdict("lr", NA, "")]
    worst, actual_at_worst = 0.0, configured
    for lr in actual:
        err = 0.0 if lr == configured else abs(lr - configured) / max(abs(configured), 1e-30)
        if err >= worst:
            worst, actual_at_worst = err, lr
    figure = (
        f"optimizer {actual_at_worst:.4g} vs configured {configured:.4g} (rel. err {worst:.1e})"
    )
    if worst > rtol:
        return [
            _problem(
                "lr", FAIL, figure, "lr", what="optimizer lr differs from the configured schedule"
            )
        ]
    return [Verdict("lr", OK, f"rel. err {worst:.0e} (step {step}: {configured:.3g})")]


def check_loss_values(nonfinite: int) -> list[Verdict]:
    """How many training loss values so far were NaN/Inf."""
    if nonfinite <= 0:
        return []
    return [
        _problem(
            "gradients",
            FAIL,
            f"{nonfinite} non-finite training loss value(s)",
            "nonfinite",
            "loss",
            "the training loss is NaN/Inf",
        )
    ]


def check_gradients(ratios: Mapping[str, float], ratio_min: float) -> list[Verdict]:
    """||grad|| / ||w|| per part (see :func:`norm_ratio`): 0 is no gradient at all (none
    reached the part, or all of it is zero), NaN/Inf a non-finite gradient."""
    nonfinite = {n: r for n, r in ratios.items() if not math.isfinite(r)}
    missing = {n: 0.0 for n, r in ratios.items() if r == 0.0}
    vanishing = {n: r for n, r in ratios.items() if 0.0 < r < ratio_min}
    out = [
        *_parts(
            "gradients",
            FAIL,
            "nonfinite",
            "nonfinite",
            "non-finite gradient",
            nonfinite,
            "||grad||",
        ),
        *_parts("gradients", FAIL, "grad_none", "none", "no gradient", missing, "||grad|| = 0"),
        *_parts(
            "gradients",
            WARN,
            "grad_vanishing",
            "vanishing",
            "vanishing gradient",
            vanishing,
            f"||grad||/||w|| < {ratio_min:.0e}",
        ),
    ]
    finite = {n: r for n, r in ratios.items() if math.isfinite(r)}
    if finite:
        lo = min(finite, key=finite.__getitem__)
        out.append(Verdict("gradients", OK, f"min ||grad||/||w|| {finite[lo]:.1e} ({lo})"))
    return out


def check_updates(
    ratios: Mapping[str, float],
    ratio_min: float,
    ratio_max: float,
    *,
    configured_lr: float | None = None,
    scheduled_lr: float | None = None,
) -> list[Verdict]:
    """||dw|| / ||w|| of one optimizer step per part.

    With ``configured_lr`` and the ``scheduled_lr`` of that step, a schedule decayed below
    :data:`DECAYED_LR_FRACTION` of the configured lr excuses tiny updates.
    """
    if not ratios:
        return []
    decayed = bool(
        configured_lr
        and scheduled_lr is not None
        and scheduled_lr < DECAYED_LR_FRACTION * configured_lr
    )
    nonfinite = {n: r for n, r in ratios.items() if not math.isfinite(r)}
    stopped = {n: r for n, r in ratios.items() if r < ratio_min and not decayed}
    unstable = {n: r for n, r in ratios.items() if math.isfinite(r) and r > ratio_max}
    out = [
        *_parts(
            "updates",
            FAIL,
            "nonfinite",
            "nonfinite",
            "non-finite update",
            nonfinite,
            "||dw||/||w||",
        ),
        *_parts(
            "updates",
            FAIL,
            "updates_stopped",
            "stopped",
            "no movement",
            stopped,
            f"||dw||/||w|| < {ratio_min:.0e}",
        ),
        *_parts(
            "updates",
            WARN,
            "updates_unstable",
            "unstable",
            "unstable updates",
            unstable,
            f"||dw||/||w|| > {ratio_max:.0e}",
        ),
    ]
    finite = {n: r for n, r in ratios.items() if math.isfinite(r)}
    if finite:
        lo, hi = min(finite, key=finite.__getitem__), max(finite, key=finite.__getitem__)
        out.append(Verdict("updates", OK, f"{finite[lo]:.1e} ({lo}) .. {finite[hi]:.1e} ({hi})"))
    return out


class FusionFigures(NamedTuple):
    """The neighbour attention of one checked batch."""

    entropy: float  # mean entropy / log K
    k_max: int  # most valid neighbours of any query
    max_weight: float  # mean over (site, head) of the largest weight
    all_one: bool  # every (site, head) puts weight 1.0 on one key


def check_fusion_entropy(
    history: Sequence[FusionFigures], entropy_min: float, patience: int
) -> list[Verdict]:
    """The last checked batch's fusion attention, with the checks before it for patience.

    A single key is a failure at once. A low entropy (or all weight on one key) is a collapse
    only after ``patience`` checks in a row; checks with a single key neither count nor reset.
    """
    if not history:
        return []
    last = history[-1]
    if last.k_max <= 1:
        return [
            _problem(
                "fusion",
                FAIL,
                f"{last.k_max} valid neighbour per query: weights are all 1.0",
                "fusion_single",
                "single",
                "the fusion attends over a single key",
            )
        ]
    run = 0
    for f in reversed(history):
        if f.k_max <= 1:
            continue
        if not (f.all_one or f.entropy < entropy_min):
            break
        run += 1
    if run >= patience:
        figure = (
            f"entropy/log K {last.entropy:.3f}, K = {last.k_max}, "
            f"max weight {last.max_weight:.3f} (mean)"
        )
        return [
            _problem(
                "fusion",
                WARN,
                f"{figure}, for {run} checks",
                "fusion_collapsed",
                "collapsed",
                "the fusion attention has collapsed",
            )
        ]
    return [Verdict("fusion", OK, f"entropy/log K {last.entropy:.3f} (K = {last.k_max})")]


def check_spread(spread: float, spread_min: float) -> list[Verdict]:
    """Mean over sites of the std of the logits across a batch's items."""
    if not math.isfinite(spread):
        return [
            _problem(
                "spread",
                FAIL,
                f"logits {spread}",
                "nonfinite",
                "nonfinite",
                "the logits are NaN/Inf",
            )
        ]
    if spread < spread_min:
        return [
            _problem(
                "spread",
                FAIL,
                f"std of logits across items at a site {spread:.1e} < {spread_min:.0e}",
                "spread",
                "constant",
                "the predictions do not vary across inputs",
            )
        ]
    return [Verdict("spread", OK, f"logit std across items {spread:.2f}")]


def check_alignment(checked: int, bad: int) -> list[Verdict]:
    """Neighbour alleles compared with the panel at the query's sites: ``bad`` of ``checked``
    differ. Nothing checked: n/a."""
    if bad:
        return [
            _problem(
                "retrieval",
                FAIL,
                f"{bad} of {checked} spot-checked neighbour alleles differ "
                "from the panel at the query's site",
                "retrieval_align",
                "align",
                "neighbours are not site-aligned with the query",
            )
        ]
    if not checked:
        return [Verdict("retrieval", NA, "")]
    return [Verdict("retrieval", OK, f"{checked} alleles aligned")]


def check_retrieval(
    neighbours: int, self_hits: int, person_hits: int, checked: int = 0, bad: int = 0
) -> list[Verdict]:
    """Of ``neighbours`` retrieved, ``person_hits`` are the query's own person (``self_hits``
    its own haplotype); ``checked`` / ``bad`` are :func:`check_alignment`'s figures."""
    out = []
    if person_hits:
        out.append(
            _problem(
                "retrieval",
                FAIL,
                f"{person_hits} of {neighbours} neighbours are the query's own "
                f"person ({self_hits} the query haplotype itself)",
                "retrieval_self",
                "self",
                "a query retrieved itself",
            )
        )
    out.extend(v for v in check_alignment(checked, bad) if v.status == FAIL)
    if not out:
        extra = f", {checked} alleles aligned" if checked else ""
        out.append(Verdict("retrieval", OK, f"0 self hits in {neighbours} neighbours{extra}"))
    return out


# -- per validated epoch -----------------------------------------------------------------------
class ValidationRecord(TypedDict):
    """One validated training epoch, as ``health.json`` keeps it."""

    epoch: int
    step: int
    train_loss: float  # mean over the epoch's training batches
    final_level: bool | None  # trained at the curriculum's final level
    val_fingerprint: str | None  # of the validation chip
    val: dict[str, float]  # val/... metrics


def metric_change(a: float, b: float) -> float:
    """|a - b|, with NaN equal to NaN (empty MAF bins stay NaN every epoch)."""
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    return abs(a - b)


def check_frozen(history: Sequence[ValidationRecord], atol: float) -> list[Verdict]:
    """The last validation against the one before: identical metrics are a frozen model.

    The verdict's ``value`` is the largest change of any metric both have.
    """
    if len(history) < 2 or not history[-1]["val"]:
        return []
    prev, record = history[-2], history[-1]
    keys = sorted(set(prev["val"]) & set(record["val"]))
    diffs = [metric_change(prev["val"][k], record["val"][k]) for k in keys]
    largest = max(diffs) if diffs else math.inf
    dtrain = abs(record["train_loss"] - prev["train_loss"])
    if largest <= atol:
        chip = (
            f"validation chip {record['val_fingerprint']} unchanged"
            if prev["val_fingerprint"] == record["val_fingerprint"]
            else "validation chip changed, metrics did not"
        )
        moved = (
            f"while the training loss moved by {dtrain:.2g}"
            if dtrain > atol
            else "and the training loss did not move either"
        )
        figure = (
            f"{len(keys)} val metrics identical to {largest:.0e} between epochs "
            f"{prev['epoch']} and {record['epoch']} {moved}; {chip}"
        )
        verdict = _problem(
            "frozen_val",
            FAIL,
            figure,
            "frozen_val",
            "frozen",
            "validation metrics are identical across epochs",
        )
    else:
        verdict = Verdict(
            "frozen_val",
            OK,
            f"largest val change {largest:.1e} (chip {record['val_fingerprint']})",
        )
    return [dataclasses.replace(verdict, value=largest)]


def check_loss_scale(
    train_loss: float, val_loss: float | None, ratio_max: float, final_level: bool | None = True
) -> list[Verdict]:
    """Mean training loss of an epoch against the validation loss; judged only for an epoch at
    the final curriculum level (the task validation measures). ``value``: the ratio."""
    if val_loss is None:
        return []
    if not final_level:
        return [Verdict("loss_scale", NA, "not at the final curriculum level yet")]
    ratio = train_loss / val_loss if val_loss > 0 else math.inf
    figure = f"train/val loss {train_loss:.4g} / {val_loss:.4g} = {ratio:.3g}"
    if not (1 / ratio_max <= ratio <= ratio_max):
        verdict = _problem(
            "loss_scale",
            FAIL,
            figure,
            "loss_scale",
            "scale",
            "training and validation losses are on different scales",
        )
    else:
        verdict = Verdict("loss_scale", OK, figure)
    return [dataclasses.replace(verdict, value=ratio)]
