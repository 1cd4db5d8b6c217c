"""Ingest benchmark: how fast a panel VCF becomes the cache, against ``bcftools query``.

    python -m snvbert.bench.ingest [OUT_DIR]        # default outputs/bench; writes ingest.json

The panel is the simulator's 5 Mb scenario (1,000 people = 2,000 haplotypes, ~40,000 sites) and
its first 10,000 records. For each, in the same run and interleaved (the machine is shared, so
the best of ``reps`` is kept): our cold ``load_panel`` (fresh cache directory: hash, parse,
write) against ``bcftools query -f '[%GT]\\n'`` to /dev/null, which parses the same genotypes and
prints them. A rate counts alleles (sites x haplotypes) per second. Each of our ingests runs in a
child process that reports its own peak RSS (VmHWM), so memory can be compared between the two
panel sizes: it should not grow with the number of sites. The result is extrapolated to
chr22 of 1000 Genomes (1 M sites x 5,008 haplotypes).

It also measures what bit-packing the cache would buy and cost, since that was a design choice.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from snvbert.utils.io import require_tool, write_bgzipped_vcf

CHR22 = {"sites": 1_000_000, "haplotypes": 5_008}

_PEAK = """
def peak_mb():
    # VmHWM: the peak RSS of this process image since exec. getrusage's ru_maxrss would also
    # count the parent's RSS at fork time (Linux keeps the pre-exec high-water mark), and so
    # measured the benchmark driver, not the ingest.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
_CHILD = (
    _PEAK
    + """
import json, sys, time
from snvbert.data.vcf import load_panel
t0 = time.perf_counter()
p = load_panel(sys.argv[1], cache_dir=sys.argv[2], progress=False)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "sites": p.n_sites, "haplotypes": p.n_haps, "peak_mb": peak_mb()}))
"""
)
_BASELINE = (
    _PEAK
    + """
import json, numpy, cyvcf2, snvbert.data.vcf
print(json.dumps({"peak_mb": peak_mb()}))
"""
)


def _child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter and return the JSON it prints."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env, check=True, text=True
    )
    return json.loads(done.stdout)


def _first_records(src: Path, n: int) -> Iterator[str]:
    with gzip.open(src, "rt") as f:
        kept = 0
        for line in f:
            if not line.startswith("#"):
                if kept == n:
                    return
                kept += 1
            yield line


def _synthetic_panel(out: Path, n_samples: int, n_sites: int, seed: int) -> Path:
    """A random phased panel, for when the simulator is not available."""
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(np.arange(1, 5_000_000), n_sites, replace=False))
    names = "\t".join(f"S{i}" for i in range(n_samples))

    def lines() -> Iterator[str]:
        yield "##fileformat=VCFv4.2\n##contig=<ID=20>\n"
        yield '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
        yield f"#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t{names}\n"
        for start in range(0, n_sites, 1000):
            m = min(1000, n_sites - start)
            haps = rng.random((m, 2 * n_samples)) < rng.beta(0.3, 3, size=(m, 1))
            text = np.empty((m, n_samples, 4), np.uint8)
            text[:, :, 0], text[:, :, 2] = 48 + haps[:, 0::2], 48 + haps[:, 1::2]
            text[:, :, 1], text[:, :, 3] = ord("|"), ord("\t")
            text[:, -1, 3] = ord("\n")
            for i in range(m):
                yield (
                    f"20\t{pos[start + i]}\t.\tA\tG\t.\tPASS\t.\tGT\t" + text[i].tobytes().decode()
                )

    return write_bgzipped_vcf(lines(), out)


def _panels(data: Path, seed: int) -> tuple[str, list[Path]]:
    try:
        from snvbert.simulate import simulate
    except ImportError:
        big, what = _synthetic_panel(data / "synthetic.vcf.gz", 1_000, 40_000, seed), "synthetic"
    else:
        simulate(data / "sim5mb", seed=seed, size="5mb")
        big, what = data / "sim5mb" / "panel.vcf.gz", "simulate size=5mb"
    small = data / "panel_10k.vcf.gz"
    if not small.exists():
        write_bgzipped_vcf(_first_records(big, 10_000), small)
    return what, [small, big]


