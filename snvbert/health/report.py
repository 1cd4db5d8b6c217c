"""The training-health report: one :class:`CheckResult` per check over a run, and the table.

A check's verdicts (:class:`snvbert.health.checks.Verdict`) arrive many times in a run; its
result keeps the worst, with the step it was first seen and how often. :func:`format_table`
prints the results as the end-of-fit summary and ``python -m snvbert.diagnose`` show them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

from snvbert.health.checks import FAIL, NA, OK, WARN

SEVERITY = {NA: 0, OK: 1, WARN: 2, FAIL: 3}

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
    """One check's verdict over a run: status, the figure that shows it, what to do."""

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
        if SEVERITY[status] > SEVERITY[self.status]:
            self.status, self.figure, self.hint = status, figure, hint
            if status in (WARN, FAIL):
                self.step = step
        elif status == self.status == OK:
            self.figure = figure


def worst(statuses: Iterable[str]) -> str:
    """The most severe of the statuses."""
    return max(statuses, key=SEVERITY.__getitem__)


def format_table(results: Iterable[CheckResult], width: int = 100) -> str:
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
    return textwrap.wrap(
        text, width=width, initial_indent=" " * indent, subsequent_indent=" " * (indent + 3)
    )
