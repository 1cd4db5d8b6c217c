"""Training health: says, in plain words, when training goes wrong.

Both seed runs went wrong silently: a learning rate hard-coded inside the optimizer wrapper,
validation metrics that stood still for five epochs, losses summed on one side and averaged
on the other, and a fusion attention over a single key whose softmax is always 1.0. Every one
of those is visible in a number that costs little to compute. ``python -m snvbert.diagnose``
runs a short training with the callback and prints its table.

The package, in the order data flows through it:

``figures``   the numbers, measured from tensors, the net and the datamodule (torch, numpy)
``checks``    pure functions judging them: figures in, :class:`Verdict` out; the thresholds
              (:class:`HealthThresholds`, where their defaults live)
``report``    one :class:`CheckResult` per check over a run, and :func:`format_table`
``callback``  :class:`TrainingHealth`, the Lightning callback that gathers and reports

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

from snvbert.health.callback import EVERY_N_STEPS, TrainingHealth
from snvbert.health.checks import (
    CHECKS,
    FAIL,
    HINTS,
    NA,
    OK,
    WARN,
    HealthThresholds,
    Verdict,
)
from snvbert.health.figures import expected_lr, parameter_groups
from snvbert.health.report import NA_HINTS, CheckResult, format_table

__all__ = [
    "CHECKS",
    "EVERY_N_STEPS",
    "FAIL",
    "HINTS",
    "NA",
    "NA_HINTS",
    "OK",
    "WARN",
    "CheckResult",
    "HealthThresholds",
    "TrainingHealth",
    "Verdict",
    "expected_lr",
    "format_table",
    "parameter_groups",
]
