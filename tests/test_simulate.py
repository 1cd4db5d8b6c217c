"""The simulator: real files, read back with cyvcf2 and bcftools, checked against the spec."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cyvcf2 import VCF

from snvbert.errors import SnvbertError
from snvbert.simulate import ArrayConfig, _array_noise, simulate

REPO = Path(__file__).resolve().parents[1]
VCFS = ("panel.vcf.gz", "truth.vcf.gz", "array.vcf.gz")
ALL_FILES = (*VCFS, *(f + ".tbi" for f in VCFS), "populations.tsv", "map.plink", "manifest.json")


@dataclass
class Vcf:
    """A small VCF read whole: sites, samples and (sites, people, 2) alleles (-1: missing)."""

    samples: list[str]
    chrom: list[str]
    pos: np.ndarray
    ref: list[str]
    alt: list[str]
    alleles: np.ndarray
    phased: np.ndarray  # (sites, people) bool

    @property
    def keys(self) -> list[tuple[str, int, str, str]]:
        return list(zip(self.chrom, self.pos.tolist(), self.ref, self.alt, strict=True))


def read_vcf(path: Path) -> Vcf:
    vcf = VCF(str(path))
    chrom, pos, ref, alt, alleles, phased = [], [], [], [], [], []
    for v in vcf:
        chrom.append(v.CHROM)
        pos.append(v.POS)
        ref.append(v.REF)
        alt.append(",".join(v.ALT))
        gt = v.genotype.array()  # (people, 3): allele, allele, phased
        alleles.append(gt[:, :2])
        phased.append(gt[:, 2] == 1)
    samples = list(vcf.samples)
    vcf.close()
    return Vcf(samples, chrom, np.array(pos), ref, alt, np.array(alleles), np.array(phased))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def panel_maf(panel: Vcf) -> np.ndarray:
    af = panel.alleles.reshape(len(panel.pos), -1).mean(axis=1)
    return np.minimum(af, 1 - af)


# --------------------------------------------------------------------------- files


def test_files_exist_and_parse(tiny_sim: Path) -> None:
    for name in ALL_FILES:
        assert (tiny_sim / name).is_file(), name
    for name in VCFS:
        header = subprocess.run(
            ["bcftools", "view", "-h", str(tiny_sim / name)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "##fileformat=VCFv4.2" in header
        assert "##contig=<ID=20,length=200000>" in header
        assert "##FORMAT=<ID=GT," in header
        assert "##source=snvbert.simulate seed=7 size=tiny" in header
        stats = subprocess.run(
            ["bcftools", "index", "-s", str(tiny_sim / name)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert stats[:2] == ["20", "200000"]
        assert int(stats[2]) == len(read_vcf(tiny_sim / name).pos)


def test_sites_are_biallelic_snvs_sorted_and_polymorphic(tiny_sim: Path) -> None:
    panel, truth = read_vcf(tiny_sim / "panel.vcf.gz"), read_vcf(tiny_sim / "truth.vcf.gz")
    assert panel.keys == truth.keys
    assert np.all(np.diff(panel.pos) > 0)
    assert 1 <= panel.pos[0] and panel.pos[-1] <= 200_000
    assert all(
        r in "ACGT" and a in "ACGT" and len(r) == len(a) == 1 and r != a
        for r, a in zip(panel.ref, panel.alt, strict=True)
    )
    assert len(set(zip(panel.ref, panel.alt, strict=True))) == 12  # all ordered base pairs occur
    both = np.concatenate([panel.alleles, truth.alleles], axis=1).reshape(len(panel.pos), -1)
    assert set(np.unique(both)) == {0, 1} and panel.phased.all() and truth.phased.all()
    carriers = both.sum(axis=1)
    assert np.all((carriers > 0) & (carriers < both.shape[1]))
    # REF comes from a reference haplotype, not always the ancestral allele: ALT is sometimes major.
    assert 0 < np.mean(panel.alleles.reshape(len(panel.pos), -1).mean(axis=1) > 0.5) < 0.5


def test_samples_and_populations(tiny_sim: Path) -> None:
    panel, truth = read_vcf(tiny_sim / "panel.vcf.gz"), read_vcf(tiny_sim / "truth.vcf.gz")
    assert panel.samples == [f"P{i:04d}" for i in range(1, 61)]
    assert truth.samples == [f"T{i:04d}" for i in range(1, 11)]
    rows = (tiny_sim / "populations.tsv").read_text().splitlines()
    assert rows[0] == "sample\tpopulation"
    pop = dict(row.split("\t") for row in rows[1:])
    assert list(pop) == panel.samples + truth.samples
    order = manifest(tiny_sim)["populations"]
    assert order == ["YRI", "CEU", "CHB"]
    panel_rank = [order.index(pop[s]) for s in panel.samples]
    assert panel_rank == sorted(panel_rank)  # sorted by population, as real panels are
    assert [panel_rank.count(i) for i in range(3)] == [20, 20, 20]
    assert sorted(pop[s] for s in truth.samples).count("YRI") == 4


# --------------------------------------------------------------------------- array


def test_array_sites_are_common_sparse_and_match_truth(tiny_sim: Path) -> None:
    panel, truth = read_vcf(tiny_sim / "panel.vcf.gz"), read_vcf(tiny_sim / "truth.vcf.gz")
    array = read_vcf(tiny_sim / "array.vcf.gz")
    index = {key: i for i, key in enumerate(truth.keys)}
    assert set(array.keys) <= set(index)
    rows = np.array([index[k] for k in array.keys])
    assert np.all(panel_maf(panel)[rows] >= 0.05)
    bins = (array.pos - 1) // 10_000
    assert len(np.unique(bins)) == len(bins)  # at most one per 10 kb
    assert len(bins) >= 0.8 * 200_000 / 10_000  # and nearly every bin has one
    assert array.samples == truth.samples
    assert np.array_equal(array.alleles, truth.alleles[rows])  # clean array: exactly the truth
    assert array.phased.all()


def test_noisy_array(tiny_sim: Path, tiny_sim_noisy: Path) -> None:
    for name in ("panel.vcf.gz", "truth.vcf.gz", "map.plink", "populations.tsv"):
        assert sha256(tiny_sim / name) == sha256(tiny_sim_noisy / name), name
    clean, noisy = read_vcf(tiny_sim / "array.vcf.gz"), read_vcf(tiny_sim_noisy / "array.vcf.gz")
    assert noisy.keys == clean.keys  # noise never moves the chip's sites
    assert not noisy.phased.any()
    missing = (noisy.alleles == -1).all(axis=2)
    assert 0 < missing.mean() < 0.08
    called = ~missing
    diff = np.abs(noisy.alleles.sum(axis=2) - clean.alleles.sum(axis=2))[called]
    assert np.all(diff <= 1) and diff.mean() < 0.05  # an error flips one allele of a call
    hets = noisy.alleles[called & (noisy.alleles.sum(axis=2) == 1)]
    assert {tuple(h) for h in hets} == {(0, 1), (1, 0)}  # het order drawn: phase is lost
    text = subprocess.run(
        ["bcftools", "view", "-H", str(tiny_sim_noisy / "array.vcf.gz")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "|" not in text and "./." in text


def test_array_noise_rates() -> None:
    """The noise model on many calls: rates as asked, one allele per error, phase lost."""
    rng = np.random.default_rng(0)
    truth = (rng.random((400, 2 * 500)) < 0.3).astype(np.uint8)
    cfg = ArrayConfig(error_rate=0.01, missing_rate=0.02, phased=False)
    calls, missing = _array_noise(truth, cfg, np.random.default_rng(1))
    assert missing.mean() == pytest.approx(0.02, rel=0.1)
    dosage_true = truth.reshape(400, 500, 2).sum(axis=2, dtype=np.int64)
    dosage = calls.reshape(400, 500, 2).sum(axis=2, dtype=np.int64)
    assert np.abs(dosage - dosage_true).max() == 1
    assert (dosage != dosage_true).mean() == pytest.approx(0.01, rel=0.15)
    hets = calls.reshape(400, 500, 2)[(dosage == 1) & (dosage_true == 1)]
    assert hets[:, 0].mean() == pytest.approx(0.5, abs=0.02)
    clean, none_missing = _array_noise(truth, ArrayConfig(), np.random.default_rng(1))
    assert np.array_equal(clean, truth) and not none_missing.any()


# --------------------------------------------------------------------------- map, manifest


def test_plink_map(tiny_sim: Path) -> None:
    rows = [line.split() for line in (tiny_sim / "map.plink").read_text().splitlines()]
    assert all(len(r) == 4 and r[0] == "20" and r[1] == "." for r in rows)
    cm = np.array([float(r[2]) for r in rows])
    bp = np.array([int(r[3]) for r in rows])
    assert bp[0] == 1 and bp[-1] == 200_000 and np.all(np.diff(bp) > 0)
    assert cm[0] == 0 and np.all(np.diff(cm) >= 0)
    assert cm[-1] == pytest.approx(manifest(tiny_sim)["genetic_length_cM"], abs=1e-5)
    rate = np.diff(cm) / np.diff(bp)
    assert rate.max() > 20 * rate.min()  # hotspots, not a flat map


def test_manifest_matches_files(tiny_sim: Path) -> None:
    m = manifest(tiny_sim)
    panel = read_vcf(tiny_sim / "panel.vcf.gz")
    truth = read_vcf(tiny_sim / "truth.vcf.gz")
    array = read_vcf(tiny_sim / "array.vcf.gz")
    assert (m["seed"], m["size"], m["demography"], m["chrom"], m["length_bp"]) == (
        7,
        "tiny",
        "OutOfAfrica_3G09",
        "20",
        200_000,
    )
    assert m["counts"] == {
        "panel_people": len(panel.samples),
        "target_people": len(truth.samples),
        "sites": len(panel.pos),
        "array_sites": len(array.pos),
    }
    bins = m["maf_spectrum"]["bins"]
    assert bins == [0.0, 0.001, 0.005, 0.01, 0.05, 0.5]
    assert m["maf_spectrum"]["sites"] == np.histogram(panel_maf(panel), bins=bins)[0].tolist()
    assert sorted(m["files"].values()) == sorted(ALL_FILES[:3] + ALL_FILES[6:])


# --------------------------------------------------------------------------- determinism, reuse


def test_same_seed_same_bytes_other_seed_other_data(tiny_sim: Path, tmp_path: Path) -> None:
    simulate(tmp_path / "again", seed=7, size="tiny")
    for name in ALL_FILES:
        assert sha256(tiny_sim / name) == sha256(tmp_path / "again" / name), name
    simulate(tmp_path / "other", seed=8, size="tiny")
    for name in ("panel.vcf.gz", "truth.vcf.gz", "map.plink"):
        assert sha256(tiny_sim / name) != sha256(tmp_path / "other" / name), name


def test_reuse_and_force(tiny_sim: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny_sim, out)
    before = {name: (out / name).stat().st_mtime_ns for name in ALL_FILES}
    assert simulate(out, seed=7, size="tiny") == manifest(tiny_sim)
    assert {name: (out / name).stat().st_mtime_ns for name in ALL_FILES} == before
    with pytest.raises(SnvbertError, match="other parameters"):
        simulate(out, seed=8, size="tiny")
    simulate(out, seed=8, size="tiny", force=True)
    assert manifest(out)["seed"] == 8
    (out / "truth.vcf.gz").unlink()  # incomplete: simulated again, no question asked
    simulate(out, seed=8, size="tiny")
    assert (out / "truth.vcf.gz").is_file()


def test_fewer_than_three_populations(tmp_path: Path) -> None:
    m = simulate(
        tmp_path,
        seed=1,
        size="tiny",
        demography="Africa_1T12",
        length_bp=50_000,
        panel=8,
        targets=2,
    )
    assert m["populations"] == ["AFR"]
    assert read_vcf(tmp_path / "panel.vcf.gz").alleles.shape[1] == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": "huge"}, "unknown size"),
        ({"demography": "Nope"}, "unknown demography"),
        ({"array": {"error_rate": 1.5}}, "array.error_rate"),
        ({"array": {"bogus": 1}}, "unknown array option"),
        ({"recombination": {"hotspot_share": "x"}}, "recombination.hotspot_share"),
        ({"array": {"phased": "no"}}, "array.phased must be true or false"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"panel": 2.5}, "panel must be an integer"),
    ],
)
def test_bad_parameters(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SnvbertError, match=message):
        simulate(tmp_path, **{"seed": 1, "size": "tiny", **kwargs})
    assert not (tmp_path / "manifest.json").exists()


# --------------------------------------------------------------------------- command line


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "snvbert.simulate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(tiny_sim: Path, tmp_path: Path) -> None:
    result = run_cli("out=sim", "seed=7", "size=tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "60 panel + 10 target people" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]  # no Hydra run folder or log
    for name in ALL_FILES:  # the command line and the function make the same files
        assert sha256(tiny_sim / name) == sha256(tmp_path / "sim" / name), name
    again = run_cli("out=sim", "seed=7", "size=tiny", cwd=tmp_path)
    assert again.returncode == 0 and "reusing" in again.stdout


def test_cli_bad_demography_is_one_line(tmp_path: Path) -> None:
    result = run_cli("out=sim", "seed=7", "size=tiny", "demography=Nope", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snvbert: error: unknown demography='Nope'")
    assert "Traceback" not in result.stderr + result.stdout
