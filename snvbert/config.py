"""The configs as the commands compose them, for Python callers: the YAML stays the one source.

``python -m snvbert.train`` builds everything from ``conf/`` (inside the package as
``snvbert.conf``); code holds no second copy of a default. A script, a notebook or a test that
wants the same objects composes the same YAML::

    from snvbert.config import compose, datamodule
    cfg = compose("train", ["model=large", "lr=1e-4"])
    dm = datamodule(panel="panel.vcf.gz", batch_size=4)   # data/default.yaml, these keys changed

Keyword overrides merge into the YAML's nodes as a CLI override would (a mapping merges key by
key; an unknown key is an error).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from snvbert.errors import SnvbertError

CONFIG_MODULE = "snvbert.conf"


def compose(
    name: str = "train",
    overrides: Sequence[str] = (),
    *,
    root_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> DictConfig:
    """The composed config ``name`` with ``overrides``, its paths resolved without a Hydra run.

    ``root_dir`` (default: the working directory) stands for ``paths.root_dir``, the folder the
    commands put ``outputs/`` and ``.snvbert_cache/`` under; ``output_dir`` (default
    ``root_dir/outputs/api``) for the run folder.
    """
    root = Path(root_dir if root_dir is not None else Path.cwd()).resolve()
    out = Path(output_dir) if output_dir is not None else root / "outputs" / "api"
    args = list(overrides)
    if name in ("train", "diagnose"):
        args += [f"paths.root_dir='{root}'", f"paths.output_dir='{Path(out).resolve()}'"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra run: its search path is ours
        return hydra_compose(name, overrides=args)
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(name, overrides=args)


def filled(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with each None replaced by config ``name``'s value at that key (a dotted path
    for a nested one): a Python function's settings left out are the command's defaults."""
    cfg = compose(name)
    return {key: OmegaConf.select(cfg, key) if v is None else v for key, v in given.items()}


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with a configuration error raised as itself: Hydra wraps
    whatever a constructor raises, and the commands print a :class:`SnvbertError` as one line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, SnvbertError):
            raise err.__cause__ from None
        raise


def data_config(overrides: dict[str, Any] | None = None, **compose_kw: Any) -> DictConfig:
    """``data`` of the train config, with keyword ``overrides`` merged in (resolved)."""
    node = compose("train", **compose_kw).data
    if overrides:
        node = OmegaConf.merge(node, OmegaConf.create(dict(overrides)))
    OmegaConf.resolve(node)
    return node


def datamodule(**overrides: Any) -> Any:
    """The :class:`~snvbert.data.datamodule.SNVDataModule` of ``conf/data/default.yaml``."""
    return build(data_config(overrides))


def retriever(**overrides: Any) -> Any:
    """The :class:`~snvbert.data.retrieval.Retriever` of ``data.retrieval`` in the YAML."""
    from snvbert.data.retrieval import Retriever

    node = data_config({"retrieval": overrides}).retrieval
    return Retriever(**OmegaConf.to_container(node))
