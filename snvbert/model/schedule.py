"""Learning-rate schedules: linear warmup, then cosine, inverse-sqrt or constant.

The learning rate itself always comes from the config: these functions only shape it, as a
factor of the optimizer's configured lr. Each schedule has a pure ``*_factor`` formula; the
``LambdaLR`` built from it carries the schedule's name and arguments (``scheduler.snvbert``) so
the training-health check can recompute the expected lr independently with :func:`lr_at`.
Their settings have no defaults here: conf/schedule/<name>.yaml is the one place they are set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup_steps: int, warmup_start_factor: float) -> float:
    return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps


def cosine_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    warmup_start_factor: float,
    min_factor: float,
) -> float:
    """Linear warmup from start factor to 1, then cosine to ``min_factor`` at ``total_steps``."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, warmup_start_factor)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def inverse_sqrt_factor(
    step: int,
    *,
    warmup_steps: int,
    warmup_start_factor: float,
    min_factor: float,
    total_steps: int | None = None,
) -> float:
    """Linear warmup, then ``sqrt(warmup / step)``, floored at ``min_factor`` (``total_steps`` is
    not used)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, warmup_start_factor)
    return max(min_factor, math.sqrt(max(1, warmup_steps) / max(1, step)))


def constant_factor(
    step: int,
    *,
    warmup_steps: int,
    warmup_start_factor: float,
    total_steps: int | None = None,
) -> float:
    """Linear warmup, then flat (``total_steps`` is not used)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, warmup_start_factor)
    return 1.0


FACTORS: dict[str, Callable[..., float]] = {
    "cosine": cosine_factor,
    "inverse_sqrt": inverse_sqrt_factor,
    "constant": constant_factor,
}


def lr_at(schedule: str, step: int, lr: float, **kwargs: Any) -> float:
    """The lr the named schedule gives at optimizer step ``step`` for configured ``lr``."""
    return lr * FACTORS[schedule](step, **kwargs)


def _build(
    schedule: str,
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float,
    **shape: float,
) -> LambdaLR:
    if not 0.0 < warmup_start_factor <= 1.0:
        raise ValueError(f"warmup_start_factor must be in (0, 1], got {warmup_start_factor}")
    kwargs = {
        "warmup_steps": int(warmup_steps),
        "total_steps": int(total_steps),
        "warmup_start_factor": float(warmup_start_factor),
        **{k: float(v) for k, v in shape.items()},
    }
    sched = LambdaLR(optimizer, functools.partial(FACTORS[schedule], **kwargs))
    sched.snvbert = {"schedule": schedule, **kwargs}  # read by the health check with lr_at
    return sched


def cosine(
    optimizer: Optimizer,
    total_steps: int,
    *,
    warmup_steps: int,
    warmup_start_factor: float,
    min_factor: float,
) -> LambdaLR:
    return _build(
        "cosine",
        optimizer,
        total_steps,
        warmup_steps=warmup_steps,
        warmup_start_factor=warmup_start_factor,
        min_factor=min_factor,
    )


def inverse_sqrt(
    optimizer: Optimizer,
    total_steps: int,
    *,
    warmup_steps: int,
    warmup_start_factor: float,
    min_factor: float,
) -> LambdaLR:
    return _build(
        "inverse_sqrt",
        optimizer,
        total_steps,
        warmup_steps=warmup_steps,
        warmup_start_factor=warmup_start_factor,
        min_factor=min_factor,
    )


def constant(
    optimizer: Optimizer, total_steps: int, *, warmup_steps: int, warmup_start_factor: float
) -> LambdaLR:
    return _build(
        "constant",
        optimizer,
        total_steps,
        warmup_steps=warmup_steps,
        warmup_start_factor=warmup_start_factor,
    )
