"""VCF -> on-disk cache: a reference panel read once, memory-mapped ever after.

A phased panel is read with cyvcf2 (htslib) into a cache directory named by the content hash of
the VCF and the options that change what is kept::

    <cache_dir>/<sha256[:16]>-<options hash>/
        alleles.npy   uint8 (n_sites, 2 * n_samples), 0 = REF, 1 = ALT; column 2i+j = sample i, phase j
        sites.npz     pos (int64), ref, alt ('<U1')
        meta.json     samples, chrom, skipped-by-reason, source, fingerprint, cache version

The allele matrix is memory-mapped on load, so a chr22-sized panel (1 M sites x 5,000 haplotypes,
5 GB) never has to fit in RAM, and it is written sequentially in chunks, so building it needs
memory for one chunk only. It is not bit-packed: every consumer (windows, retrieval, allele
frequencies) slices rows of 0/1 bytes, and unpacking on each access would cost more than the disk
it saves. The cache is built in a temporary directory and renamed into place when complete, so a
cache directory that exists is a complete one; a failed or interrupted build leaves nothing.

Only biallelic SNVs are kept. Sites are keyed by CHROM:POS:REF:ALT and ordered by (POS, ALT);
two records at one position with different ALT alleles are two sites. Everything else is skipped
and counted by reason. Input that cannot be a valid panel (unphased or missing genotypes, unsorted
positions, several chromosomes, haploid or mixed ploidy, a truncated, empty or non-VCF file) is a
:class:`~snvbert.errors.SnvbertError` naming the file, the record and what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from snvbert.errors import SnvbertError
from snvbert.utils.io import partial_prefix, remove_stale_partials

CACHE_VERSION = 1
"""Bump when the cache layout or the rules for what is kept change: old caches are then ignored."""

# The 28-byte empty block every complete BGZF file ends with (SAM/BAM specification, 4.1.2).
_BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
_NUCLEOTIDES = frozenset("ACGT")
_CHUNK_BYTES = 32 << 20  # genotype bytes per chunk: bounds memory whatever the number of sites
_NPY_HEADER_BYTES = 128  # fixed, so the header can be written once the number of sites is known
_READ_THREADS = 2  # one extra htslib thread decompresses BGZF while Python consumes records


@dataclass
class Panel:
    """A phased reference panel: biallelic SNV sites x haplotypes, backed by the on-disk cache."""

    source: Path
    fingerprint: str
    chrom: str
    pos: np.ndarray
    ref: np.ndarray
    alt: np.ndarray
    samples: list[str]
    populations: np.ndarray | None
    haplotypes: np.ndarray
    skipped: dict[str, int]
    cache_path: Path | None = None
    reused: bool = False
    build_seconds: float | None = None

    @property
    def n_sites(self) -> int:
        return int(self.pos.shape[0])

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    @property
    def n_haps(self) -> int:
        return 2 * len(self.samples)

    def site_ids(self) -> np.ndarray:
        """``chrom:pos:ref:alt`` for every site: the key that aligns panel, target and truth."""
        return _site_ids(self.chrom, self.pos, self.ref, self.alt)

    def alt_freq(self, samples: np.ndarray | None = None) -> np.ndarray:
        """ALT allele frequency per site over both haplotypes of ``samples`` (all when None).

        ``samples`` is an array of sample indices or a boolean mask over samples; callers pass
        the training split so that frequencies never leak from validation or test people. The
        matrix is read in row chunks, so memory stays bounded on a chromosome-sized panel.
        """
        cols: np.ndarray | None = None
        n_cols = self.n_haps
        if samples is not None:
            idx = np.asarray(samples)
            if idx.dtype == bool:
                if idx.shape != (self.n_samples,):
                    raise ValueError(
                        f"sample mask has shape {idx.shape}, expected ({self.n_samples},)"
                    )
                idx = np.flatnonzero(idx)
            idx = idx.astype(np.int64, copy=False).ravel()
            if idx.size == 0:
                raise ValueError("alt_freq needs at least one sample")
            if idx.min() < 0 or idx.max() >= self.n_samples:
                raise ValueError(f"sample index out of range 0..{self.n_samples - 1}")
            cols = np.stack([2 * idx, 2 * idx + 1], axis=1).ravel()
            n_cols = cols.size
        out = np.empty(self.n_sites, dtype=np.float64)
        rows = max(1, _CHUNK_BYTES // max(1, self.n_haps))
        for start in range(0, self.n_sites, rows):
            block = np.asarray(self.haplotypes[start : start + rows])
            if cols is not None:
                block = block[:, cols]
            out[start : start + block.shape[0]] = block.sum(axis=1, dtype=np.int64) / n_cols
        return out

    def summary(self) -> str:
        """What was kept, what was skipped and why, and where the cache is: for people."""
        lines = [f"panel      {self.source}"]
        span = f", positions {self.pos[0]:,}-{self.pos[-1]:,}" if self.n_sites else ""
        lines.append(f"chromosome {self.chrom}{span}")
        lines.append(f"sites      {self.n_sites:,} biallelic SNVs kept")
        if self.skipped:
            reasons = ", ".join(f"{n:,} {why}" for why, n in sorted(self.skipped.items()))
            lines.append(f"skipped    {sum(self.skipped.values()):,} records: {reasons}")
        else:
            lines.append("skipped    none")
        lines.append(f"samples    {self.n_samples:,} ({self.n_haps:,} haplotypes)")
        if self.populations is not None:
            names, counts = np.unique(self.populations, return_counts=True)
            pops = ", ".join(f"{p} {c:,}" for p, c in zip(names, counts, strict=True))
            lines.append(f"populations {pops}")
        size = self.n_sites * self.n_haps
        how = "reused (source unchanged)" if self.reused else "built"
        if not self.reused and self.build_seconds is not None:
            how += f" in {self.build_seconds:.1f} s"
        lines.append(f"cache      {self.cache_path} ({size / 1e6:,.1f} MB, {how})")
        return "\n".join(lines)


@dataclass
class Target:
    """A target (genotyping-array) VCF held in memory: it may be unphased and have missing calls.

    ``genotypes`` is int8 (n_sites, 2 * n_samples), -1 = missing; ``phased`` is per call. Whether
    unphased or missing calls are acceptable is for the caller (impute) to judge.
    """

    source: Path
    chrom: str
    pos: np.ndarray
    ref: np.ndarray
    alt: np.ndarray
    samples: list[str]
    genotypes: np.ndarray
    phased: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_sites(self) -> int:
        return int(self.pos.shape[0])

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    def site_ids(self) -> np.ndarray:
        """``chrom:pos:ref:alt`` for every site."""
        return _site_ids(self.chrom, self.pos, self.ref, self.alt)


def load_panel(
    path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike = ".snvbert_cache",
    chrom: str | None = None,
    populations: str | os.PathLike | None = None,
    drop_monomorphic: bool = False,
    progress: bool = True,
) -> Panel:
    """Read a phased panel VCF/BCF, building its cache on first use and reusing it after.

    The cache is keyed by the SHA-256 of the file's bytes (plus ``chrom`` and
    ``drop_monomorphic``), so an edited file is always re-read, whatever its timestamps say;
    hashing runs at disk speed, far faster than parsing. ``chrom`` selects one chromosome from
    a multi-chromosome file (a ``chr`` prefix difference is tolerated); without it, a file with
    several chromosomes is an error. ``populations`` is a text file of ``sample population``
    lines (a header line is allowed), read on every load, not cached.
    """
    path = Path(path)
    _check_file(path)
    fingerprint = _sha256(path)
    options = {"chrom": chrom, "drop_monomorphic": bool(drop_monomorphic), "version": CACHE_VERSION}
    opt_hash = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    root = Path(cache_dir)
    final = root / f"{fingerprint[:16]}-{opt_hash}"

    panel: Panel | None = None
    if (final / "meta.json").exists():
        try:
            panel = _open_cache(final, path, expect_fingerprint=fingerprint)
            panel.reused = True
        except (OSError, ValueError, KeyError):
            # Damaged by hand (a file deleted or edited): rebuild rather than fail.
            shutil.rmtree(final, ignore_errors=True)
    if panel is None:
        started = time.perf_counter()
        _build_cache(path, root, final, fingerprint, options, progress=progress)
        panel = _open_cache(final, path, expect_fingerprint=fingerprint)
        panel.build_seconds = time.perf_counter() - started
    if populations is not None:
        panel.populations = _read_populations(Path(populations), panel.samples)
    return panel


def read_target(path: str | os.PathLike, *, chrom: str | None = None) -> Target:
    """Read a target VCF (array sites) into memory.

    Unphased and missing calls are kept (-1 = missing); haploid or mixed ploidy, unsorted
    positions and several chromosomes are errors, as for a panel. Sites are filtered and ordered
    exactly as :func:`load_panel` does, so that site ids match.
    """
    path = Path(path)
    _check_file(path)
    skipped: dict[str, int] = {}
    pos_parts: list[np.ndarray] = []
    ref_parts: list[list[str]] = []
    alt_parts: list[list[str]] = []
    gt_parts: list[np.ndarray] = []
    ph_parts: list[np.ndarray] = []
    with _open_vcf(path) as vcf:
        samples = list(vcf.samples)  # type: ignore[attr-defined]
        reader = _Reader(vcf, path, chrom, skipped, progress=False)
        for chunk in reader.chunks():
            chunk.check(samples, path, panel=False)
            alleles = chunk.gt[:, :, :2]
            # A lone '.' in a diploid file reads as (missing, vector-end): a missing diploid call.
            gts = np.where(alleles < 0, -1, alleles).astype(np.int8)
            gt_parts.append(gts.reshape(len(chunk.pos), -1))
            ph_parts.append(chunk.gt[:, :, 2].astype(bool))
            pos_parts.append(chunk.pos)
            ref_parts.append(chunk.ref)
            alt_parts.append(chunk.alt)
        file_chrom = reader.chrom
    n = len(samples)
    pos = np.concatenate(pos_parts) if pos_parts else np.empty(0, np.int64)
    ref = np.array([r for part in ref_parts for r in part], dtype="<U1")
    alt = np.array([a for part in alt_parts for a in part], dtype="<U1")
    genotypes = np.concatenate(gt_parts) if gt_parts else np.empty((0, 2 * n), np.int8)
    phased = np.concatenate(ph_parts) if ph_parts else np.empty((0, n), bool)
    order = _site_order(pos, ref, alt)
    if order is not None:
        pos, ref, alt = pos[order], ref[order], alt[order]
        genotypes, phased = genotypes[order], phased[order]
    return Target(
        path, file_chrom or (chrom or ""), pos, ref, alt, samples, genotypes, phased, skipped
    )


# --- file checks -------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Reject what htslib would misread or only warn about, before anything is written.

    cyvcf2 reports a truncated BGZF file only as a warning on stderr and then stops early, and
    it opens some garbage files without complaint, so the container is checked here: a BGZF
    file must end with the BGZF end-of-file block, a gzip file must be BGZF (htslib cannot read
    plain gzip by record), and the text must begin as a VCF (or the data as a BCF). Plain,
    uncompressed VCF is accepted: htslib reads it, whatever its name.
    """
    if not path.exists():
        raise SnvbertError("file not found; check the path", path=path)
    if path.is_dir():
        raise SnvbertError("is a directory; pass a .vcf, .vcf.gz or .bcf file", path=path)
    size = path.stat().st_size
    if size == 0:
        raise SnvbertError("the file is empty; re-create or re-download it", path=path)
    with open(path, "rb") as f:
        head = f.read(18)
        f.seek(max(0, size - len(_BGZF_EOF)))
        tail = f.read()
    if head[:2] == b"\x1f\x8b":
        # BGZF = gzip with FEXTRA set and a 'BC' subfield (SAM/BAM specification, 4.1).
        if len(head) < 18 or not head[3] & 4 or head[12:14] != b"BC":
            raise SnvbertError(
                f"is compressed with plain gzip, not bgzip (BGZF), which htslib needs; "
                f"recompress it: zcat {path} | bgzip > fixed.vcf.gz",
                path=path,
            )
        if tail != _BGZF_EOF:
            raise SnvbertError(
                "is truncated (the BGZF end-of-file block is missing): it was cut short while "
                "being written or copied; re-create or re-download it",
                path=path,
            )
        try:
            with gzip.open(path, "rb") as g:
                text = g.read(16)
        except (OSError, EOFError, zlib.error) as err:
            raise SnvbertError(f"cannot be decompressed ({err}); re-create it", path=path) from err
        if not text:
            raise SnvbertError("the file is empty (no header, no records)", path=path)
    else:
        text = head
    if not (text.startswith(b"##fileformat=VCF") or text.startswith(b"BCF\x02")):
        raise SnvbertError(
            "is not a VCF or BCF file (it does not begin with '##fileformat=VCF'); pass a VCF",
            path=path,
        )
    if text is head and head.startswith(b"#") and not tail.endswith(b"\n"):
        raise SnvbertError(
            "is truncated (its last line is incomplete); re-create or re-download it", path=path
        )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _open_vcf(path: Path) -> Iterator[object]:
    """Open with cyvcf2 and check what every reader needs: samples and a GT field."""
    from cyvcf2 import VCF  # imported here: cyvcf2 loads htslib, which other commands never need

    try:
        vcf = VCF(str(path), gts012=False, lazy=True, threads=_READ_THREADS)
    except OSError as err:
        raise SnvbertError(
            f"htslib could not open it as a VCF ({err}); check the file", path=path
        ) from err
    try:
        if not vcf.samples:
            raise SnvbertError(
                "has no samples (a sites-only VCF); a panel or target needs genotype columns",
                path=path,
            )
        if not vcf.contains("GT"):
            raise SnvbertError(
                "has no GT (genotype) field in its header; snvbert reads genotypes from GT",
                path=path,
            )
        yield vcf
    finally:
        vcf.close()


