"""The mask-rate curriculum: levels of rising difficulty that end at the real (array) task."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from snvbert.data.masks import MaskLevel
from snvbert.errors import SnvbertError

ADVANCE_MODES = ("epochs", "plateau")


class Curriculum:
    """Which :class:`MaskLevel` training uses now, advanced by epoch count or on loss plateau.

    ``step`` is called once at the end of each training epoch with that epoch's mean training
    loss; the level it leaves is the one the next epoch's sampler reads. Its state goes into
    checkpoints (through the DataModule), so a resumed run continues at the level it reached.
    """

    def __init__(
        self,
        levels: Sequence[MaskLevel],
        *,
        advance: str,
        epochs_per_level: int,
        patience: int,
        min_delta: float,
    ) -> None:
        """Settings as ``data.curriculum`` gives them (the YAML holds every value)."""
        if not levels:
            raise SnvbertError("data.curriculum.levels is empty: give at least the array task")
        if advance not in ADVANCE_MODES:
            raise SnvbertError(f"data.curriculum.advance='{advance}' is not one of {ADVANCE_MODES}")
        self.levels = list(levels)
        self.advance = advance
        self.epochs_per_level = max(1, int(epochs_per_level))
        self.patience = max(1, int(patience))
        self.min_delta = float(min_delta)
        self.level = 0
        self.epochs_at_level = 0
        self.best_loss = math.inf
        self.bad_epochs = 0

    @property
    def final_level(self) -> int:
        return len(self.levels) - 1

    @property
    def is_final(self) -> bool:
        return self.level == self.final_level

    @property
    def current(self) -> MaskLevel:
        return self.levels[self.level]

    def step(self, train_loss: float) -> bool:
        """Record one finished epoch; return True when the level moved up."""
        if self.is_final:
            return False
        self.epochs_at_level += 1
        if self.advance == "epochs":
            ready = self.epochs_at_level >= self.epochs_per_level
        else:
            if train_loss < self.best_loss - self.min_delta:
                self.best_loss, self.bad_epochs = train_loss, 0
            else:
                self.bad_epochs += 1
            ready = self.bad_epochs >= self.patience
        if ready:
            self.level += 1
            self.epochs_at_level, self.best_loss, self.bad_epochs = 0, math.inf, 0
        return ready

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "epochs_at_level": self.epochs_at_level,
            "best_loss": self.best_loss,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level = min(int(state["level"]), self.final_level)
        self.epochs_at_level = int(state["epochs_at_level"])
        self.best_loss = float(state["best_loss"])
        self.bad_epochs = int(state["bad_epochs"])
