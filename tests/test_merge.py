"""Chunks and batches that merge: ``snvbert.impute region=`` and ``python -m snvbert.merge``."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from snvbert.errors import SnvbertError
from snvbert.impute import impute
from snvbert.merge import merge

FIXED = {"hmm_err": 1e-4, "progress": False}  # one mismatch rate for every batch


def records(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt") as fh:
        return [line.rstrip("\n").split("\t") for line in fh if not line.startswith("##")]


@pytest.fixture(scope="module")
def whole(tiny_sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "whole.vcf.gz"
    impute(
        None,
        tiny_sim / "panel.vcf.gz",
        tiny_sim / "array.vcf.gz",
        out,
        cache_dir=out.parent,
        **FIXED,
    )
    return out


def test_target_batches_merge_into_what_one_run_writes(tmp_path, tiny_sim, whole):
    """Two batches of people imputed apart (same hmm_err), merged: every record as one run over
    all of them writes it (AF and DR2 from the summed DOSESUMS)."""
    samples = subprocess.run(
        ["bcftools", "query", "-l", str(tiny_sim / "array.vcf.gz")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    parts = []
    for name, people in (("a", samples[:4]), ("b", samples[4:])):
        target = tmp_path / f"{name}.vcf.gz"
        subprocess.run(
            [
                "bcftools",
                "view",
                "-s",
                ",".join(people),
                "-Oz",
                "-o",
                str(target),
                str(tiny_sim / "array.vcf.gz"),
            ],
            check=True,
        )
        subprocess.run(["tabix", "-p", "vcf", str(target)], check=True)
        out = tmp_path / f"imputed-{name}.vcf.gz"
        impute(None, tiny_sim / "panel.vcf.gz", target, out, cache_dir=tmp_path, **FIXED)
        parts.append(out)
    merged = tmp_path / "merged.vcf.gz"
    assert merge(parts, merged) == "batches"
    got, want = records(merged), records(whole)
    assert got[0] == want[0] and len(got) == len(want)  # the #CHROM line: every person, in order
    assert got == want  # every record: site, AF, DR2, DOSESUMS, IMP, every sample column
    # bcftools reads it, with its index
    view = subprocess.run(
        ["bcftools", "view", "-H", "-r", "20", str(merged)], capture_output=True, text=True
    )
    assert view.returncode == 0 and len(view.stdout.splitlines()) == len(want) - 1


def test_region_chunks_ligate_over_their_overlap(tmp_path, tiny_sim, whole):
    """Two overlapping chunks (impute region=) ligate into every site of the whole run, each
    once and in order; a region over the whole chromosome writes what the whole run writes.
    Chunks change the HMM's scope (README, Scale: the measured cost on the demo panel)."""
    panel, target = tiny_sim / "panel.vcf.gz", tiny_sim / "array.vcf.gz"
    chunks = []
    for name, region in (("1", "20:1-120000"), ("2", "chr20:80,000-300000")):
        out = tmp_path / f"chunk{name}.vcf.gz"
        summary = impute(None, panel, target, out, cache_dir=tmp_path, region=region, **FIXED)
        assert summary["region"].startswith("20:")
        rows = records(out)[1:]
        lo, hi = (int(x.replace(",", "")) for x in region.split(":")[1].split("-"))
        assert all(lo <= int(r[1]) <= hi for r in rows)
        chunks.append(out)
    ligated = tmp_path / "ligated.vcf.gz"
    assert merge(list(reversed(chunks)), ligated) == "chunks"  # in any order
    got, want = records(ligated), records(whole)
    assert [r[:5] for r in got] == [r[:5] for r in want]
    ds = lambda rows: np.array([[float(x.split(":")[1]) for x in r[9:]] for r in rows[1:]])  # noqa: E731
    delta = np.abs(ds(got) - ds(want))
    print(f"ligated chunks vs the whole run: max |dDS| {delta.max():.3f}, mean {delta.mean():.4f}")
    full = tmp_path / "full-region.vcf.gz"
    impute(None, panel, target, full, cache_dir=tmp_path, region="20:1-250000000", **FIXED)
    assert records(full) == want


def test_what_cannot_merge_is_one_line(tmp_path, tiny_sim, whole):
    with pytest.raises(SnvbertError, match="at least two"):
        merge([whole], tmp_path / "x.vcf.gz")
    with pytest.raises(SnvbertError, match="no such file"):
        merge([whole, tmp_path / "nope.vcf.gz"], tmp_path / "x.vcf.gz")
    some = tmp_path / "some-people.vcf.gz"  # people of the whole run again: not another batch
    subprocess.run(
        ["bcftools", "view", "-s", "T0001,T0002", "-Oz", "-o", str(some), str(whole)], check=True
    )
    with pytest.raises(SnvbertError, match="target batches must hold different people"):
        merge([whole, some], tmp_path / "x.vcf.gz")
    plain = tmp_path / "plain.vcf.gz"
    with gzip.open(whole, "rt") as fh, gzip.open(plain, "wt") as sink:
        sink.writelines(line for line in fh if "DOSESUMS" not in line or not line.startswith("##"))
    with pytest.raises(SnvbertError, match="no DOSESUMS"):
        merge([whole, plain], tmp_path / "x.vcf.gz")
    with pytest.raises(SnvbertError, match="region=20:5-1"):
        impute(
            None,
            tiny_sim / "panel.vcf.gz",
            tiny_sim / "array.vcf.gz",
            tmp_path / "x.vcf.gz",
            region="20:5-1",
            **FIXED,
        )
    with pytest.raises(SnvbertError, match="panel holds chromosome 20"):
        impute(
            None,
            tiny_sim / "panel.vcf.gz",
            tiny_sim / "array.vcf.gz",
            tmp_path / "x.vcf.gz",
            region="7:1-100",
            **FIXED,
        )
    assert not (tmp_path / "x.vcf.gz").exists()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snvbert.merge",
            f"inputs=[{whole},{some}]",
            f"out={tmp_path / 'y.vcf.gz'}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "snvbert: error:"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "y.vcf.gz").exists()


def test_people_blocks_bound_memory_and_write_one_runs_records(tmp_path, tiny_sim, whole):
    """people_block=3: the 10 targets imputed and written in four blocks, merged into the
    records one block of everyone writes; no temporary file or folder is left."""
    out = tmp_path / "blocks.vcf.gz"
    impute(
        None,
        tiny_sim / "panel.vcf.gz",
        tiny_sim / "array.vcf.gz",
        out,
        cache_dir=tmp_path,
        people_block=3,
        **FIXED,
    )
    assert records(out) == records(whole)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() or ".partial" in p.name)
    assert all(not name.endswith(".partial") for name in left), left