# --- the read loop -----------------------------------------------------------------------


@dataclass
class _Chunk:
    """Kept records, in file order: genotypes as cyvcf2 gives them, int16 (m, n_samples, 3)."""

    chrom: str
    pos: np.ndarray
    ref: list[str]
    alt: list[str]
    gt: np.ndarray  # [..., 0:2] allele indices (-1 missing, -2 vector end), [..., 2] phased flag

    def record(self, row: int) -> str:
        return f"{self.chrom}:{self.pos[row]}"

    def check(self, samples: list[str], path: Path, *, panel: bool) -> None:
        """Raise for the first bad genotype call in file order; a panel also needs complete phase.

        This scans every call several times; a panel's reader first runs one cheap test over the
        chunk and comes here only when it fails.
        """
        a0, a1, phased = self.gt[:, :, 0], self.gt[:, :, 1], self.gt[:, :, 2]
        problems = {
            # A call beside a vector-end marker (-2) is a haploid call in a diploid file; a lone
            # '.' reads as (-1, -2) and is a missing call, not a haploid one.
            "mixed": (a1 == -2) & (a0 != -1),
            "allele": (a0 > 1) | (a1 > 1),
        }
        if panel:
            problems["missing"] = (a0 < 0) | (a1 < 0)
            problems["unphased"] = phased == 0
        first: tuple[int, int, str] | None = None
        for kind, bad in problems.items():
            rows = np.flatnonzero(bad.any(axis=1))
            if rows.size and (first is None or rows[0] < first[0]):
                first = (int(rows[0]), int(np.flatnonzero(bad[rows[0]])[0]), kind)
        if first is None:
            return
        row, sample, kind = first
        who = samples[sample]
        message = {
            "mixed": f"mixed ploidy: sample {who} has a haploid call among diploid ones (e.g. chrX "
            "of a male); snvbert needs diploid genotypes throughout",
            "allele": f"sample {who} has an allele index beyond the one ALT allele; fix the record "
            "(bcftools norm --check-ref)",
            "missing": f"sample {who} has a missing genotype; a reference panel must be complete: "
            "impute and phase it first (e.g. with Beagle)",
            "unphased": f"sample {who} has an unphased genotype ('/'); a reference panel must be "
            "phased: phase it first, e.g. with Beagle or SHAPEIT",
        }[kind]
        raise SnvbertError(message, path=path, record=self.record(row))


