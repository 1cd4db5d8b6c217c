"""``python -m snvbert.pretrained.make`` (``make pretrained``): train the shipped default model.

::

    python -m snvbert.pretrained.make                  # rewrites snvbert/pretrained/default.*
    python -m snvbert.pretrained.make --out /tmp/mine  # elsewhere (the shipped files untouched)

From nothing: simulates the training panels (:data:`RECIPE`: the ``OutOfAfrica_3G09``
demography only; every other stdpopsim HomSap model is kept for measuring it,
``python -m snvbert.bench.transfer --source snvbert/pretrained/default.ckpt``), trains on all
of them at once with a fixed number of steps (so the same command gives the same model on the
same machine), keeps the best validation checkpoint cut to what imputation reads
(:func:`snvbert.pretrained.strip_checkpoint`) as ``default.ckpt``, and writes ``default.json``
beside it: the recipe, the training data's description (each simulation's manifest), the
validation metrics and the time it took.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from snvbert.pretrained import DEFAULT_CKPT, HERE, strip_checkpoint
from snvbert.utils.checkpoint import load_checkpoint
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import atomic_path

log = logging.getLogger("snvbert.pretrained")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The recipe. The panel: the accuracy benchmark's 5 Mb scenario of the default demography
# (every other stdpopsim HomSap model is kept for measuring the model), seed 1, 1,000 people
# (2,000 haplotypes). Training: experiment=accuracy (model=compact, K=128, the HMM skip; a
# random-mask epoch, then the array task, one site per 10 kb, its chip redrawn every epoch) for
# a fixed 8 epochs of 100 batches. SIMULATIONS may list several panels (data.panel a list); a
# three-panel recipe (seeds 3 and 4 with 600 and 4,000 haplotypes beside this one, arrays of 5
# to 30 kb, genotype errors) measured worse on every transfer scenario (README, "Any panel").
SIMULATIONS: list[dict[str, Any]] = [{"size": "5mb", "seed": 1, "panel": 1000}]
DEMOGRAPHY = "OutOfAfrica_3G09"
RECIPE: dict[str, Any] = {
    "demography": DEMOGRAPHY,
    "simulations": SIMULATIONS,
    "overrides": ["experiment=accuracy", "trainer.max_epochs=8", "seed=1"],
}


def _sim_dir(work: Path, sim: dict[str, Any]) -> Path:
    return work / "sim" / f"{sim['size']}-seed{sim['seed']}-panel{sim['panel']}-{DEMOGRAPHY}"


def _train(panels: str, work: Path, overrides: list[str]) -> tuple[Path, dict[str, Any]]:
    """Train on ``panels`` (a Hydra list of paths) under ``work``; the best checkpoint and
    what the run reached."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from snvbert.train import train

    run_dir = work / "train"
    args = [
        f"data.panel={panels}",
        f"paths.root_dir={Path.cwd()}",
        f"paths.log_dir={work}",
        f"paths.output_dir={run_dir}",
        f"paths.cache_dir={work / 'cache'}",
        "test=false",
        *overrides,
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    started = time.perf_counter()
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    callback = trainer.checkpoint_callback
    best = Path(callback.best_model_path) if callback and callback.best_model_path else None
    ckpt = best if best and best.exists() else run_dir / "checkpoints" / "last.ckpt"
    reached = {
        "seconds": round(time.perf_counter() - started, 1),
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "best_checkpoint": ckpt.name,
        "best_score": None
        if callback is None or callback.best_model_score is None
        else float(callback.best_model_score),
        "monitor": None if callback is None else callback.monitor,
        "final_metrics": {k: float(v) for k, v in metrics.items()},
    }
    return ckpt, reached


def make(out_dir: str | Path = HERE, work: str | Path = "outputs/pretrained") -> Path:
    """Train the default model into ``out_dir`` (default.ckpt and default.json); its path."""
    from snvbert.simulate import simulate

    out, work = Path(out_dir), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sims = []
    for sim in SIMULATIONS:
        folder = _sim_dir(work, sim)
        manifest = simulate(
            folder, sim["seed"], sim["size"], demography=DEMOGRAPHY, panel=sim["panel"]
        )
        sims.append({**sim, "demography": DEMOGRAPHY, "manifest": manifest})
    panels = "[" + ",".join(str(_sim_dir(work, sim) / "panel.vcf.gz") for sim in SIMULATIONS) + "]"
    ckpt, reached = _train(panels, work, list(RECIPE["overrides"]))
    raw = load_checkpoint(ckpt)
    recipe = {
        "command": "make pretrained (python -m snvbert.pretrained.make)",
        "recipe": RECIPE,
        "training_data": {"demography": DEMOGRAPHY, "simulations": sims},
        "training": reached,
        "built": {
            "date": time.strftime("%Y-%m-%d"),
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    target = out / DEFAULT_CKPT.name
    with atomic_path(target) as tmp:
        torch.save(strip_checkpoint(raw, recipe), tmp)
    with atomic_path(target.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    size_mb = target.stat().st_size / 1e6
    print(f"wrote {target} ({size_mb:.2f} MB) and {target.with_suffix('.json')}", flush=True)
    return target


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snvbert.pretrained.make", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default=str(HERE), help="where default.ckpt and .json go")
    parser.add_argument(
        "--work", default="outputs/pretrained", help="simulations, cache and the training run"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make(args.out, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
