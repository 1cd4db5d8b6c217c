"""Reliability: a training run killed with SIGKILL mid-epoch and resumed ends exactly as the run
uninterrupted; the same seed gives the same run; checkpoints are written atomically and loaded
without running code; an imputation killed at any point leaves no output, and its records do
not depend on the batch size or the thread count."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snvbert.utils.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent

# 3 epochs of 8 steps; last.ckpt every 3 steps; a curriculum that steps on a loss plateau; dropout,
# the health checks every 4 steps, early stopping and the moving average of the weights on.
RUN = [
    "debug=default",
    "trainer.detect_anomaly=false",
    "model.dropout=0.1",  # draws from torch's RNG at every step
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2",
    "schedule.warmup_steps=4",
    "data.curriculum.levels=[{strategy: random, rate: 0.3},{strategy: array, spacing_bp: 5000}]",
    # the level moves up when an epoch's mean training loss does not improve on the best
    "data.curriculum.advance=plateau",
    "data.curriculum.patience=1",
    "callbacks.model_checkpoint.last_every_n_steps=3",
    "callbacks.health.every_n_steps=4",
    "callbacks.progress_bar.refresh_rate=0",
    "+callbacks.weight_averaging._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
    "+callbacks.weight_averaging.decay=0.9",
]


def run_train(tmp: Path, sim: Path, name: str, *extra: str, check: bool = True):
    out = tmp / name
    cmd = [
        sys.executable,
        "-m",
        "snvbert.train",
        *RUN,
        f"data.sim_dir={sim}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.run.dir={out}",
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def val_rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/loss")]
    return [
        {k: v for k, v in r.items() if k.startswith("val/") or k in ("epoch", "step")} for r in rows
    ]


def curriculum_steps(run: Path) -> list[str]:
    """The log's curriculum lines ("level 0 -> 1 ... after epoch 1 (train loss 0.0779)")."""
    lines = (run / "train.log").read_text().splitlines()
    return [line.split(" - ", 1)[1] for line in lines if "curriculum: level" in line]


