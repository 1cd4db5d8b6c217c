"""``python -m snvbert.merge inputs=[a.vcf.gz,b.vcf.gz] out=merged.vcf.gz``: one VCF from several
imputed ones, as production imputation runs in pieces.

Two kinds of pieces, told apart by what they share:

- **target batches** (the same records, disjoint people): the sample columns are put side by
  side and each site's AF and DR2 are recomputed from the summed ``DOSESUMS`` (the sufficient
  statistics :mod:`snvbert.data.vcf_writer` writes), so the result is what one run over every
  batch writes, provided every batch ran with the same HMM mismatch rate (``hmm_err=`` a
  number: the first batch's summary says the rate it fitted);
- **region chunks** (the same people, consecutive regions that may overlap, from
  ``snvbert.impute region=``): the records are concatenated in position order; where two
  chunks overlap, each keeps the records on its side of the overlap's midpoint (away from its
  edge, where its HMM saw less context). Phase needs no ligation: the imputed alleles of each
  haplotype follow the target's own phase in every chunk.

To merge a grid of chunks x batches, merge each chunk's batches, then the chunks. Streaming, one
record of each input at a time; the output and its index are written atomically.
"""

from __future__ import annotations

import gzip
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from snvbert.data.vcf_writer import af_dr2, info_field
from snvbert.errors import SnvbertError
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import write_bgzipped_vcf

log = logging.getLogger("snvbert.merge")


