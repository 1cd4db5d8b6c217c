"""VCF -> cache: round trip, cache reuse and invalidation, skipped counts, and every bad input."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from cyvcf2 import VCF

from snvbert.data import vcf as vcfmod
from snvbert.data.vcf import load_panel, read_target
from snvbert.errors import SnvbertError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = ("S1", "S2", "S3")


def header(
    samples: Sequence[str] = SAMPLES, *, gt: bool = True, chroms: Sequence[str] = ("22",)
) -> str:
    lines = ["##fileformat=VCFv4.2"]
    lines += [f"##contig=<ID={c}>" for c in chroms]
    if gt:
        lines.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    lines.append('##FORMAT=<ID=DS,Number=1,Type=Float,Description="Dosage">')
    cols = "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"
    if samples:
        cols += "\tFORMAT\t" + "\t".join(samples)
    return "\n".join(lines) + "\n" + cols + "\n"


def rec(chrom: str | int, pos: int, ref: str, alt: str, *gts: str, fmt: str = "GT") -> str:
    return "\t".join([str(chrom), str(pos), ".", ref, alt, ".", "PASS", ".", fmt, *gts]) + "\n"


def write_vcf(path: Path, text: str, *, bgzip: bool = True) -> Path:
    if bgzip:
        subprocess.run(["bgzip", "-c"], input=text.encode(), stdout=path.open("wb"), check=True)
    else:
        path.write_text(text)
    return path


def random_panel(path: Path, n_samples: int = 50, n_sites: int = 500, seed: int = 0) -> np.ndarray:
    """A bgzipped VCF of random phased SNVs; returns its haplotypes (n_sites, 2 * n_samples)."""
    rng = np.random.default_rng(seed)
    haps = (rng.random((n_sites, 2 * n_samples)) < rng.random((n_sites, 1))).astype(np.uint8)
    pos = np.sort(rng.choice(np.arange(1000, 10_000_000), n_sites, replace=False))
    names = [f"P{i}" for i in range(n_samples)]
    body = "".join(
        rec(22, p, "A", "C", *(f"{h[2 * i]}|{h[2 * i + 1]}" for i in range(n_samples)))
        for p, h in zip(pos, haps, strict=True)
    )
    write_vcf(path, header(names) + body)
    return haps


def leftovers(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*")) if cache.exists() else []


# --- round trip ------------------------------------------------------------------------------


def direct_read(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """What cyvcf2 reads, record by record, with no cache in between."""
    pos, ids, rows = [], [], []
    for v in VCF(str(path), gts012=False):
        pos.append(v.POS)
        ids.append(f"{v.CHROM}:{v.POS}:{v.REF}:{v.ALT[0]}")
        rows.append(v.genotype.array()[:, :2].ravel())
    return np.array(pos), ids, np.array(rows, dtype=np.uint8)


def test_round_trip_simulated_panel(tiny_sim: Path, tmp_path: Path) -> None:
    panel = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=tmp_path / "c", progress=False)
    pos, ids, rows = direct_read(tiny_sim / "panel.vcf.gz")
    assert panel.skipped == {}
    np.testing.assert_array_equal(panel.pos, pos)
    assert panel.site_ids().tolist() == ids
    assert isinstance(panel.haplotypes, np.memmap) and not panel.haplotypes.flags.writeable
    np.testing.assert_array_equal(panel.haplotypes, rows)
    assert panel.samples == list(VCF(str(tiny_sim / "panel.vcf.gz")).samples)
    np.testing.assert_allclose(panel.alt_freq(), rows.mean(axis=1))
    assert len(panel.fingerprint) >= 16


def test_populations_from_simulation(tiny_sim: Path, tmp_path: Path) -> None:
    """populations.tsv lists panel and target people under a header: the panel's are picked."""
    panel = load_panel(
        tiny_sim / "panel.vcf.gz",
        cache_dir=tmp_path,
        populations=tiny_sim / "populations.tsv",
        progress=False,
    )
    assert panel.populations is not None and panel.populations.shape == (panel.n_samples,)
    assert "populations" in panel.summary()


