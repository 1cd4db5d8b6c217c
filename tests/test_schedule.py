"""The optimizer's lr at chosen steps equals the configured lr times the schedule formula."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from snvbert.model import schedule as S

CONF = Path(__file__).resolve().parents[1] / "conf" / "schedule"
WARMUP, TOTAL = 10, 50


def _lrs(build, lr: float, steps: list[int], **kw) -> dict[int, float]:
    """Run a real AdamW + LambdaLR, record the lr the optimizer holds at each step."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = build(opt, total_steps=TOTAL, warmup_steps=WARMUP, **kw)
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = opt.param_groups[0]["lr"]
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("lr", [1e-3, 2.5e-4])
def test_cosine_lr_at_chosen_steps(lr: float) -> None:
    kw = {"warmup_start_factor": 0.2, "min_factor": 0.05}
    steps = [0, WARMUP // 2, WARMUP, TOTAL]
    seen = _lrs(S.cosine, lr, steps, **kw)
    assert seen[0] == pytest.approx(0.2 * lr)
    assert seen[WARMUP // 2] == pytest.approx(0.6 * lr)
    assert seen[WARMUP] == pytest.approx(lr)
    assert seen[TOTAL] == pytest.approx(0.05 * lr)
    for step, got in seen.items():
        assert got == pytest.approx(
            S.lr_at("cosine", step, lr, warmup_steps=WARMUP, total_steps=TOTAL, **kw)
        )


@pytest.mark.parametrize("lr", [1e-3, 2.5e-4])
def test_inverse_sqrt_and_constant(lr: float) -> None:
    steps = [0, WARMUP // 2, WARMUP, 4 * WARMUP]
    inv_kw = {"warmup_start_factor": 0.2, "min_factor": 0.0}
    inv = _lrs(S.inverse_sqrt, lr, steps, **inv_kw)
    assert inv[0] == pytest.approx(0.2 * lr)
    assert inv[WARMUP] == pytest.approx(lr)
    assert inv[4 * WARMUP] == pytest.approx(lr * math.sqrt(1 / 4))
    const_kw = {"warmup_start_factor": 0.2}
    const = _lrs(S.constant, lr, steps, **const_kw)
    assert const[WARMUP // 2] == pytest.approx(0.6 * lr)
    assert const[4 * WARMUP] == pytest.approx(lr)
    for name, seen, kw in (("inverse_sqrt", inv, inv_kw), ("constant", const, const_kw)):
        for step, got in seen.items():
            assert got == pytest.approx(
                S.lr_at(name, step, lr, warmup_steps=WARMUP, total_steps=TOTAL, **kw)
            )


@pytest.mark.parametrize("name", ["cosine", "inverse_sqrt", "constant"])
def test_schedule_settings_have_no_code_default(name: str) -> None:
    """conf/schedule/<name>.yaml is the one place a schedule's settings are set: the builder
    takes every key of that file and gives none of them a default of its own."""
    params = inspect.signature(getattr(S, name)).parameters
    keys = set(OmegaConf.load(CONF / f"{name}.yaml")) - {"_target_", "_partial_"}
    assert keys == {p for p in params if p not in ("optimizer", "total_steps")}
    assert all(params[k].default is inspect.Parameter.empty for k in keys)


@pytest.mark.parametrize("name", ["cosine", "inverse_sqrt", "constant"])
def test_schedule_configs_build_and_describe_themselves(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.warmup_start_factor == 0.2
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.5)
    sched = instantiate(cfg)(opt, total_steps=TOTAL)
    assert sched.snvbert["schedule"] == name and sched.snvbert["total_steps"] == TOTAL
    # The health check recomputes the lr from this description and the configured lr.
    assert opt.param_groups[0]["lr"] == pytest.approx(
        S.lr_at(name, 0, 0.5, **{k: v for k, v in sched.snvbert.items() if k != "schedule"})
    )


def test_no_lr_literal_in_code() -> None:
    """The lr comes from config: no numeric lr in code (keyword, assignment or default)."""
    import ast

    def numeric(node: ast.AST | None) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, int | float)

    root = Path(S.__file__).parents[1]
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword):
                assert not (node.arg == "lr" and numeric(node.value)), (path, node.lineno)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                assert not ("lr" in names and numeric(node.value)), (path, node.lineno)
            elif isinstance(node, ast.arguments):
                params = node.posonlyargs + node.args
                for arg, default in zip(
                    params[len(params) - len(node.defaults) :], node.defaults, strict=True
                ):
                    assert not (arg.arg == "lr" and numeric(default)), (path, arg.lineno)
                for arg, default in zip(node.kwonlyargs, node.kw_defaults, strict=True):
                    assert not (arg.arg == "lr" and numeric(default)), (path, arg.lineno)
