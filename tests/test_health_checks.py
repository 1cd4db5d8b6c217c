"""The training-health checks on planted figures: no training run, no trainer, no tensors.

Each check of :mod:`snvbert.health.checks` gets the numbers a faulty (or healthy) run would
produce and must return the verdict, figure and hint the callback reports. The report's
bookkeeping (:mod:`snvbert.health.report`) is tested the same way.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from snvbert.health.checks import (
    CHECKS,
    FAIL,
    HINTS,
    NA,
    OK,
    WARN,
    FusionFigures,
    HealthThresholds,
    ValidationRecord,
    check_alignment,
    check_frozen,
    check_fusion_entropy,
    check_gradients,
    check_loss_scale,
    check_loss_values,
    check_lr,
    check_retrieval,
    check_spread,
    check_updates,
    metric_change,
    norm_ratio,
)
from snvbert.health.report import NA_HINTS, CheckResult, format_table, worst

T = HealthThresholds()


def statuses(verdicts) -> list[tuple[str, str]]:
    return [(v.status, v.subject) for v in verdicts]


# -- thresholds --------------------------------------------------------------------------------
def test_thresholds_coerce_and_override() -> None:
    t = HealthThresholds(lr_rtol="1e-5", entropy_patience=0)  # as a command line may pass them
    assert t.lr_rtol == 1e-5 and t.entropy_patience == 1
    assert T.with_values(lr_rtol=None, spread_min=0.5) == dataclasses.replace(T, spread_min=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        T.lr_rtol = 1.0  # type: ignore[misc]


# -- lr ----------------------------------------------------------------------------------------
def test_lr_matches_the_schedule() -> None:
    (v,) = check_lr(1e-4, [1e-4, 1e-4 * (1 + 1e-8)], T.lr_rtol, step=7)
    assert v.status == OK and v.figure == "rel. err 1e-08 (step 7: 0.0001)"


def test_lr_hard_coded_in_one_group_fails() -> None:
    (v,) = check_lr(1e-4, [1e-4, 1.5e-4], T.lr_rtol, step=0)
    assert v.status == FAIL and v.hint == HINTS["lr"]
    assert v.figure == "optimizer 0.00015 vs configured 0.0001 (rel. err 5.0e-01)"
    assert v.what == "optimizer lr differs from the configured schedule"


def test_lr_not_recomputable_is_not_measured() -> None:
    assert statuses(check_lr(None, [1e-4], T.lr_rtol, step=0)) == [(NA, "")]


# -- gradients and the loss --------------------------------------------------------------------
def test_gradients_one_verdict_per_kind_of_problem() -> None:
    ratios = {
        "embedding": 2e-3,
        "block.0": norm_ratio(0.0, 3.0),  # no gradient reached it
        "block.1": norm_ratio(1e-12, 1.0),
        "fusion.0": math.nan,
        "head": 5e-2,
    }
    verdicts = check_gradients(ratios, T.grad_ratio_min)
    assert statuses(verdicts) == [
        (FAIL, "nonfinite:fusion.0"),
        (FAIL, "none:block.0"),
        (WARN, "vanishing:block.1"),
        ("ok", ""),
    ]
    nonfinite, none, vanishing, ok = verdicts
    assert nonfinite.figure == "||grad||: fusion.0 nan" and nonfinite.hint == HINTS["nonfinite"]
    assert none.figure == "||grad|| = 0: block.0 0.0e+00" and none.what == "no gradient in block.0"
    assert vanishing.figure == "||grad||/||w|| < 1e-08: block.1 1.0e-12"
    assert vanishing.hint == HINTS["grad_vanishing"]
    assert ok.figure == "min ||grad||/||w|| 0.0e+00 (block.0)"


def test_gradients_of_many_parts_name_four_and_count_the_rest() -> None:
    ratios = {f"block.{i}": 0.0 for i in range(6)}
    (none, _) = check_gradients(ratios, T.grad_ratio_min)
    assert none.figure.endswith("and 2 more") and none.subject == "none:" + ",".join(ratios)


def test_gradients_healthy() -> None:
    assert statuses(check_gradients({"a": 1e-3, "b": 1e-5}, T.grad_ratio_min)) == [(OK, "")]
    assert check_gradients({}, T.grad_ratio_min) == []


def test_nonfinite_loss_values() -> None:
    assert check_loss_values(0) == []
    (v,) = check_loss_values(2)
    assert (v.check, v.status, v.subject) == ("gradients", FAIL, "loss")
    assert v.figure == "2 non-finite training loss value(s)"


# -- updates -----------------------------------------------------------------------------------
def test_updates_stopped_and_unstable() -> None:
    ratios = {"embedding": 1e-9, "head": 0.5, "block.0": 1e-4}
    verdicts = check_updates(ratios, T.update_ratio_min, T.update_ratio_max)
    assert statuses(verdicts) == [(FAIL, "stopped:embedding"), (WARN, "unstable:head"), (OK, "")]
    assert verdicts[0].figure == "||dw||/||w|| < 1e-07: embedding 1.0e-09"
    assert verdicts[1].figure == "||dw||/||w|| > 1e-01: head 5.0e-01"
    assert verdicts[2].figure == "1.0e-09 (embedding) .. 5.0e-01 (head)"


def test_updates_tiny_at_the_end_of_a_decayed_schedule_are_by_design() -> None:
    ratios = {"embedding": 1e-9}
    stopped = check_updates(ratios, T.update_ratio_min, T.update_ratio_max)
    assert stopped[0].status == FAIL
    decayed = check_updates(
        ratios, T.update_ratio_min, T.update_ratio_max, configured_lr=1e-4, scheduled_lr=1e-8
    )
    assert statuses(decayed) == [(OK, "")]
    nan = check_updates({"head": math.nan}, T.update_ratio_min, T.update_ratio_max)
    assert statuses(nan) == [(FAIL, "nonfinite:head")]
    assert check_updates({}, T.update_ratio_min, T.update_ratio_max) == []


# -- fusion ------------------------------------------------------------------------------------
HEALTHY = FusionFigures(entropy=0.7, k_max=32, max_weight=0.2, all_one=False)
LOW = FusionFigures(entropy=0.0, k_max=32, max_weight=1.0, all_one=True)
SINGLE = FusionFigures(entropy=0.0, k_max=1, max_weight=1.0, all_one=True)


def fusion(history: list[FusionFigures]) -> list[tuple[str, str]]:
    return statuses(check_fusion_entropy(history, T.entropy_min, T.entropy_patience))


def test_fusion_over_a_single_key_fails_at_once() -> None:
    (v,) = check_fusion_entropy([SINGLE], T.entropy_min, T.entropy_patience)
    assert v.status == FAIL and v.figure == "1 valid neighbour per query: weights are all 1.0"
    assert v.hint == HINTS["fusion_single"]


def test_fusion_collapse_needs_patience() -> None:
    assert fusion([HEALTHY]) == [(OK, "")]
    assert fusion([LOW, LOW]) == [(OK, "")]
    assert fusion([LOW, LOW, LOW]) == [(WARN, "collapsed")]
    assert fusion([LOW, LOW, HEALTHY]) == [(OK, "")]  # a healthy check resets the count
    assert fusion([LOW, HEALTHY, LOW, LOW]) == [(OK, "")]
    # A single-key check in between neither counts nor resets.
    assert fusion([LOW, LOW, SINGLE, LOW]) == [(WARN, "collapsed")]
    # Entropy just below the threshold counts, all weight on one key counts whatever the entropy.
    near = FusionFigures(entropy=0.019, k_max=8, max_weight=0.9, all_one=False)
    peaked = FusionFigures(entropy=0.5, k_max=8, max_weight=1.0, all_one=True)
    assert fusion([near, peaked, near]) == [(WARN, "collapsed")]
    (v,) = check_fusion_entropy([LOW] * 4, T.entropy_min, T.entropy_patience)
    assert v.figure == "entropy/log K 0.000, K = 32, max weight 1.000 (mean), for 4 checks"
    assert check_fusion_entropy([HEALTHY], T.entropy_min, 3)[0].figure == (
        "entropy/log K 0.700 (K = 32)"
    )
    assert check_fusion_entropy([], T.entropy_min, 3) == []


# -- spread ------------------------------------------------------------------------------------
def test_spread() -> None:
    (ok,) = check_spread(0.8, T.spread_min)
    assert ok.status == OK and ok.figure == "logit std across items 0.80"
    (const,) = check_spread(0.0, T.spread_min)
    assert const.status == FAIL and const.subject == "constant" and "0.0e+00" in const.figure
    assert const.hint == HINTS["spread"]
    (nan,) = check_spread(math.nan, T.spread_min)
    assert nan.status == FAIL and nan.subject == "nonfinite" and nan.figure == "logits nan"


# -- retrieval ---------------------------------------------------------------------------------
def test_retrieval_clean() -> None:
    (v,) = check_retrieval(640, 0, 0, checked=64, bad=0)
    assert v.status == OK and v.figure == "0 self hits in 640 neighbours, 64 alleles aligned"
    assert check_retrieval(640, 0, 0)[0].figure == "0 self hits in 640 neighbours"


def test_retrieval_of_the_query_or_its_person_fails() -> None:
    (v,) = check_retrieval(640, 4, 8)
    assert v.status == FAIL and v.subject == "self" and v.hint == HINTS["retrieval_self"]
    assert (
        v.figure == "8 of 640 neighbours are the query's own person (4 the query haplotype itself)"
    )


def test_misaligned_neighbours_fail() -> None:
    (v,) = check_alignment(64, 30)
    assert v.status == FAIL and v.subject == "align" and v.hint == HINTS["retrieval_align"]
    assert v.figure.startswith("30 of 64 spot-checked neighbour alleles differ")
    assert statuses(check_alignment(0, 0)) == [(NA, "")]
    assert statuses(check_alignment(64, 0)) == [(OK, "")]
    assert statuses(check_retrieval(640, 1, 1, checked=64, bad=3)) == [
        (FAIL, "self"),
        (FAIL, "align"),
    ]


# -- validation across epochs ------------------------------------------------------------------
def record(epoch: int, train_loss: float, chip: str = "abc", **val: float) -> ValidationRecord:
    return ValidationRecord(
        epoch=epoch,
        step=10 * (epoch + 1),
        train_loss=train_loss,
        final_level=True,
        val_fingerprint=chip,
        val={f"val/{k}": v for k, v in val.items()},
    )


def test_frozen_validation_while_training_moves() -> None:
    history = [
        record(0, 0.30, loss=0.2, r2=0.5, r2_rare=math.nan),
        record(1, 0.25, loss=0.2, r2=0.5, r2_rare=math.nan),  # NaN bins stay NaN: identical
    ]
    (v,) = check_frozen(history, T.frozen_atol)
    assert v.status == FAIL and v.subject == "frozen" and v.value == 0.0
    assert v.figure == (
        "3 val metrics identical to 0e+00 between epochs 0 and 1 while the training loss "
        "moved by 0.05; validation chip abc unchanged"
    )
    assert v.hint == HINTS["frozen_val"]


def test_frozen_validation_says_what_else_stood_still() -> None:
    still = [record(0, 0.3, loss=0.2), record(1, 0.3, "def", loss=0.2)]
    (v,) = check_frozen(still, T.frozen_atol)
    assert "training loss did not move either" in v.figure
    assert "validation chip changed, metrics did not" in v.figure


def test_validation_that_changes_is_ok() -> None:
    assert check_frozen([record(0, 0.3, loss=0.2)], T.frozen_atol) == []
    history = [record(0, 0.3, loss=0.2, r2=0.5), record(1, 0.25, loss=0.19, r2=0.5)]
    (v,) = check_frozen(history, T.frozen_atol)
    assert v.status == OK and v.figure == "largest val change 1.0e-02 (chip abc)"
    assert v.value == pytest.approx(0.01)
    assert check_frozen([history[0], record(1, 0.2)], T.frozen_atol) == []  # no val metrics
    assert metric_change(math.nan, 1.0) == math.inf and metric_change(1.0, 0.5) == 0.5


# -- train/val loss scale ----------------------------------------------------------------------
def test_loss_scale() -> None:
    (ok,) = check_loss_scale(0.21, 0.2, T.loss_ratio_max)
    assert ok.status == OK and ok.figure == "train/val loss 0.21 / 0.2 = 1.05"
    assert ok.value == pytest.approx(1.05)
    (summed,) = check_loss_scale(0.2, 0.2 * 512, T.loss_ratio_max)  # val summed over sites
    assert (
        summed.status == FAIL and summed.subject == "scale" and summed.hint == HINTS["loss_scale"]
    )
    (zero,) = check_loss_scale(0.2, 0.0, T.loss_ratio_max)
    assert zero.status == FAIL and zero.value == math.inf
    assert check_loss_scale(0.2, None, T.loss_ratio_max) == []


def test_loss_scale_waits_for_the_final_level() -> None:
    (v,) = check_loss_scale(0.2, 5.0, T.loss_ratio_max, final_level=False)
    assert v.status == NA and v.figure == "not at the final curriculum level yet"


# -- the report --------------------------------------------------------------------------------
def test_result_keeps_the_worst_and_counts_every_sighting() -> None:
    r = CheckResult("updates", CHECKS["updates"])
    r.raise_to(OK, "first", "", None)
    r.raise_to(OK, "latest", "", None)
    assert (r.status, r.figure) == (OK, "latest")
    r.raise_to(WARN, "unstable", "lower lr", 4)
    r.raise_to(OK, "fine again", "", None)  # an ok later does not hide a problem
    r.raise_to(WARN, "unstable again", "lower lr", 6)
    assert (r.status, r.figure, r.step, r.events) == (WARN, "unstable", 4, 2)
    r.raise_to(FAIL, "stopped", "raise lr", 8)
    assert (r.status, r.figure, r.hint, r.step, r.events) == (FAIL, "stopped", "raise lr", 8, 3)
    assert worst([OK, NA, WARN]) == WARN and worst([NA]) == NA


def test_table_shows_the_step_and_what_to_do() -> None:
    fail = CheckResult("lr", CHECKS["lr"], FAIL, "optimizer 0.00015", HINTS["lr"], step=0)
    na = CheckResult("frozen_val", CHECKS["frozen_val"], hint=NA_HINTS["frozen_val"])
    ok = CheckResult("spread", CHECKS["spread"], OK, "logit std across items 0.80")
    lines = format_table([fail, na, ok]).splitlines()
    assert lines[0] == "check       status  figure"
    assert lines[2] == "lr          fail    optimizer 0.00015 [step 0]"
    assert lines[3].strip().startswith("-> something sets the lr")
    assert any(line.startswith("frozen_val  n/a     (not measured in this run)") for line in lines)
    assert lines[-1] == "spread      ok      logit std across items 0.80"
