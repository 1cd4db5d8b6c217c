"""``python -m snvbert.diagnose``: a short training run with every health check, as a table.

Any training config and override works (``debug=default``, ``model=large lr=1e-4``,
``data.panel=...``): ``conf/diagnose.yaml`` composes ``train`` and only shortens the run. The
run trains on the configured data with :class:`snvbert.health.TrainingHealth` checking every
few steps, then prints each check's status (ok / warn / fail / n/a), the figure that shows it
and what to do, and exits 1 when any check failed, so that it can gate a sweep or CI job.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, open_dict

from snvbert.health import FAIL, TrainingHealth, format_table
from snvbert.train import train
from snvbert.utils.cli import user_errors_exit

log = logging.getLogger("snvbert.diagnose")

HEALTH_TARGET = "snvbert.health.TrainingHealth"


def prepare(cfg: DictConfig) -> DictConfig:
    """The training config, shortened for a diagnosis and with the health callback on.

    Batches per epoch are capped by ``diagnose.max_train_batches`` / ``max_val_batches`` (never
    raised: a debug config's 5 batches stay 5). The health callback is added when the chosen
    callbacks lack it (``callbacks=none``, ``~callbacks.health``).
    """
    caps = cfg.get("diagnose") or {}
    with open_dict(cfg):
        for key, cap_key in (
            ("limit_train_batches", "max_train_batches"),
            ("limit_val_batches", "max_val_batches"),
        ):
            cap = caps.get(cap_key)
            if cap is None:
                continue
            current = cfg.trainer.get(key)
            # An int is a count; a float (or None) is a fraction of an unknown number of batches.
            if isinstance(current, int) and not isinstance(current, bool):
                cfg.trainer[key] = min(current, int(cap))
            else:
                cfg.trainer[key] = int(cap)
        if cfg.get("callbacks") is None:
            cfg.callbacks = {}
        health = cfg.callbacks.get("health")
        if health is None:
            cfg.callbacks.health = {"_target_": HEALTH_TARGET, "print_summary": False}
        elif "_target_" not in health:
            health["_target_"] = HEALTH_TARGET
    return cfg


def diagnose(cfg: DictConfig) -> tuple[int, TrainingHealth, dict[str, float]]:
    """Run the short training; return the exit status (1 on any failed check), the callback
    and the run's final metrics (the ``health/...`` figures among them)."""
    cfg = prepare(cfg)
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    health = next(cb for cb in trainer.callbacks if isinstance(cb, TrainingHealth))
    return (1 if health.status == FAIL else 0), health, metrics


def report(health: TrainingHealth, steps: int) -> str:
    """The table the command prints."""
    where = f"\ndetails: {health.json_path}" if health.json_path else ""
    counts = {
        s: sum(r.status == s for r in health.results.values())
        for s in ("ok", "warn", "fail", "n/a")
    }
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return (
        f"\nsnvbert diagnose: {steps} training steps, checks every {health.every_n_steps} steps\n\n"
        f"{format_table(health.results.values())}\n\n"
        f"overall: {health.status.upper()} ({tally}){where}"
    )


@hydra.main(version_base="1.3", config_path="pkg://snvbert.conf", config_name="diagnose")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    status, health, _ = diagnose(cfg)
    print(report(health, health.steps), flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