def test_target_matches_truth(tiny_sim: Path) -> None:
    """A clean array is the truth at the typed sites, site ids included."""
    target = read_target(tiny_sim / "array.vcf.gz")
    truth = read_target(tiny_sim / "truth.vcf.gz")
    assert target.samples == truth.samples and target.n_sites > 0
    index = {s: i for i, s in enumerate(truth.site_ids())}
    rows = [index[s] for s in target.site_ids()]
    np.testing.assert_array_equal(target.genotypes, truth.genotypes[rows])
    assert target.phased.all()


@pytest.mark.parametrize("chunk_bytes", [vcfmod._CHUNK_BYTES, 6 * 50 * 7])
def test_round_trip_random_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    """Also with chunks of 7 records, so chunk boundaries are crossed many times."""
    monkeypatch.setattr(vcfmod, "_CHUNK_BYTES", chunk_bytes)
    haps = random_panel(tmp_path / "p.vcf.gz")
    panel = load_panel(tmp_path / "p.vcf.gz", cache_dir=tmp_path / "c", progress=False)
    assert (panel.n_sites, panel.n_samples, panel.n_haps) == (500, 50, 100)
    np.testing.assert_array_equal(panel.haplotypes, haps)
    assert panel.haplotypes.dtype == np.uint8
    np.testing.assert_array_equal(np.load(panel.cache_path / "alleles.npy"), haps)


def forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} should not run here")

    monkeypatch.setattr(vcfmod, name, fail)