def _bit_packing(cache: Path) -> dict:
    """What packing 8 haplotypes per byte would cost: build time, and reading 512-site windows."""
    haps = np.load(cache / "alleles.npy", mmap_mode="r")
    n_sites, n_haps = haps.shape
    t0 = time.perf_counter()
    packed = np.concatenate(
        [np.packbits(haps[s : s + 4096], axis=1) for s in range(0, n_sites, 4096)]
    )
    pack_s = time.perf_counter() - t0
    starts = np.random.default_rng(0).integers(0, max(1, n_sites - 512), 200)
    np.asarray(haps).sum()  # warm the page cache: compare decoding, not the disk
    t0 = time.perf_counter()
    for s in starts:
        np.array(haps[s : s + 512])
    plain_ms = (time.perf_counter() - t0) / len(starts) * 1e3
    t0 = time.perf_counter()
    for s in starts:
        np.unpackbits(packed[s : s + 512], axis=1, count=n_haps)
    unpack_ms = (time.perf_counter() - t0) / len(starts) * 1e3
    return {
        "pack_seconds": pack_s,
        "bytes_plain": int(haps.nbytes),
        "bytes_packed": int(packed.nbytes),
        "window512_read_ms_plain": plain_ms,
        "window512_read_ms_packed": unpack_ms,
    }


def run(out_dir: Path, *, reps: int = 2, seed: int = 1) -> dict:
    """Measure, print a table, write ``out_dir/ingest.json`` and return the figures."""
    out_dir = Path(out_dir)
    data = out_dir / "ingest_data"
    data.mkdir(parents=True, exist_ok=True)
    bcftools = require_tool("bcftools")
    what, panels = _panels(data, seed)
    baseline_mb = _child(_BASELINE)["peak_mb"]

    rows = []
    packing: dict = {}
    for panel in panels:
        ours, theirs, rss, shape = [], [], [], {}
        for _ in range(reps):
            cache = Path(tempfile.mkdtemp(prefix="ingest-cache-", dir=data))
            try:
                shape = _child(_CHILD, str(panel), str(cache))
                ours.append(shape["seconds"])
                rss.append(shape["peak_mb"])
                if panel == panels[-1] and not packing:
                    packing = _bit_packing(next(cache.iterdir()))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(
                [bcftools, "query", "-f", "[%GT]\n", str(panel)],
                stdout=subprocess.DEVNULL,
                check=True,
            )
            theirs.append(time.perf_counter() - t0)
        alleles = shape["sites"] * shape["haplotypes"]
        rows.append(
            {
                "file": panel.name,
                "sites": shape["sites"],
                "haplotypes": shape["haplotypes"],
                "file_mb": panel.stat().st_size / 1e6,
                "ours_seconds": min(ours),
                "ours_alleles_per_s": alleles / min(ours),
                "bcftools_seconds": min(theirs),
                "bcftools_alleles_per_s": alleles / min(theirs),
                "ours_peak_rss_mb": max(rss),
            }
        )

    big = rows[-1]
    chr22_alleles = CHR22["sites"] * CHR22["haplotypes"]
    result = {
        "panel": what,
        "reps": reps,
        "baseline_rss_mb": baseline_mb,
        "rows": rows,
        "chr22": {
            **CHR22,
            "ours_minutes": chr22_alleles / big["ours_alleles_per_s"] / 60,
            "bcftools_minutes": chr22_alleles / big["bcftools_alleles_per_s"] / 60,
            "cache_gb": chr22_alleles / 1e9,
        },
        "bit_packing": packing,
    }
    _print(result)
    (out_dir / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(r: dict) -> None:
    print(
        f"ingest benchmark ({r['panel']}; best of {r['reps']}; rate = alleles/s = sites x haplotypes / s)"
    )
    print(
        f"{'file':<18}{'sites':>8}{'haps':>7}{'MB':>7}{'ours s':>9}{'ours M/s':>10}"
        f"{'bcftools s':>12}{'bcft M/s':>10}{'peak RSS MB':>13}"
    )
    for w in r["rows"]:
        print(
            f"{w['file']:<18}{w['sites']:>8,}{w['haplotypes']:>7,}{w['file_mb']:>7.1f}"
            f"{w['ours_seconds']:>9.2f}{w['ours_alleles_per_s'] / 1e6:>10.1f}"
            f"{w['bcftools_seconds']:>12.2f}{w['bcftools_alleles_per_s'] / 1e6:>10.1f}"
            f"{w['ours_peak_rss_mb']:>13.0f}"
        )
    print(
        f"baseline RSS of the child (python + numpy + cyvcf2 imported): {r['baseline_rss_mb']:.0f} MB"
    )
    c = r["chr22"]
    print(
        f"chr22 extrapolated ({c['sites']:,} sites x {c['haplotypes']:,} haplotypes): ours "
        f"{c['ours_minutes']:.1f} min, bcftools query {c['bcftools_minutes']:.1f} min, "
        f"cache {c['cache_gb']:.1f} GB"
    )
    b = r["bit_packing"]
    print(
        f"bit packing: {b['bytes_plain'] / 1e6:.0f} -> {b['bytes_packed'] / 1e6:.0f} MB, packing "
        f"{b['pack_seconds']:.2f} s; a 512-site window reads in {b['window512_read_ms_plain']:.2f} ms "
        f"plain vs {b['window512_read_ms_packed']:.2f} ms packed"
    )


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/bench"))
