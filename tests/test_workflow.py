"""The Snakemake workflow (chromosomes x region chunks x target batches), run for real on this
machine, against one ``snvbert.impute`` run; its SLURM profile; Hydra's SLURM launcher."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from snvbert.impute import impute
from snvbert.workflow import PROFILES

HMM_ERR = 1e-4


def records(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt") as fh:
        return [line.rstrip("\n").split("\t") for line in fh if not line.startswith("##")]


def run_workflow(
    tmp: Path, sim: Path, name: str, *args: str, **settings
) -> subprocess.CompletedProcess:
    cfg = {
        "out": str(tmp / name),
        "chromosomes": {
            "20": {
                "panel": str(sim / "panel.vcf.gz"),
                "target": str(sim / "array.vcf.gz"),
                "genetic_map": str(sim / "map.plink"),
            }
        },
        "hmm_err": HMM_ERR,
        "threads": 1,
        **settings,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "snvbert.workflow",
        "--configfile",
        str(path),
        "--cores",
        "2",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=900)


@pytest.fixture(scope="module")
def whole(tiny_sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-run") / "whole.vcf.gz"
    impute(
        None,
        tiny_sim / "panel.vcf.gz",
        tiny_sim / "array.vcf.gz",
        out,
        genetic_map=tiny_sim / "map.plink",
        hmm_err=HMM_ERR,
        progress=False,
        cache_dir=out.parent,
    )
    return out


def test_the_workflow_merges_batches_into_one_runs_output(tmp_path, tiny_sim, whole):
    """One chunk, three batches of people (4 + 4 + 2): the merged VCF is one run's, record for
    record."""
    proc = run_workflow(tmp_path, tiny_sim, "batches", chunk_bp=10**9, batch_people=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = tmp_path / "batches" / "20.vcf.gz"
    assert Path(f"{got}.tbi").exists()
    assert len(list((tmp_path / "batches" / "work" / "20").glob("chunk0.batch*.vcf.gz"))) == 3
    assert records(got) == records(whole)


def test_the_workflow_ligates_chunks_of_batches(tmp_path, tiny_sim, whole):
    """Two overlapping chunks x three batches: every site and person of the one run, in order,
    typed calls as given, dosages within the chunking's measured change (README, Scale)."""
    proc = run_workflow(
        tmp_path, tiny_sim, "grid", chunk_bp=120_000, overlap_bp=40_000, batch_people=4
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "grid" / "work" / "20"
    assert len(list(work.glob("chunk*.batch*.vcf.gz"))) == 6
    got, want = records(tmp_path / "grid" / "20.vcf.gz"), records(whole)
    assert got[0] == want[0] and [r[:5] for r in got] == [r[:5] for r in want]
    typed = [i for i, r in enumerate(want[1:]) if "IMP" not in r[7].split(";")]
    assert typed and all(got[1 + i][9:] == want[1 + i][9:] for i in typed)
    ds = lambda rows: np.array([[float(x.split(":")[1]) for x in r[9:]] for r in rows[1:]])  # noqa: E731
    delta = np.abs(ds(got) - ds(want))
    assert delta.mean() < 0.02, delta.mean()  # 0.007 on this panel (0.2 Mb; 0.12 Mb chunks)


def test_a_bad_configuration_is_one_line(tmp_path, tiny_sim):
    proc = subprocess.run(
        [sys.executable, "-m", "snvbert.workflow", "--cores", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "snvbert: error: give --configfile"
    )


def test_the_slurm_profile_plans_every_job_on_slurm(tmp_path, tiny_sim):
    """The shipped profile names Snakemake's SLURM executor, whose plugin is installed; a dry
    run through it plans the whole grid (no cluster needed to plan)."""
    profile = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    import snakemake_executor_plugin_slurm  # noqa: F401  (the executor the profile names)

    proc = run_workflow(
        tmp_path,
        tiny_sim,
        "plan",
        "--slurm",
        "-n",
        chunk_bp=120_000,
        overlap_bp=40_000,
        batch_people=4,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = proc.stdout + proc.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", plan, flags=re.M))
    assert counts.get("impute") == "6" and counts.get("merge") == "2", plan[-2000:]
    assert counts.get("ligate") == "1" and counts.get("batch_target") == "3"
    assert not (tmp_path / "plan").exists()  # a dry run writes nothing


def test_sweeps_go_to_slurm_through_hydras_submitit_launcher(tmp_path, tiny_sim):
    """`hydra/launcher=slurm` composes with the training config into submitit's SLURM launcher,
    whose plugin is installed, and with a sweep; its settings are overridden as Hydra's are."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hparams_search=optuna",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(SlurmLauncher.__name__)
    assert launcher.partition == "gpu" and launcher.timeout_min == 240 and launcher.nodes == 1
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    GlobalHydra.instance().clear()
