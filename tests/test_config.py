"""Every config in conf/ composes, and every key in it is read by the code it configures.

Two rules decide "read":

- a node with ``_target_``: each key is a parameter of the target (a class's ``__init__``, a
  function; ``_partial_`` ones alike). A parameter annotated with a dataclass has its nested
  keys checked against that dataclass's fields, recursively; any other dict-valued parameter is
  read at its top key (the target takes the dict whole).
- any other key (train.yaml's ``lr``, ``loss.focal_gamma``, impute.yaml's ``hmm_err`` ...): an
  interpolation elsewhere in the composed config refers to it, or the module that consumes the
  config uses its name in code: as an attribute (``cfg.key``), a string (``cfg.get("key")``), a
  keyword or parameter, or a dataclass field. This reads the consumer's source (its AST, so
  comments and docstrings do not count); it is a name check, not a trace of the run. ``tags``
  alone is exempt: a label for people, stored with the run's hyperparameters.

The hydra section is Hydra's own (its schema refuses unknown keys); only the targets a config
puts there, the sweeper and its sampler, are checked. The experiments are also checked for
repeating a default.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object
from hydra_config import CONF
from omegaconf import OmegaConf

from snvbert.model.net import NetConfig

# The module whose code reads each top-level config's keys.
CONSUMERS: dict[str, tuple[str, ...]] = {
    "train": ("snvbert.train",),
    "diagnose": ("snvbert.diagnose", "snvbert.train"),
    "impute": ("snvbert.impute",),
    "evaluate": ("snvbert.evaluate",),
    "simulate": ("snvbert.simulate",),
    "prepare": ("snvbert.prepare",),
}
# Groups of train.yaml whose every option is composed; hydra/ and local/ are Hydra's and the
# machine's own.
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "local", "__pycache__")
)
# Labels for people, read by no code: they are written with the run's hyperparameters.
RECORDED = {"tags"}
# A target that passes **kwargs on to a config class, named by it.
KWARGS_TO: dict[str, type] = {"snvbert.model.net.SNVBertNet": NetConfig}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def composed(name: str, overrides: list[str]) -> dict[str, Any]:
    """The composed config, hydra section included, interpolations left as written."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg, resolve=False)


def cases() -> list[tuple[str, list[str]]]:
    out = [(name, []) for name in CONSUMERS]
    for group in GROUPS:
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem[0] != "_")
        out += [("train", [f"{group}={option}"]) for option in options]
    return out


def names_in_code(modules: tuple[str, ...]) -> set[str]:
    """Attribute names, identifier-like strings, parameters, keywords and class fields."""
    names: set[str] = set()
    for module in modules:
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update(w for w in node.value.split(".") if w.isidentifier())
            elif isinstance(node, ast.arg | ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def interpolated(tree: Any) -> set[str]:
    """Every key path that an ``${a.b}`` interpolation refers to, and its parents."""
    found: set[str] = set()
    if isinstance(tree, dict):
        for v in tree.values():
            found |= interpolated(v)
    elif isinstance(tree, list):
        for v in tree:
            found |= interpolated(v)
    elif isinstance(tree, str):
        for ref in INTERPOLATION.findall(tree):
            parts = ref.split(".")
            found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return found


def dataclass_in(annotation: Any) -> type | None:
    """The dataclass an annotation names, alone or in a union (``X | None``)."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)), None)
    return None


def parameters(target: Any) -> tuple[dict[str, Any], bool]:
    """A target's named parameters with their annotations (a class's, up its bases for as long
    as each ``__init__`` hands ``**kwargs`` on), and whether ``**kwargs`` are left unnamed."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations the test cannot evaluate: names only
        hints = {}
    params: dict[str, Any] = {}
    for obj in inspect.getmro(target) if inspect.isclass(target) else (target,):
        var_kw = False
        for p in inspect.signature(
            obj.__init__ if inspect.isclass(obj) else obj
        ).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.VAR_POSITIONAL and p.name != "self":
                params.setdefault(p.name, hints.get(p.name))
        if not var_kw:
            break
    return params, var_kw


def unread_in_dataclass(node: dict, cls: type, path: str) -> Iterator[str]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if key not in fields:
            yield f"{path}.{key} (no field of {cls.__qualname__})"
        elif isinstance(value, dict) and (inner := dataclass_in(hints.get(key))):
            yield from unread_in_dataclass(value, inner, f"{path}.{key}")


def unread_in_target(node: dict, path: str) -> Iterator[str]:
    target = node["_target_"]
    params, var_kw = parameters(get_object(target))
    forwarded = KWARGS_TO.get(target)
    if forwarded is not None:
        params.update({f.name: None for f in dataclasses.fields(forwarded)})
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        where = f"{path}.{key}" if path else key
        if key not in params:
            if forwarded is None and var_kw:
                yield f"{where} (into **kwargs of {target}, which the test cannot follow)"
            else:
                yield f"{where} (no such parameter of {target})"
        elif isinstance(value, dict) and "_target_" in value:
            yield from unread_in_target(value, where)
        elif isinstance(value, dict) and (cls := dataclass_in(params[key])):
            yield from unread_in_dataclass(value, cls, where)


def unread(tree: dict, path: str, names: set[str], refs: set[str]) -> Iterator[str]:
    for key, value in tree.items():
        if key in HYDRA_KEYS:
            continue
        where = f"{path}.{key}" if path else key
        if isinstance(value, dict) and "_target_" in value:
            yield from unread_in_target(value, where)
        else:
            if key not in names and where not in refs and key not in RECORDED:
                yield f"{where} (not read by the code, nor interpolated)"
            if isinstance(value, dict):
                yield from unread(value, where, names, refs)


@pytest.mark.parametrize(("name", "overrides"), cases(), ids=lambda x: str(x))
def test_every_config_key_is_read(name: str, overrides: list[str]) -> None:
    cfg = composed(name, overrides)
    hydra = cfg.pop("hydra")
    refs = interpolated(cfg) | interpolated(hydra)
    flagged = list(unread(cfg, "", names_in_code(CONSUMERS[name]), refs))
    # The hydra section is Hydra's (its schema refuses unknown keys), except the targets a
    # config puts there: the sweeper and its sampler.
    flagged += list(unread_in_target(hydra["sweeper"], "hydra.sweeper"))
    assert not flagged, f"{name} {overrides}: keys no code reads: {flagged}"


def leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, f"{path}.{key}" if path else key)
    else:
        yield path, tree


def default_choices() -> dict[str, str]:
    """train.yaml's defaults list as {group: option}."""
    entries = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"))["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()}


@pytest.mark.parametrize(
    "experiment", [p.stem for p in sorted((CONF / "experiment").glob("*.yaml"))]
)
def test_experiments_state_only_what_differs(experiment: str) -> None:
    """An experiment that repeats a default (a value, or a group's default option) would keep
    it when the default moves on: write only what differs."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml"))
    choices = default_choices()
    picked = {}
    for entry in raw.pop("defaults", []):
        ((key, option),) = entry.items()
        picked[key.removeprefix("override /")] = option
    repeated = [f"{g}={o}" for g, o in picked.items() if choices.get(g) == o]
    base = dict(leaves(composed("train", [f"{g}={o}" for g, o in picked.items()])))
    repeated += [f"{k}={v}" for k, v in leaves(raw) if k in base and base[k] == v]
    assert not repeated, f"experiment={experiment} repeats the defaults {repeated}"