def assert_same_weights(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["global_step"] == cb["global_step"]
    for part in ("state_dict", "current_model_state"):
        assert ca[part].keys() == cb[part].keys()
        for key in ca[part]:
            assert torch.equal(ca[part][key], cb[part][key]), f"{part}.{key} differs"
    for sa, sb in zip(
        ca["optimizer_states"][0]["state"].values(),
        cb["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_killed_mid_epoch_and_resumed_ends_bit_for_bit_as_uninterrupted(tmp_path, tiny_sim):
    whole, _ = run_train(tmp_path, tiny_sim, "whole")
    # SIGKILL at the start of step 13 (epoch 1, its 6th batch): the newest last.ckpt is step 12's
    killed, proc = run_train(
        tmp_path,
        tiny_sim,
        "killed",
        "+callbacks.kill._target_=kill_at_step.KillAtStep",
        "+callbacks.kill.step=13",
        check=False,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 12
    assert not list((killed / "checkpoints").glob(".*partial")), "a temporary file was left"
    resumed, proc = run_train(tmp_path, tiny_sim, "resumed", f"ckpt_path={last}")
    assert "not resumable" not in proc.stderr  # Lightning's warning for a loader without state

    assert_same_weights(whole / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt")
    # the validation rows of the epochs the resumed run trained, bit for bit
    assert val_rows(resumed) == [r for r in val_rows(whole) if int(r["epoch"]) >= 1]
    # the same best checkpoint and score, early stopping state and health record
    cw = load_checkpoint(whole / "checkpoints" / "last.ckpt")["callbacks"]
    cr = load_checkpoint(resumed / "checkpoints" / "last.ckpt")["callbacks"]
    for key in cw:
        if key.startswith(("CurriculumModelCheckpoint", "CurriculumEarlyStopping")):
            state_w, state_r = dict(cw[key]), dict(cr[key])
            for path_key in (
                "best_model_path",
                "last_model_path",
                "kth_best_model_path",
                "dirpath",
                "best_k_models",
            ):
                state_w.pop(path_key, None), state_r.pop(path_key, None)
            assert str(state_w) == str(state_r), key
    # the curriculum (its plateau test reads the killed epoch's mean loss, all of its batches)
    dw, dr = (
        load_checkpoint(run / "checkpoints" / "last.ckpt")["SNVDataModule"]
        for run in (whole, resumed)
    )
    assert dw["curriculum"] == dr["curriculum"] and dw["train_position"] == dr["train_position"]
    steps = [curriculum_steps(run) for run in (whole, resumed)]
    assert steps[0] and steps[0] == steps[1]  # the same epoch mean loss (0.07..) moved the level
    hw, hr = (json.loads((run / "health.json").read_text()) for run in (whole, resumed))
    assert hw == hr


def compose_run(tmp_path: Path, sim: Path, name: str, *extra: str):
    from hydra_config import compose_config

    return compose_config(
        "train",
        tmp_path / name,
        [f"data.sim_dir={sim}", f"paths.cache_dir={tmp_path / 'cache'}", *RUN, *extra],
    )


def test_same_seed_same_run_and_another_seed_another(tmp_path, tiny_sim):
    """Two runs of one config and seed on a CPU: identical validation rows and final weights."""
    from snvbert.train import train

    short = ["trainer.max_epochs=2"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train(compose_run(tmp_path, tiny_sim, name, *short, f"seed={seed}"))
    a, b, c = (tmp_path / name for name in "abc")
    assert val_rows(a) == val_rows(b) and len(val_rows(a)) == 2
    assert_same_weights(a / "checkpoints" / "last.ckpt", b / "checkpoints" / "last.ckpt")
    assert val_rows(c) != val_rows(a)
    with pytest.raises(AssertionError, match="differs"):
        assert_same_weights(a / "checkpoints" / "last.ckpt", c / "checkpoints" / "last.ckpt")


def test_a_checkpoint_being_written_when_the_write_fails_leaves_the_last_one_whole(
    tmp_path, monkeypatch
):
    from snvbert.callbacks import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(4)}, path)
    before = path.read_bytes()

    def half_then_die(obj, sink, *args, **kwargs):
        sink.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as a kill between two writes would leave it

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(4)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt"
    ]
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 3


class _Planted:
    """Unpickling this calls Path.touch(marker): code a downloaded checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    """The callable planted in a real checkpoint (the shipped model's, beside its weights) is
    never called: not by imputation's load, not by a training resume, not by the command line;
    one line each."""
    from snvbert.callbacks import AtomicCheckpointIO
    from snvbert.errors import SnvbertError
    from snvbert.impute import load_trained
    from snvbert.pretrained import DEFAULT_CKPT

    marker = tmp_path / "ran"
    raw = torch.load(DEFAULT_CKPT, weights_only=True)
    load_trained(DEFAULT_CKPT, torch.device("cpu"))  # loads as it is
    raw["hyper_parameters"]["payload"] = _Planted(marker)
    planted = tmp_path / "planted.ckpt"
    torch.save(raw, planted)
    _Planted(tmp_path / "control").__reduce__()[0](tmp_path / "control")  # the payload works
    assert (tmp_path / "control").exists()

    for load in (
        load_checkpoint,
        lambda p: load_trained(p, torch.device("cpu")),
        AtomicCheckpointIO().load_checkpoint,
    ):
        with pytest.raises(SnvbertError, match="weights_only=True") as err:
            load(planted)
        assert "\n" not in str(err.value) and "planted.ckpt" in str(err.value)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snvbert.impute",
            f"ckpt={planted}",
            "panel=p.vcf.gz",
            "target=t.vcf.gz",
            f"out={tmp_path / 'o.vcf.gz'}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("snvbert: error:")
    assert not marker.exists()


def impute_cmd(sim: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snvbert.impute",
        f"panel={sim / 'panel.vcf.gz'}",
        f"target={sim / 'array.vcf.gz'}",
        f"genetic_map={sim / 'map.plink'}",
        f"out={out}",
        f"cache_dir={out.parent / 'cache'}",
        "progress=false",
        *extra,
    ]


def records(path: Path) -> list[str]:
    """The VCF's records and its header's sample line (not the ## lines, which hold the command)."""
    import gzip

    with gzip.open(path, "rt") as fh:
        return [line for line in fh if not line.startswith("##")]


def test_imputation_killed_at_any_point_leaves_nothing_and_reruns_the_same(tmp_path, tiny_sim):
    """SIGKILL at spread-out moments of a real run (start-up, reading, imputing, writing): no
    output and no index appear unless both are whole; the next run removes the dead run's temporary files and writes
    the records an uninterrupted run writes. Those do not depend on batch_size or threads."""
    import signal
    import time

    whole = tmp_path / "whole" / "out.vcf.gz"
    started = time.perf_counter()
    subprocess.run(impute_cmd(tiny_sim, whole), check=True, capture_output=True)
    took = time.perf_counter() - started
    out = tmp_path / "killed" / "out.vcf.gz"
    for share in (0.2, 0.5, 0.7, 0.8, 0.9, 0.95):
        proc = subprocess.Popen(impute_cmd(tiny_sim, out), stderr=subprocess.DEVNULL)
        time.sleep(took * share)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # no output and no index, or (killed after its last write, or finished) both, whole
        index = Path(f"{out}.tbi")
        assert out.exists() == index.exists(), share
        if out.exists():
            assert records(out) == records(whole), share
            out.unlink()
            index.unlink()
    subprocess.run(impute_cmd(tiny_sim, out), check=True, capture_output=True)
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "cache") == [
        "out.vcf.gz",
        "out.vcf.gz.tbi",
    ]
    assert records(out) == records(whole)
    for extra in (["batch_size=3", "threads=1"], ["batch_size=2", "threads=2"]):
        other = tmp_path / "_".join(extra).replace("=", "") / "out.vcf.gz"
        subprocess.run(impute_cmd(tiny_sim, other, *extra), check=True, capture_output=True)
        assert records(other) == records(whole), extra


def test_the_temporary_files_of_a_killed_writer_go_at_the_next_write(tmp_path):
    """A dead process's ``.partial`` files and folders beside an output are removed by the next
    write of it; a running process's (here, this one's) stay."""
    from snvbert.utils.io import atomic_path, partial_prefix

    final = tmp_path / "out.vcf.gz"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = [
        tmp_path / f".out.vcf.gz.{pid}.ab12.partial",
        tmp_path / f".out.vcf.gz.{pid}.ab12.partial.tbi",
    ]
    for path in stale:
        path.write_text("half")
    (tmp_path / f".out.vcf.gz.{pid}.cd34.partial").mkdir()  # a cache folder being built
    alive = tmp_path / f"{partial_prefix(final)}ef56.partial"
    alive.write_text("being written")
    other = tmp_path / f".other.vcf.gz.{pid}.ab12.partial"
    other.write_text("another output's")
    with atomic_path(final) as tmp:
        tmp.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [final.name, alive.name, other.name]
    )