# A chunk of kept sites: pos int64 (m,), REF and ALT letters, haplotypes uint8 (m, 2 * n_samples).
_Rows = tuple[np.ndarray, list[str], list[str], np.ndarray]


def _same_chrom(a: str, b: str) -> bool:
    """Chromosome names equal up to a 'chr' prefix (GRCh37 '22' vs GRCh38 'chr22' style)."""
    return a.removeprefix("chr") == b.removeprefix("chr")


class _Reader:
    """Walk the records once: check order and ploidy, skip and count non-SNVs, yield chunks.

    The per-record work is kept to what must be per record (a handful of attribute reads and one
    ``genotype.array()`` copy into a preallocated buffer); every check over samples is done on
    a whole chunk with numpy.
    """

    def __init__(
        self, vcf: object, path: Path, chrom: str | None, skipped: dict[str, int], *, progress: bool
    ):
        self.vcf = vcf
        self.path = path
        self.want = chrom
        self.skipped = skipped
        self.progress = progress
        self.chrom: str | None = None
        self.last_pos = -1
        self.seen_here: set[tuple[str, str]] = set()  # (ref, alt) already kept at last_pos
        self.other_chroms: set[str] = set()
        self.n_samples = len(vcf.samples)  # type: ignore[attr-defined]

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def site(self, c: str, p: int, ref: str, alt_list: list[str]) -> tuple[str, str] | None:
        """The rules for one record's site, shared by both read paths: (REF, ALT) to keep, None
        when skipped (and counted), an error when the file is unusable at this record."""
        if c != self.chrom:
            if self.want is not None and not _same_chrom(c, self.want):
                self._skip("other_chrom")
                self.other_chroms.add(c)
                return None
            if self.chrom is None:
                self.chrom = c
            elif self.want is None:
                raise SnvbertError(
                    f"holds more than one chromosome ({self.chrom}, then {c}) where one is "
                    "expected; pass chrom=NAME to use one of them",
                    path=self.path,
                    record=f"{c}:{p}",
                )
            else:
                raise SnvbertError(
                    f"names chromosome {self.want} both as {self.chrom} and as {c}; rename the "
                    "contigs consistently (bcftools annotate --rename-chrs)",
                    path=self.path,
                    record=f"{c}:{p}",
                )
        if p != self.last_pos:
            if p < self.last_pos:
                raise SnvbertError(
                    f"positions are not sorted (position {p} follows {self.last_pos}); sort it: "
                    f"bcftools sort -Oz -o sorted.vcf.gz {self.path}",
                    path=self.path,
                    record=f"{c}:{p}",
                )
            self.last_pos = p
            self.seen_here.clear()
        if len(alt_list) != 1:
            self._skip("multiallelic" if alt_list else "no_alt")
            return None
        r = ref.upper()
        a = alt_list[0].upper()
        if r not in _NUCLEOTIDES or a not in _NUCLEOTIDES or r == a:
            self._skip("non_snv")  # indels, MNPs, symbolic alleles (<DEL>), '*', N
            return None
        if (r, a) in self.seen_here:
            self._skip("duplicate")
            return None
        self.seen_here.add((r, a))
        return r, a

    def _accept(self, v: object) -> tuple[int, str, str, np.ndarray] | None:
        """(pos, ref, alt, genotypes) of a record to keep; None when skipped; raise when bad."""
        c = v.CHROM  # type: ignore[attr-defined]
        p = v.POS  # type: ignore[attr-defined]
        site = self.site(c, p, v.REF, v.ALT)  # type: ignore[attr-defined]
        if site is None:
            return None
        r, a = site
        try:
            g = v.genotype.array()  # type: ignore[attr-defined]
        except Exception as err:  # cyvcf2 raises a bare Exception when GT is absent
            raise SnvbertError(
                "the record has no GT (genotype) field; every record needs one",
                path=self.path,
                record=f"{c}:{p}",
            ) from err
        if g.shape[1] != 3:
            ploidy = g.shape[1] - 1
            kind = "haploid" if ploidy == 1 else f"{ploidy}-ploid"
            raise SnvbertError(
                f"genotypes are {kind}; snvbert needs diploid genotypes (autosomes, or chrX of "
                "females only)",
                path=self.path,
                record=f"{c}:{p}",
            )
        return p, r, a, g

    def chunks(self) -> Iterator[_Chunk]:
        """Kept records in chunks of bounded size; the buffer is reused, so consume each at once."""
        rows = max(1, _CHUNK_BYTES // (6 * self.n_samples))
        buf = np.empty((rows, self.n_samples, 3), dtype=np.int16)
        pos = np.empty(rows, dtype=np.int64)
        refs: list[str] = []
        alts: list[str] = []
        k = 0
        n_records = 0
        bar = _progress(self.path, self._record_count(), self.progress)
        try:
            for v in self.vcf:  # type: ignore[attr-defined]
                n_records += 1
                if not n_records & 4095:
                    bar.update(4096)
                try:
                    kept = self._accept(v)
                except SnvbertError:
                    if k:  # an earlier record of the pending chunk may hold the first problem
                        yield self._emit(buf, pos, refs, alts, k)
                    raise
                if kept is None:
                    continue
                pos[k], r, a, buf[k] = kept
                refs.append(r)
                alts.append(a)
                k += 1
                if k == rows:
                    yield self._emit(buf, pos, refs, alts, k)
                    refs, alts, k = [], [], 0
            if k:
                yield self._emit(buf, pos, refs, alts, k)
            bar.update(n_records % 4096)
        finally:
            bar.close()
        if n_records == 0:
            raise SnvbertError(
                "has a header but no records; pass a VCF with variants", path=self.path
            )
        if self.chrom is None and self.want is not None:
            have = ", ".join(sorted(self.other_chroms)[:5])
            raise SnvbertError(
                f"has no records on chromosome {self.want} (it has: {have}); pass chrom= one of those",
                path=self.path,
            )

    def _record_count(self) -> int | None:
        """Records in the file when an index says so (for the progress bar), else None."""
        if not any(Path(f"{self.path}{ext}").exists() for ext in (".tbi", ".csi")):
            return None  # asking cyvcf2 anyway makes htslib print an error
        try:
            return int(self.vcf.num_records) or None  # type: ignore[attr-defined]
        except Exception:
            return None

    def _emit(
        self, buf: np.ndarray, pos: np.ndarray, refs: list[str], alts: list[str], k: int
    ) -> _Chunk:
        return _Chunk(self.chrom or "", pos[:k].copy(), refs, alts, buf[:k])


# --- cache ---------------------------------------------------------------------------------


def _npy_header(n_rows: int, n_cols: int) -> bytes:
    """A .npy version 1.0 header of fixed length for a C-order uint8 matrix (NEP 1 format)."""
    meta = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({n_rows}, {n_cols}), }}"
    pad = _NPY_HEADER_BYTES - 10 - len(meta) - 1
    return (
        b"\x93NUMPY\x01\x00"
        + struct.pack("<H", len(meta) + pad + 1)
        + (meta + " " * pad + "\n").encode()
    )


