"""``make demo``: simulate a small panel, train ``small`` on it, impute its array, score the result.

    python -m snvbert.demo [any training override, e.g. trainer.max_epochs=2]

The training half is ``python -m snvbert.train experiment=demo``; the run folder then also holds
``imputed.vcf.gz`` (the demo's held-out people imputed from their array sites), and with the
default model shipped with snvbert (:mod:`snvbert.pretrained`, trained on another panel)
``imputed-shipped.vcf.gz`` (the same array imputed without training first), and
``evaluation/`` (r² by minor-allele-frequency bin of both, paired, as a table, JSON and PNG).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from snvbert.evaluate import evaluate, format_table
from snvbert.impute import format_summary, impute
from snvbert.pretrained import DEFAULT_CKPT
from snvbert.train import train
from snvbert.utils.cli import user_errors_exit

log = logging.getLogger("snvbert.demo")


@hydra.main(version_base="1.3", config_path="pkg://snvbert.conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    metrics, objects = train(cfg)
    trainer, dm = objects["trainer"], objects["datamodule"]
    ckpt = (
        trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    )
    sim = Path(dm.panel_path).parent
    run = Path(cfg.paths.output_dir)
    imputed = run / "imputed.vcf.gz"
    print(f"\nimputing {sim / 'array.vcf.gz'} with {ckpt}", flush=True)
    impute(ckpt, sim / "panel.vcf.gz", sim / "array.vcf.gz", imputed, cache_dir=cfg.paths.cache_dir)
    files = {"snvbert": imputed}
    if DEFAULT_CKPT.is_file():  # the other path: impute with the shipped model, no training
        shipped = run / "imputed-shipped.vcf.gz"
        print(f"\nimputing {sim / 'array.vcf.gz'} with the shipped default model", flush=True)
        gmap = sim / "map.plink"  # the trained model's map; the shipped one knows another panel's
        summary = impute(
            None,
            sim / "panel.vcf.gz",
            sim / "array.vcf.gz",
            shipped,
            cache_dir=cfg.paths.cache_dir,
            genetic_map=gmap if gmap.exists() else None,
        )
        print(format_summary(summary), flush=True)
        files["shipped"] = shipped
    print(f"\nscoring {', '.join(map(str, files.values()))} against {sim / 'truth.vcf.gz'}")
    result = evaluate(
        sim / "truth.vcf.gz",
        imputed,
        sim / "panel.vcf.gz",
        sim / "array.vcf.gz",
        compare=list(files.values())[1:],
        labels=list(files),
        out_dir=run / "evaluation",
        cache_dir=cfg.paths.cache_dir,
    )
    print(format_table(result), flush=True)
    print(f"\ndemo outputs: {run}")


if __name__ == "__main__":
    # The demo is the training entry point with the demo experiment; later arguments override it.
    sys.argv[1:1] = ["experiment=demo"]
    main()