class _Reader:
    """An imputed VCF's header and records as split text lines, with the record's line number."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = gzip.open(path, "rt")
            self.header: list[str] = []
            self.line_no = 0
            for line in self._fh:
                self.line_no += 1
                if not line.startswith("#"):
                    self._first: str | None = line
                    break
                self.header.append(line.rstrip("\n"))
            else:
                self._first = None
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise SnvbertError(f"cannot be read as a bgzipped VCF ({err})", path=path) from None
        if not self.header or not self.header[-1].startswith("#CHROM"):
            raise SnvbertError("has no #CHROM header line; give snvbert.impute outputs", path=path)
        if not any(h.startswith("##INFO=<ID=DOSESUMS,") for h in self.header):
            raise SnvbertError(
                "has no DOSESUMS field, so its AF and DR2 cannot be combined; impute it again "
                "with this snvbert version",
                path=path,
            )
        self.samples = self.header[-1].split("\t")[9:]

    def records(self) -> Iterator[list[str]]:
        try:
            if self._first is not None:
                yield self._split(self._first)
            for line in self._fh:
                self.line_no += 1
                yield self._split(line)
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise SnvbertError(
                f"cannot be read past line {self.line_no} ({err})", path=self.path
            ) from None
        finally:
            self._fh.close()

    def _split(self, line: str) -> list[str]:
        fields = line.rstrip("\n").split("\t", 9)
        if len(fields) < 9:
            raise SnvbertError(
                f"line {self.line_no} has {len(fields)} columns, not a VCF record", path=self.path
            )
        return fields

    def sums(self, fields: list[str]) -> list[int]:
        for item in fields[7].split(";"):
            if item.startswith("DOSESUMS="):
                try:
                    values = [int(x) for x in item[9:].split("|")]
                except ValueError:
                    break
                if len(values) == 5:
                    return values
                break
        raise SnvbertError(
            f"record {fields[0]}:{fields[1]} has no readable DOSESUMS", path=self.path
        )


def _info(fields: list[str], sums: list[int]) -> str:
    """INFO with AF, DR2 (where the site had it) and DOSESUMS from ``sums``; other keys kept."""
    items = fields[7].split(";")
    has_dr2 = any(item.startswith("DR2=") for item in items)
    af, dr2 = af_dr2(np.array([sums], dtype=object))
    rest = [i for i in items if not i.startswith(("AF=", "DR2=", "DOSESUMS=")) and i != "."]
    return ";".join([info_field(af[0], dr2[0] if has_dr2 else None, sums), *rest])


def _header(first: list[str], samples: list[str], command: str | None) -> list[str]:
    lines = [h for h in first[:-1] if not h.startswith("##snvbertMergeCommand=")]
    if command is not None:
        lines.append(f"##snvbertMergeCommand={command}")
    fixed = first[-1].split("\t")[:9]
    return [*lines, "\t".join([*fixed, *samples])]


def _merge_batches(readers: list[_Reader], command: str | None) -> Iterator[str]:
    samples = [s for r in readers for s in r.samples]
    seen: dict[str, Path] = {}
    for r in readers:
        for s in r.samples:
            if s in seen:
                raise SnvbertError(
                    f"sample {s} is also in {seen[s]}: target batches must hold different people",
                    path=r.path,
                )
            seen[s] = r.path
    yield "\n".join(_header(readers[0].header, samples, command)) + "\n"
    streams = [r.records() for r in readers]
    while True:
        rows = [next(s, None) for s in streams]
        if all(row is None for row in rows):
            return
        first = rows[0]
        for r, row in zip(readers, rows, strict=True):
            if row is None or first is None or row[:5] != first[:5] or row[8] != first[8]:
                where = "ends early" if row is None or first is None else f"has {row[0]}:{row[1]}"
                raise SnvbertError(
                    f"{where} where {readers[0].path} has "
                    f"{'its end' if first is None else f'{first[0]}:{first[1]}'}: target "
                    "batches must be imputed over the same panel and region",
                    path=r.path,
                    record=None if row is None else f"line {r.line_no}",
                )
        assert first is not None
        parts = [r.sums(row) for r, row in zip(readers, rows, strict=True)]
        sums = [sum(column) for column in zip(*parts, strict=True)]
        samples_text = "\t".join(row[9].rstrip("\n") for row in rows if len(row) > 9)
        yield "\t".join([*first[:7], _info(first, sums), first[8], samples_text]) + "\n"


def _chunk_span(reader: _Reader) -> tuple[str, int, int]:
    """(chrom, first, last position) of a chunk, read through once (streaming)."""
    chrom, first, last = "", -1, -1
    for fields in _Reader(reader.path).records():
        pos = int(fields[1])
        chrom = chrom or fields[0]
        first = pos if first < 0 else first
        last = pos
    return chrom, first, last


def _ligate(readers: list[_Reader], command: str | None) -> Iterator[str]:
    spans = [_chunk_span(r) for r in readers]
    order = sorted(range(len(readers)), key=lambda i: spans[i][1])
    if len({spans[i][0] for i in order if spans[i][1] >= 0}) > 1:
        raise SnvbertError("the chunks hold different chromosomes: ligate one chromosome at a time")
    # chunk i keeps [lo_i, hi_i): cut at the midpoint of each overlap (or the gap between)
    cuts = [
        (spans[a][2] + spans[b][1]) // 2 + 1 if spans[b][1] <= spans[a][2] else spans[b][1]
        for a, b in zip(order, order[1:], strict=False)
    ]
    bounds = list(zip([-1, *cuts], [*cuts, 1 << 62], strict=True))
    yield "\n".join(_header(readers[order[0]].header, readers[order[0]].samples, command)) + "\n"
    for i, (lo, hi) in zip(order, bounds, strict=True):
        for fields in readers[i].records():
            if lo <= int(fields[1]) < hi:
                yield "\t".join(fields) + "\n"


_DEFAULT = "snvbert.merge"


def merge(inputs: Sequence[str | Path], out: str | Path, *, command: str | None = _DEFAULT) -> str:
    """Merge imputed VCFs (target batches or region chunks, see the module doc) into ``out``;
    returns which kind it merged. ``command`` is recorded in the header
    (``##snvbertMergeCommand``; None: nothing added, as imputation's own people blocks)."""
    if len(inputs) < 2:
        raise SnvbertError("give at least two inputs: inputs=[a.vcf.gz,b.vcf.gz]")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise SnvbertError("no such file", path=p)
    readers = [_Reader(p) for p in paths]
    if command == _DEFAULT:
        command = f"snvbert.merge inputs=[{','.join(str(p) for p in paths)}] out={out}"
    if all(r.samples == readers[0].samples for r in readers):
        kind, lines = "chunks", _ligate(readers, command)
    elif len({tuple(r.samples) for r in readers}) == len(readers):
        kind, lines = "batches", _merge_batches(readers, command)
    else:
        raise SnvbertError(
            "the inputs neither hold the same people (region chunks) nor different people "
            "(target batches); merge each chunk's batches first, then the chunks"
        )
    write_bgzipped_vcf(lines, out)
    return kind


@hydra.main(version_base="1.3", config_path="pkg://snvbert.conf", config_name="merge")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if not cfg.get("inputs") or not cfg.get("out"):
        raise SnvbertError("set inputs=[a.vcf.gz,b.vcf.gz] and out=merged.vcf.gz")
    inputs = [str(p) for p in cfg.inputs] if not isinstance(cfg.inputs, str) else [cfg.inputs]
    kind = merge(inputs, cfg.out, command="python -m snvbert.merge " + " ".join(sys.argv[1:]))
    log.info("merged %d %s into %s", len(inputs), kind, cfg.out)


if __name__ == "__main__":
    main()