def _build_cache(
    path: Path, root: Path, final: Path, fingerprint: str, options: dict, *, progress: bool
) -> None:
    """Read ``path`` into a temporary directory beside ``final`` and rename it when complete."""
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)  # those of runs killed while they built it
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(final), suffix=".partial", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; a cache is worth sharing
    try:
        _write_cache(path, tmp, fingerprint, options, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise
            # Another process finished the same cache first: its copy is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                root.rmdir()  # only succeeds when empty, i.e. after a failure


class _Fallback(Exception):
    """The text fast path met a record it does not handle; the htslib path reads the file."""


def _htslib_rows(reader: _Reader, samples: list[str], path: Path) -> Iterator[_Rows]:
    """Kept sites and their haplotypes, read by cyvcf2: any VCF or BCF, with full diagnostics."""
    n_haps = 2 * len(samples)
    for chunk in reader.chunks():
        # Cast first: missing (-1) and vector-end (-2) wrap to 255 and 254, so one max() over
        # contiguous bytes plus one min() over the phase flags screen the whole chunk.
        haps = chunk.gt[:, :, :2].astype(np.uint8).reshape(len(chunk.pos), n_haps)
        if haps.max() > 1 or chunk.gt[:, :, 2].min() < 1:
            chunk.check(samples, path, panel=True)
            raise RuntimeError("genotype screen and check disagree")  # a bug, not bad input
        yield chunk.pos, chunk.ref, chunk.alt, haps


def _text_rows(reader: _Reader, n_samples: int, path: Path, *, progress: bool) -> Iterator[_Rows]:
    """Kept sites and haplotypes of a clean panel, parsed from the VCF text with numpy.

    Phasing tools and 1000 Genomes write panels whose every record is ``FORMAT=GT`` with calls
    ``a|b`` (a, b in 0/1): 4 bytes per sample. For those, decoding a chunk of records as one
    uint32 array is several times faster than htslib's per-call parse, which is the whole cost
    of ingest. The site rules are the same :meth:`_Reader.site`. Anything else (other FORMAT
    fields, missing, unphased or multi-digit calls, any error) raises :class:`_Fallback`, and
    the file is read again by :func:`_htslib_rows`, which also produces the precise error.
    """
    width = 4 * n_samples
    rows = max(1, _CHUNK_BYTES // width)
    buf = np.empty((rows, width), dtype=np.uint8)
    pos = np.empty(rows, dtype=np.int64)
    refs: list[str] = []
    alts: list[str] = []
    k = 0
    n_records = 0
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as f, _progress(path, None, progress) as bar:
        for line in f:
            if line[:1] == b"#":
                continue
            n_records += 1
            if not n_records & 4095:
                bar.update(4096)
            fields = line.split(b"\t", 9)
            if len(fields) != 10 or fields[8] != b"GT" or len(fields[9]) != width:
                raise _Fallback
            alt = fields[4]
            try:
                site = reader.site(
                    fields[0].decode(),
                    int(fields[1]),
                    fields[3].decode(),
                    alt.decode().split(",") if alt != b"." else [],
                )
            except (SnvbertError, ValueError) as err:
                raise _Fallback from err
            if site is None:
                continue
            pos[k] = int(fields[1])
            buf[k] = np.frombuffer(fields[9], dtype=np.uint8)
            refs.append(site[0])
            alts.append(site[1])
            k += 1
            if k == rows:
                yield pos[:k].copy(), refs, alts, _decode_calls(buf[:k], n_samples)
                refs, alts, k = [], [], 0
        if k:
            yield pos[:k].copy(), refs, alts, _decode_calls(buf[:k], n_samples)
    if n_records == 0 or reader.chrom is None:
        raise _Fallback  # let the htslib path say what is wrong


def _decode_calls(text: np.ndarray, n_samples: int) -> np.ndarray:
    """(m, 4 * n) bytes of ``a|b\\t`` calls -> uint8 (m, 2 * n) alleles, or :class:`_Fallback`.

    Decoded in blocks of rows so the temporaries stay a few MB whatever the chunk size.
    """
    if (text[:, -1] != ord("\n")).any():
        raise _Fallback
    text[:, -1] = ord("\t")
    out = np.empty((len(text), 2 * n_samples), dtype=np.uint8)
    block = max(1, (4 << 20) // text.shape[1])
    for start in range(0, len(text), block):
        # One little-endian uint32 per call; minus '0|0\\t', a valid call has only bits 0 and 16 set.
        x = text[start : start + block].view("<u4") - np.uint32(0x09307C30)
        if (x & np.uint32(~0x00010001 & 0xFFFFFFFF)).any():
            raise _Fallback
        pairs = ((x | (x >> np.uint32(8))) & np.uint32(0x0101)).astype("<u2")  # bytes [a, b]
        out[start : start + block] = pairs.view(np.uint8).reshape(len(x), 2 * n_samples)
    return out


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _text_readable(path: Path) -> bool:
    """A VCF as text (plain or BGZF, not BCF) on a little-endian machine: the fast path applies."""
    if sys.byteorder != "little":
        return False
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as f:
        return f.read(16).startswith(b"##fileformat=VCF")


def _progress(path: Path, total: int | None, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        unit=" records",
        unit_scale=True,
        desc=f"reading {path.name}",
        disable=None if enabled else True,  # None: off when stderr is not a TTY
        file=sys.stderr,
    )


def _write_cache(path: Path, out: Path, fingerprint: str, options: dict, *, progress: bool) -> None:
    chrom = options["chrom"]
    drop_mono = options["drop_monomorphic"]
    matrix = out / "alleles.npy"
    with _open_vcf(path) as vcf, open(matrix, "wb") as sink:
        samples = list(vcf.samples)  # type: ignore[attr-defined]
        n_haps = 2 * len(samples)

        def ingest(fast: bool) -> tuple[_Reader, dict[str, int], list[tuple[np.ndarray, ...]], int]:
            skipped: dict[str, int] = {}
            sink.seek(0)
            sink.truncate()
            sink.write(b"\0" * _NPY_HEADER_BYTES)
            reader = _Reader(vcf, path, chrom, skipped, progress=progress)
            if fast:
                source = _text_rows(reader, len(samples), path, progress=progress)
            else:
                source = _htslib_rows(reader, samples, path)
            sites: list[tuple[np.ndarray, ...]] = []
            n_rows = 0
            for pos, refs, alts, haps in source:
                ref, alt = np.array(refs, dtype="<U1"), np.array(alts, dtype="<U1")
                if drop_mono:
                    ac = haps.sum(axis=1, dtype=np.int64)
                    poly = (ac > 0) & (ac < n_haps)
                    if not poly.all():
                        skipped["monomorphic"] = skipped.get("monomorphic", 0) + int((~poly).sum())
                        pos, ref, alt, haps = pos[poly], ref[poly], alt[poly], haps[poly]
                sink.write(np.ascontiguousarray(haps).data)
                n_rows += haps.shape[0]
                sites.append((pos, ref, alt))
            return reader, skipped, sites, n_rows

        try:
            if not _text_readable(path):
                raise _Fallback
            reader, skipped, sites, n_rows = ingest(fast=True)
        except _Fallback:
            reader, skipped, sites, n_rows = ingest(fast=False)
        if n_rows == 0:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
            raise SnvbertError(
                f"has no biallelic SNVs to use (skipped: {reasons}); pass a panel with SNVs",
                path=path,
            )
        sink.seek(0)
        sink.write(_npy_header(n_rows, n_haps))
    file_chrom = reader.chrom or ""

    pos, ref, alt = (np.concatenate(column) for column in zip(*sites, strict=True))
    order = _site_order(pos, ref, alt)
    if order is not None:
        # Only records sharing a position with another ALT move; permute just those rows.
        moved = np.flatnonzero(order != np.arange(order.size))
        mm = np.load(matrix, mmap_mode="r+")
        mm[moved] = mm[order[moved]]
        mm.flush()
        del mm
        pos, ref, alt = pos[order], ref[order], alt[order]
    np.savez(out / "sites.npz", pos=pos, ref=ref, alt=alt)
    meta = {
        "version": CACHE_VERSION,
        "source": str(path.resolve()),
        "fingerprint": fingerprint,
        "chrom": file_chrom,
        "options": options,
        "samples": samples,
        "n_sites": n_rows,
        "skipped": skipped,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _site_order(pos: np.ndarray, ref: np.ndarray, alt: np.ndarray) -> np.ndarray | None:
    """Permutation ordering sites by (pos, alt, ref); None when they already are (the usual)."""
    if pos.size < 2:
        return None
    same = pos[1:] == pos[:-1]
    if not same.any():
        return None
    order = np.lexsort((ref, alt, pos))
    return None if (order == np.arange(order.size)).all() else order


def _open_cache(cache: Path, source: Path, *, expect_fingerprint: str) -> Panel:
    meta = json.loads((cache / "meta.json").read_text())
    if meta["version"] != CACHE_VERSION or meta["fingerprint"] != expect_fingerprint:
        raise ValueError(f"stale cache {cache}")
    with np.load(cache / "sites.npz") as sites:
        pos, ref, alt = sites["pos"], sites["ref"], sites["alt"]
    haplotypes = np.load(cache / "alleles.npy", mmap_mode="r")
    if haplotypes.shape != (pos.size, 2 * len(meta["samples"])) or haplotypes.dtype != np.uint8:
        raise ValueError(f"cache {cache} does not match its metadata")
    return Panel(
        source=source,
        fingerprint=meta["fingerprint"],
        chrom=meta["chrom"],
        pos=pos,
        ref=ref,
        alt=alt,
        samples=list(meta["samples"]),
        populations=None,
        haplotypes=haplotypes,
        skipped=dict(meta["skipped"]),
        cache_path=cache,
    )


def _read_populations(path: Path, samples: list[str]) -> np.ndarray:
    """Population label per panel sample from ``sample population [...]`` lines.

    Whitespace- or tab-separated, ``#`` comments and one header line (such as 1000 Genomes'
    ``sample pop super_pop gender``) allowed; extra samples are ignored, missing ones an error.
    """
    if not path.exists():
        raise SnvbertError("populations file not found; check the path", path=path)
    wanted = set(samples)
    pop: dict[str, str] = {}
    first = True
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if first and fields[0] not in wanted:
            first = False
            continue  # a header line
        first = False
        if len(fields) < 2:
            raise SnvbertError(
                "expected 'sample population' on each line", path=path, record=f"line {lineno}"
            )
        name, label = fields[0], fields[1]
        if pop.get(name, label) != label:
            raise SnvbertError(
                f"sample {name} is given two populations ({pop[name]}, {label}); keep one",
                path=path,
                record=f"line {lineno}",
            )
        pop[name] = label
    missing = [s for s in samples if s not in pop]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise SnvbertError(
            f"has no population for {len(missing)} of {len(samples)} panel samples ({shown}); "
            "add a 'sample population' line for each",
            path=path,
        )
    return np.array([pop[s] for s in samples])


def _site_ids(chrom: str, pos: np.ndarray, ref: np.ndarray, alt: np.ndarray) -> np.ndarray:
    ids = np.char.add(f"{chrom}:", pos.astype(str))
    ids = np.char.add(np.char.add(ids, ":"), ref.astype(str))
    return np.char.add(np.char.add(ids, ":"), alt.astype(str))