def test_text_fast_path_equals_htslib_path(
    tiny_sim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clean panels are decoded from text with numpy; the result is the htslib path's, bit for bit."""
    src = tiny_sim / "panel.vcf.gz"
    with monkeypatch.context() as m:
        forbid(m, "_htslib_rows")
        fast = load_panel(src, cache_dir=tmp_path / "fast", progress=False)
    with monkeypatch.context() as m:
        m.setattr(vcfmod, "_text_readable", lambda path: False)
        slow = load_panel(src, cache_dir=tmp_path / "slow", progress=False)
    for name in ("pos", "ref", "alt", "haplotypes"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
    assert fast.skipped == slow.skipped and fast.samples == slow.samples


def test_other_formats_fall_back_to_htslib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = rec(22, 100, "A", "G", "0|1:1", "1|1:2", "0|0:0", fmt="GT:DS") + rec(
        22, 200, "C", "T", "1|0:1", "0|0:0", "0|1:1", fmt="GT:DS"
    )
    src = write_vcf(tmp_path / "p.vcf.gz", header() + body)
    forbid(monkeypatch, "_decode_calls")
    panel = load_panel(src, cache_dir=tmp_path / "c", progress=False)
    assert panel.haplotypes.tolist() == [[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 1]]


# --- cache -----------------------------------------------------------------------------------


def test_cache_reused_then_invalidated_by_content(tmp_path: Path) -> None:
    src = tmp_path / "p.vcf"
    text = (
        header()
        + rec(22, 100, "A", "G", "0|1", "1|1", "0|0")
        + rec(22, 200, "C", "T", "0|0", "0|1", "1|0")
    )
    write_vcf(src, text, bgzip=False)
    cache = tmp_path / "c"
    first = load_panel(src, cache_dir=cache, progress=False)
    assert not first.reused and "built" in first.summary()
    matrix = first.cache_path / "alleles.npy"
    stamp = matrix.stat().st_mtime_ns

    second = load_panel(src, cache_dir=cache, progress=False)
    assert second.reused and second.cache_path == first.cache_path
    assert matrix.stat().st_mtime_ns == stamp and "reused" in second.summary()

    # Same size and same mtime, different content: must not reuse the stale cache.
    st = src.stat()
    write_vcf(src, text.replace("0|1\t1|1\t0|0", "1|1\t1|1\t0|0"), bgzip=False)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size
    third = load_panel(src, cache_dir=cache, progress=False)
    assert not third.reused and third.cache_path != first.cache_path
    assert third.haplotypes[0].tolist() == [1, 1, 1, 1, 0, 0]


def test_options_get_their_own_cache_and_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    src = write_vcf(
        tmp_path / "p.vcf.gz",
        header()
        + rec(22, 100, "A", "G", "0|0", "0|0", "0|0")
        + rec(22, 200, "C", "T", "0|1", "0|0", "0|0"),
    )
    cache = tmp_path / "c"
    full = load_panel(src, cache_dir=cache, progress=False)
    poly = load_panel(src, cache_dir=cache, drop_monomorphic=True, progress=False)
    assert full.cache_path != poly.cache_path
    assert (full.n_sites, poly.n_sites) == (2, 1) and poly.skipped == {"monomorphic": 1}
    (full.cache_path / "sites.npz").unlink()
    again = load_panel(src, cache_dir=cache, progress=False)
    assert not again.reused and again.n_sites == 2


# --- what is skipped ---------------------------------------------------------------------------


@pytest.mark.parametrize("text_path", [True, False])
def test_skipped_by_reason_and_same_position_sites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text_path: bool
) -> None:
    if text_path:
        forbid(monkeypatch, "_htslib_rows")
    else:
        monkeypatch.setattr(vcfmod, "_text_readable", lambda path: False)
    gts = ("0|1", "1|0", "0|0")
    body = (
        rec(22, 100, "A", "G", *gts)
        + rec(22, 150, "A", "G,T", "0|2", "1|0", "0|0")  # multiallelic
        + rec(22, 160, "AT", "A", *gts)  # indel
        + rec(22, 170, "A", "<DEL>", *gts)  # symbolic
        + rec(22, 180, "A", "*", *gts)  # spanning deletion
        + rec(22, 190, "A", ".", "0|0", "0|0", "0|0")  # no ALT
        + rec(22, 200, "C", "T", "1|1", "0|0", "0|0")  # same position, ALT T before C in the file
        + rec(22, 200, "C", "A", "0|0", "1|1", "0|0")
        + rec(22, 200, "C", "T", "0|0", "0|0", "1|1")  # exact duplicate: the first is kept
        + rec(21, 250, "G", "A", *gts)  # other chromosome
        + rec(22, 300, "g", "a", *gts)  # lower case is still an SNV
    )
    src = write_vcf(tmp_path / "p.vcf.gz", header(chroms=("21", "22")) + body)
    panel = load_panel(src, cache_dir=tmp_path / "c", chrom="22", progress=False)
    assert panel.skipped == {
        "multiallelic": 1,
        "non_snv": 3,
        "no_alt": 1,
        "duplicate": 1,
        "other_chrom": 1,
    }
    assert panel.site_ids().tolist() == ["22:100:A:G", "22:200:C:A", "22:200:C:T", "22:300:G:A"]
    assert panel.haplotypes[1].tolist() == [0, 0, 1, 1, 0, 0]
    assert panel.haplotypes[2].tolist() == [1, 1, 0, 0, 0, 0]
    summary = panel.summary()
    assert "4 biallelic SNVs" in summary and "1 multiallelic" in summary and "3 non_snv" in summary

    target = read_target(src, chrom="chr22")  # a 'chr' prefix difference is tolerated
    assert target.site_ids().tolist() == panel.site_ids().tolist()
    assert target.skipped == panel.skipped


def test_alt_freq_on_a_subset(tmp_path: Path) -> None:
    body = rec(22, 100, "A", "G", "0|1", "1|1", "0|0") + rec(22, 200, "C", "T", "1|1", "0|0", "0|1")
    src = write_vcf(tmp_path / "p.vcf.gz", header() + body)
    panel = load_panel(src, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_allclose(panel.alt_freq(np.array([0, 2])), [1 / 4, 3 / 4])
    np.testing.assert_allclose(panel.alt_freq(np.array([False, True, False])), [1.0, 0.0])
    np.testing.assert_allclose(panel.alt_freq(), [3 / 6, 3 / 6])
    with pytest.raises(ValueError):
        panel.alt_freq(np.array([3]))


def test_populations_file(tmp_path: Path) -> None:
    src = write_vcf(tmp_path / "p.vcf.gz", header() + rec(22, 100, "A", "G", "0|1", "1|1", "0|0"))
    pops = tmp_path / "pops.txt"
    pops.write_text("sample pop super_pop\nS3 YRI AFR\nS1 CEU EUR\nX9 JPT EAS\nS2 CEU EUR\n")
    panel = load_panel(src, cache_dir=tmp_path / "c", populations=pops, progress=False)
    assert panel.populations.tolist() == ["CEU", "CEU", "YRI"]
    pops.write_text("S1\tCEU\nS2\tCEU\n")
    with pytest.raises(SnvbertError, match=r"pops.txt: has no population for 1 of 3 .*S3"):
        load_panel(src, cache_dir=tmp_path / "c", populations=pops, progress=False)


def test_target_keeps_unphased_and_missing(tmp_path: Path) -> None:
    body = rec(22, 100, "A", "G", "0/1", "./.", "1|1") + rec(22, 200, "C", "T", ".", "0|1", "1/0")
    target = read_target(write_vcf(tmp_path / "t.vcf.gz", header() + body))
    assert target.genotypes.dtype == np.int8
    assert target.genotypes.tolist() == [[0, 1, -1, -1, 1, 1], [-1, -1, 0, 1, 1, 0]]
    assert target.phased[:, [0, 2]].tolist() == [[False, True], [True, False]]


# --- bad input ---------------------------------------------------------------------------------

OK = ("0|1", "1|0", "0|0")
BAD_PANELS = {
    # name: (file text, bgzip?, expected message fragment, record named)
    "unphased": (
        header() + rec(22, 100, "A", "G", *OK) + rec(22, 200, "A", "G", "0|1", "0/1", "0|0"),
        True,
        "phase it first, e.g. with Beagle or SHAPEIT",
        "22:200",
    ),
    "missing": (
        header() + rec(22, 100, "A", "G", *OK) + rec(22, 200, "A", "G", "0|1", "0|1", ".|."),
        True,
        "missing genotype",
        "22:200",
    ),
    "unsorted": (
        header() + rec(22, 300, "A", "G", *OK) + rec(22, 200, "A", "G", *OK),
        True,
        "not sorted",
        "22:200",
    ),
    "several_chroms": (
        header(chroms=("21", "22")) + rec(22, 100, "A", "G", *OK) + rec(21, 50, "A", "G", *OK),
        True,
        "pass chrom=",
        "21:50",
    ),
    "haploid": (header() + rec(22, 100, "A", "G", "0", "1", "0"), True, "haploid", "22:100"),
    "mixed_ploidy": (
        header() + rec(22, 100, "A", "G", *OK) + rec(22, 200, "A", "G", "0|1", "1", "0|0"),
        True,
        "mixed ploidy",
        "22:200",
    ),
    "first_problem_wins": (
        header()
        + rec(22, 100, "A", "G", "0/1", "0|1", "0|0")
        + rec(22, 200, "A", "G", "0", "1", "0"),
        True,
        "unphased",
        "22:100",
    ),
    "no_gt_in_header": (
        header(gt=False) + rec(22, 100, "A", "G", "1", "0", "2", fmt="DS"),
        True,
        "no GT",
        None,
    ),
    "no_gt_in_record": (
        header() + rec(22, 100, "A", "G", *OK) + rec(22, 200, "A", "G", "1", "0", "2", fmt="DS"),
        True,
        "no GT",
        "22:200",
    ),
    "no_samples": (header(samples=()) + "22\t100\t.\tA\tG\t.\tPASS\t.\n", True, "no samples", None),
    "no_records": (header(), True, "no records", None),
    "only_indels": (header() + rec(22, 100, "AT", "A", *OK), True, "no biallelic SNVs", None),
    "not_a_vcf": ("chrom,pos,ref,alt\n22,100,A,G\n", False, "not a VCF", None),
    "not_a_vcf_bgzipped": ("hello world\n", True, "not a VCF", None),
    "truncated_text": (header() + rec(22, 100, "A", "G", *OK)[:-6], False, "truncated", None),
}


def assert_clean_error(err: SnvbertError, path: Path, fragment: str, record: str | None) -> None:
    text = str(err)
    assert "\n" not in text
    assert str(path) in text and fragment in text
    if record is not None:
        assert f"{path} at {record}:" in text


@pytest.mark.parametrize("case", sorted(BAD_PANELS))
def test_bad_panel(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text, compress, fragment, record = BAD_PANELS[case]
    monkeypatch.setattr(vcfmod, "_CHUNK_BYTES", 6 * 3)  # one record per chunk: errors mid-write
    src = write_vcf(tmp_path / ("p.vcf.gz" if compress else "p.vcf"), text, bgzip=compress)
    cache = tmp_path / "cache"
    with pytest.raises(SnvbertError) as info:
        load_panel(src, cache_dir=cache, progress=False)
    assert_clean_error(info.value, src, fragment, record)
    assert leftovers(cache) == [] and not cache.exists()


def test_bad_container(tmp_path: Path) -> None:
    """Empty, truncated, plain-gzip and garbage files are refused before anything is written."""
    good = header() + "".join(rec(22, 100 + i, "A", "G", *OK) for i in range(200))
    whole = write_vcf(tmp_path / "whole.vcf.gz", good).read_bytes()
    cases = {
        "empty.vcf.gz": (b"", "empty"),
        "truncated.vcf.gz": (whole[: len(whole) - 40], "truncated"),
        "gzip.vcf.gz": (gzip.compress(good.encode()), "not bgzip"),
        "garbage.vcf.gz": (bytes(range(256)) * 4, "not a VCF"),
        "only_eof.vcf.gz": (vcfmod._BGZF_EOF, "empty"),
    }
    cache = tmp_path / "cache"
    for name, (data, fragment) in cases.items():
        src = tmp_path / name
        src.write_bytes(data)
        with pytest.raises(SnvbertError) as info:
            load_panel(src, cache_dir=cache, progress=False)
        assert_clean_error(info.value, src, fragment, None)
        with pytest.raises(SnvbertError, match=fragment):
            read_target(src)
    assert not cache.exists()
    with pytest.raises(SnvbertError, match="file not found"):
        load_panel(tmp_path / "absent.vcf.gz", cache_dir=cache)


def test_plain_text_named_gz_is_read(tmp_path: Path) -> None:
    """htslib reads uncompressed VCF whatever the name, so we do too."""
    src = write_vcf(tmp_path / "plain.vcf.gz", header() + rec(22, 100, "A", "G", *OK), bgzip=False)
    assert load_panel(src, cache_dir=tmp_path / "c", progress=False).n_sites == 1


@pytest.mark.parametrize("case", ["haploid", "mixed_ploidy", "unsorted", "several_chroms"])
def test_bad_target(case: str, tmp_path: Path) -> None:
    text, compress, fragment, record = BAD_PANELS[case]
    src = write_vcf(tmp_path / "t.vcf.gz", text)
    with pytest.raises(SnvbertError) as info:
        read_target(src)
    assert_clean_error(info.value, src, fragment, record)


def test_wrong_chrom_requested(tmp_path: Path) -> None:
    src = write_vcf(tmp_path / "p.vcf.gz", header() + rec(22, 100, "A", "G", *OK))
    with pytest.raises(SnvbertError, match=r"no records on chromosome 7 \(it has: 22\)"):
        load_panel(src, cache_dir=tmp_path / "c", chrom="7", progress=False)
    with pytest.raises(SnvbertError, match="no records on chromosome 7"):
        read_target(src, chrom="7")


# --- command line ------------------------------------------------------------------------------


def run_prepare(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "snvbert.prepare", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_summary_and_leaves_no_run_folder(tmp_path: Path) -> None:
    src = write_vcf(
        tmp_path / "p.vcf.gz", header() + rec(22, 100, "A", "G", *OK) + rec(22, 120, "A", "GT", *OK)
    )
    work = tmp_path / "work"
    work.mkdir()
    done = run_prepare(work, f"vcf={src}", "cache_dir=cc")
    assert done.returncode == 0, done.stderr
    assert "1 biallelic SNVs kept" in done.stdout and "1 non_snv" in done.stdout
    assert [p.name for p in work.iterdir()] == ["cc"]
    again = run_prepare(work, f"vcf={src}", "cache_dir=cc")
    assert "reused" in again.stdout


@pytest.mark.parametrize("args", [["vcf={bad}"], []])
def test_cli_bad_input_is_one_line(tmp_path: Path, args: list[str]) -> None:
    bad = write_vcf(tmp_path / "bad.vcf.gz", BAD_PANELS["unphased"][0])
    done = run_prepare(tmp_path, *(a.format(bad=bad) for a in args), "cache_dir=cc")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snvbert: error: ")
    assert not (tmp_path / "cc").exists()
