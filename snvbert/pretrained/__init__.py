"""The default model shipped with snvbert: ``python -m snvbert.impute`` without ``ckpt=``.

One small file, ``default.ckpt`` beside this module (the network's weights, its config and the
description of the data it was trained on; nothing a resumed training run would need), with
``default.json`` beside it: the recipe that trained it and a description of its training data.
``make pretrained`` (:mod:`snvbert.pretrained.make`) trains it again from nothing and rewrites
both; the tests never retrain it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snvbert.errors import SnvbertError

HERE = Path(__file__).resolve().parent
DEFAULT_CKPT = HERE / "default.ckpt"
DEFAULT_RECIPE = HERE / "default.json"

# What of a training checkpoint imputation reads (snvbert.impute.load_trained): the net's config
# and weights and the data module's description; everything else (optimizer, loops, callbacks,
# the raw weights beside the averaged ones) is dropped.
_KEPT = ("hyper_parameters", "state_dict", "SNVDataModule")


def default_checkpoint() -> Path:
    """The shipped default model's checkpoint; a one-line error when this install has none."""
    if not DEFAULT_CKPT.is_file():
        raise SnvbertError(
            "no default model ships with this install; pass ckpt=PATH to a checkpoint of "
            "python -m snvbert.train, or rebuild the default with make pretrained",
            path=DEFAULT_CKPT,
        )
    return DEFAULT_CKPT


def recipe() -> dict[str, Any] | None:
    """The shipped model's recipe and training data (``default.json``), None when absent."""
    if not DEFAULT_RECIPE.is_file():
        return None
    return json.loads(DEFAULT_RECIPE.read_text())


def strip_checkpoint(raw: dict[str, Any], recipe: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint cut to what imputation reads, the recipe inside it.

    Only the network's weights are kept (``net.*`` of the state dict: the averaged ones where
    training averaged them); the training panel's map path is dropped, since no other panel
    can use it (:func:`snvbert.impute.impute` reads a map only on the training panel). Every
    value is a plain dict, list, string, number or tensor, so the file loads with
    ``torch.load(weights_only=True)``: it runs no code.
    """
    missing = [key for key in _KEPT if key not in raw]
    if missing:
        raise SnvbertError(f"is not a checkpoint of python -m snvbert.train (lacks {missing})")
    describe = dict(raw["SNVDataModule"]["describe"])
    describe["genetic_map"] = None
    return {
        "hyper_parameters": {"net": _plain(raw["hyper_parameters"]["net"])},
        "state_dict": {k: v for k, v in raw["state_dict"].items() if k.startswith("net.")},
        "SNVDataModule": {"describe": _plain(describe)},
        "snvbert_pretrained": _plain(recipe),
    }


def _plain(value: Any) -> Any:
    """``value`` as plain Python (OmegaConf and numpy values included), for weights_only."""
    if isinstance(value, str):  # str subclasses too (torch.__version__ is one)
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "requires_grad"):  # a numpy scalar
        return value.item()
    return value
