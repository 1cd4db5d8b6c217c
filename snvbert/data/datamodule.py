"""``SNVDataModule``: the VCF cache, person-level splits, windows, masks and retrieval.

How the epoch reaches the masks, in worker processes too. The DataLoader's sampler yields
*batch descriptors* ``(stream, epoch, level, window, persons)`` and the dataset builds a whole
batch from one descriptor. Lightning calls ``sampler.set_epoch(e)`` before each training epoch
(and before the hook ``on_train_epoch_start``), and the sampler runs in the main process, so the
epoch travels to the workers inside each descriptor: persistent workers, fresh workers and
epoch 0 all see the same mask, the pure function of that epoch. No attribute is ever set on a
dataset copy living in a worker. :class:`snvbert.callbacks.MaskEpochs` checks this at each epoch
start and steps the curriculum at each epoch end.

Batches are built by :mod:`snvbert.data.batch` (as imputation builds its own), and
:func:`snvbert.data.retrieval.retrieve` adds the neighbours and the HMM's read-outs once a batch is
on its device (``on_after_batch_transfer``). With ``data.hmm.scope=chromosome`` an array batch
carries the chip's calls over the whole chromosome, for the same :class:`snvbert.hmm.ChromosomeHMM`
imputation runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from snvbert.data import masks as M
from snvbert.data.batch import assemble_batch, panel_inputs
from snvbert.data.curriculum import Curriculum
from snvbert.data.encoding import plus_minus, query_code
from snvbert.data.genetic_map import CM_PER_MB, genetic_positions
from snvbert.data.retrieval import Retriever, retrieve
from snvbert.data.windows import Window, make_windows, split_people
from snvbert.errors import SnvbertError
from snvbert.hmm import HMMConfig

if TYPE_CHECKING:
    from snvbert.data.vcf import Panel

log = logging.getLogger(__name__)

Descriptor = tuple[int, int, int, int, tuple[int, ...]]  # stream, epoch, level, window, persons


class WindowBatchSampler(Sampler[Descriptor]):
    """Batches of people from one window, in a seeded order that changes with the epoch.

    ``fixed_epoch`` pins the epoch (fixed validation masks); otherwise ``set_epoch`` sets it.
    Under DDP each rank takes every ``world_size``-th batch; masks are keyed on
    (epoch, window, haplotype), so they are the same whatever the rank or world size.
    """

    def __init__(
        self,
        n_windows: int,
        persons: np.ndarray,
        batch_persons: int,
        *,
        seed: int,
        stream: int,
        shuffle: bool,
        level: Callable[[], int],
        fixed_epoch: int | None = None,
    ) -> None:
        self.n_windows, self.persons = n_windows, np.asarray(persons, dtype=np.int64)
        self.batch_persons = max(1, int(batch_persons))
        self.seed, self.stream, self.shuffle = seed, stream, shuffle
        self.level, self.fixed_epoch = level, fixed_epoch
        self.epoch = 0  # __iter__ runs once before Lightning's first set_epoch(0)
        self.last_level: int | None = None  # the level of the batches last handed out
        self.skip = 0  # batches of this epoch already trained (a resumed run), left out once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, done: int) -> None:
        """Start the next iteration at batch ``done`` of epoch ``epoch`` (a resumed run)."""
        self.epoch, self.skip = int(epoch), int(done)

    @property
    def mask_epoch(self) -> int:
        return self.epoch if self.fixed_epoch is None else self.fixed_epoch

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def all_descriptors(self) -> list[Descriptor]:
        """The epoch's descriptors over every rank, in order."""
        epoch, level = self.mask_epoch, self.level()
        self.last_level = level
        # Order only: shuffling uses the sampler epoch even when the masks are fixed.
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.stream, self.epoch, 0x5A3])
        n_chunks = math.ceil(len(self.persons) / self.batch_persons)
        out: list[Descriptor] = []
        for w in range(self.n_windows):
            people = rng.permutation(self.persons) if self.shuffle else self.persons
            for chunk in np.array_split(people, n_chunks):
                out.append((self.stream, epoch, level, w, tuple(int(p) for p in chunk)))
        order = rng.permutation(len(out)) if self.shuffle else _spread(len(out), self.seed)
        return [out[i] for i in order]

    def descriptors(self) -> list[Descriptor]:
        return _shard(self.all_descriptors(), *self._rank_world())

    def __iter__(self):
        return _resumed(self, self.descriptors())

    def n_batches(self) -> int:
        return self.n_windows * math.ceil(len(self.persons) / self.batch_persons)

    def __len__(self) -> int:
        return math.ceil(self.n_batches() / self._rank_world()[1])


def _shard(out: list, rank: int, world: int) -> list:
    """This rank's share of an epoch's batches (every world-th; padded to equal shares)."""
    if world > 1:
        per_rank = math.ceil(len(out) / world)
        out = (out * 2)[: per_rank * world][rank::world]
    return out


class PanelMixtureSampler(Sampler[tuple]):
    """Several panels' batches as one epoch: each panel's :class:`WindowBatchSampler`
    descriptors with the panel's index appended, shuffled together for training and taken in
    turn (panel 0's first batch, panel 1's first, ...) for validation, so that a validation
    limited to its first batches still spans every panel. Sharded over DDP ranks once, after
    mixing."""

    def __init__(self, parts: Sequence[WindowBatchSampler]) -> None:
        self.parts = list(parts)
        first = self.parts[0]
        self.seed, self.stream, self.shuffle = first.seed, first.stream, first.shuffle
        self.skip = 0  # as WindowBatchSampler's, over the mixed epoch

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def resume_at(self, epoch: int, done: int) -> None:
        self.set_epoch(epoch)
        self.skip = int(done)

    @property
    def epoch(self) -> int:
        return self.parts[0].epoch

    @property
    def mask_epoch(self) -> int:
        return self.parts[0].mask_epoch

    @property
    def last_level(self) -> int | None:
        return self.parts[0].last_level

    def descriptors(self) -> list[tuple]:
        each = [[(*d, i) for d in part.all_descriptors()] for i, part in enumerate(self.parts)]
        if self.shuffle:
            out = [d for part in each for d in part]
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.stream, self.epoch, 0x313])
            out = [out[i] for i in rng.permutation(len(out))]
        else:
            longest = max(len(part) for part in each)
            out = [part[j] for j in range(longest) for part in each if j < len(part)]
        return _shard(out, *self.parts[0]._rank_world())

    def __iter__(self):
        return _resumed(self, self.descriptors())

    def __len__(self) -> int:
        n = sum(part.n_batches() for part in self.parts)
        return math.ceil(n / self.parts[0]._rank_world()[1])


def _resumed(sampler: WindowBatchSampler | PanelMixtureSampler, out: list) -> Any:
    """An iterator over ``out`` past the batches a resumed run already trained (once)."""
    skip, sampler.skip = sampler.skip, 0
    return iter(out[skip:])


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable in Lightning's sense (``state_dict``): its state is
    where training stands in the epoch (:meth:`SNVDataModule.train_position`), loaded back into
    the sampler when Lightning resumes mid-epoch."""

    def __init__(self, *args: Any, position: Callable[[], dict[str, int]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict[str, int]:
        return self._position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(int(state["epoch"]), int(state["done"]))


def _spread(n: int, seed: int) -> np.ndarray:
    """A fixed permutation, so a validation run limited to its first batches still spans the chromosome."""
    return np.random.default_rng([seed & 0xFFFFFFFF, 0x0DE]).permutation(n)


class PanelWindows(Dataset):
    """Builds one batch per descriptor: query haplotypes of the panel's own people, masked.

    Queries come from the cache (the true alleles are the labels); the retrieval panel is the
    training people's haplotypes over the window's context; allele frequencies come from the
    training people only.
    """

    def __init__(
        self,
        haplotypes: np.ndarray,
        pos: np.ndarray,
        af: np.ndarray,
        windows: Sequence[Window],
        panel_persons: np.ndarray,
        levels: Sequence[M.MaskLevel],
        *,
        seed: int,
        length: int,
        morgans: np.ndarray | None = None,
        hmm_chromosome: bool = False,
    ) -> None:
        self.haplotypes, self.pos, self.af = haplotypes, pos, af
        self.hmm_chromosome = hmm_chromosome
        self.morgans = genetic_positions(pos, None) if morgans is None else morgans
        self.maf = np.minimum(af, 1.0 - af)
        self.windows, self.levels = list(windows), list(levels)
        self.panel_persons = np.asarray(panel_persons, dtype=np.int64)
        self.panel_haps = np.stack([2 * self.panel_persons, 2 * self.panel_persons + 1], 1).ravel()
        self.seed, self.length = seed, length
        self._chips: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:  # batches are addressed by descriptor, not by position
        return len(self.windows)

    def chip(self, stream: int, epoch: int, level: M.MaskLevel) -> np.ndarray:
        """The typed sites (bool per panel site) of an array level's chip."""
        return M.chip_sites(
            self.pos,
            self.maf,
            seed=self.seed,
            stream=stream,
            epoch=epoch,
            spacing_bp=level.spacing(seed=self.seed, stream=stream, epoch=epoch),
            min_maf=level.min_maf,
        )

    def hidden_and_errors(
        self, stream: int, epoch: int, level_index: int, window: Window, haps: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The mask and the genotype-error flips over the window's context, per haplotype."""
        level = self.levels[level_index]
        ctx = slice(window.ctx_start, window.ctx_end)
        typed = None
        if level.strategy == "array":
            typed = self.chip(stream, epoch, level)[ctx]
        return self.draw(stream, epoch, level_index, window.index, haps, self.maf[ctx], typed)

    def draw(
        self,
        stream: int,
        epoch: int,
        level_index: int,
        window: int,
        haps: np.ndarray,
        maf: np.ndarray,
        typed: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Hidden sites and genotype-error flips (never on a hidden site), (B, sites) each, of
        the sites ``maf`` and ``typed`` describe, keyed to ``window``."""
        level = self.levels[level_index]
        key = {"seed": self.seed, "stream": stream, "epoch": epoch, "window": window}
        hidden = np.stack(
            [
                M.draw_mask(level, **key, hap=int(h), level_index=level_index, maf=maf, typed=typed)
                for h in haps
            ]
        )
        n = len(maf)
        errors = np.stack([M.genotype_errors(level, **key, hap=int(h), n=n) for h in haps])
        return hidden, errors & ~hidden

    def chromosome_hmm_inputs(
        self,
        stream: int,
        epoch: int,
        level_index: int,
        window: Window,
        haps: np.ndarray,
        hidden: np.ndarray,
        errors: np.ndarray,
    ) -> dict[str, Tensor]:
        """An array level's query over the whole chip, for the chromosome-wide HMM (as imputed).

        The chip's typed sites over the whole chromosome: the queries' calls there (+-1, 0
        missing), the panel's alleles and the sites' genetic positions. Inside the window's
        context the calls carry the window's own missing calls and errors; outside it, draws of
        the same rates keyed to no window (-1), so every window of an epoch sees the same calls
        away from itself.
        """
        level = self.levels[level_index]
        key = (stream, epoch, level_index)
        if key not in self._chips:
            if len(self._chips) >= 2:  # training's chip and validation's
                self._chips.pop(next(iter(self._chips)))
            typed = np.flatnonzero(self.chip(stream, epoch, level))
            rows = np.asarray(self.haplotypes[typed])  # (U, n_haps)
            states = plus_minus(rows[:, self.panel_haps])
            self._chips[key] = (typed, rows, np.ascontiguousarray(states))
        typed, rows, states = self._chips[key]
        all_typed = np.ones(len(typed), dtype=bool)
        miss, flips = self.draw(stream, epoch, level_index, -1, haps, self.maf[typed], all_typed)
        lo, hi = np.searchsorted(typed, [window.ctx_start, window.ctx_end])
        cols = typed[lo:hi] - window.ctx_start
        miss[:, lo:hi], flips[:, lo:hi] = hidden[:, cols], errors[:, cols]
        calls = rows[:, haps].T.astype(np.int8) ^ flips.astype(np.int8)  # (B, U)
        query = query_code(calls, miss)
        return {
            "hmm_query": torch.from_numpy(np.ascontiguousarray(query.T)),
            "hmm_states": torch.from_numpy(states),
            "hmm_morgan": torch.from_numpy(np.asarray(self.morgans[typed], dtype=np.float64)),
            "hmm_cols": torch.from_numpy(cols.astype(np.int64)),
            "hmm_span": torch.tensor([lo, hi], dtype=torch.long),
        }

    def leave_one_out_af(
        self, window: Window, people: np.ndarray, truth_ctx: np.ndarray
    ) -> np.ndarray:
        """ALT frequency per row (B, window sites) among the panel haplotypes a query may retrieve.

        For a training person that is the panel without their own two haplotypes. Using the full
        training frequency would leak: at a site whose only carriers are the query's own
        haplotypes the frequency says "someone carries it" while no neighbour does, and the
        model would learn that such sites are the query's own — a signal that is absent for
        validation people and for real targets.
        """
        off, n = window.start - window.ctx_start, window.length
        af = np.broadcast_to(self.af[window.start : window.end], (len(people) * 2, n)).copy()
        in_panel = np.isin(people, self.panel_persons)
        if in_panel.any():
            n_haps = len(self.panel_haps)
            own = truth_ctx[:, off : off + n].reshape(len(people), 2, n).sum(1)  # (P, n)
            loo = (af[::2] * n_haps - own) / max(n_haps - 2, 1)
            rows = np.repeat(in_panel, 2)
            af[rows] = np.repeat(np.clip(loo[in_panel], 0.0, 1.0), 2, axis=0)
        return af

    def __getitem__(self, desc: Descriptor) -> dict[str, Tensor]:
        stream, epoch, level_index, w, persons = desc
        window = self.windows[w]
        people = np.asarray(persons, dtype=np.int64)
        haps = np.stack([2 * people, 2 * people + 1], 1).ravel()  # rows 2i, 2i+1: one person
        ctx_rows = np.asarray(self.haplotypes[window.ctx_start : window.ctx_end])  # (C, n_haps)
        truth_ctx = ctx_rows[:, haps].T.astype(np.int8)  # (B, C)
        hidden, errors = self.hidden_and_errors(stream, epoch, level_index, window, haps)
        observed = np.where(errors, 1 - truth_ctx, truth_ctx)
        batch = assemble_batch(
            window,
            self.length,
            truth_ctx,
            observed,
            hidden,
            pos=self.pos,
            morgans=self.morgans,
            af=self.leave_one_out_af(window, people, truth_ctx),
            haps=haps,
            persons=np.repeat(people, 2),
        )
        batch.update(
            panel_inputs(
                ctx_rows,
                self.panel_haps,
                self.panel_persons,
                window,
                seed=self.seed,
                stream=stream,
                epoch=epoch,
            )
        )
        if self.hmm_chromosome and self.levels[level_index].strategy == "array":
            batch.update(
                self.chromosome_hmm_inputs(stream, epoch, level_index, window, haps, hidden, errors)
            )
        # The mask key travels with the batch, so checks can recompute the mask it was drawn from.
        batch["mask_epoch"] = torch.full((len(haps),), epoch, dtype=torch.long)
        batch["mask_level"] = torch.full((len(haps),), level_index, dtype=torch.long)
        batch["mask_stream"] = torch.full((len(haps),), stream, dtype=torch.long)
        return batch


class PanelMixture(Dataset):
    """Several panels' :class:`PanelWindows`: a descriptor's last entry (from
    :class:`PanelMixtureSampler`) names the panel; the batch carries it as ``panel_index``
    (B,), so its HMM and checks are that panel's."""

    def __init__(self, parts: Sequence[PanelWindows]) -> None:
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, desc: tuple) -> dict[str, Tensor]:
        index = int(desc[-1])
        batch = self.parts[index][desc[:-1]]
        batch["panel_index"] = torch.full((len(batch["mask_epoch"]),), index, dtype=torch.long)
        return batch


@dataclass
class TrainingPanel:
    """One training panel and what is built on it (``SNVDataModule.parts``)."""

    path: str
    panel: Panel
    hmm: HMMConfig | None
    genetic_map: str | None
    morgans: np.ndarray
    splits: dict[str, np.ndarray]
    af: np.ndarray
    windows: list[Window]
    dataset: PanelWindows


def _identity(batch: Any) -> Any:
    return batch


class SNVDataModule(L.LightningDataModule):
    """Panel VCF -> cache -> splits, windows, masks -> batches with retrieved neighbours."""

    def __init__(
        self,
        *,
        panel: str | Sequence[str] | None,
        sim_dir: str | None,
        simulate: dict | None,
        cache_dir: str,
        chrom: str | None,
        populations: str | Sequence[str] | None,
        genetic_map: str | Sequence[str] | None,
        window: dict,
        context_bp: int,
        split: dict,
        batch_size: int,
        num_workers: int,
        persistent_workers: bool,
        pin_memory: bool,
        seed: int,
        val_mask: str,
        curriculum: dict,
        retrieval: dict,
        hmm: dict | None,
    ) -> None:
        """Every argument is a key of ``conf/data/default.yaml``, the one place their values are
        set: build it from the composed config (:func:`snvbert.config.datamodule`, or
        ``hydra.utils.instantiate(cfg.data)``)."""
        super().__init__()
        if val_mask not in ("fixed", "per_epoch"):
            raise SnvbertError(f"data.val_mask='{val_mask}' must be 'fixed' or 'per_epoch'")
        if panel is None and sim_dir is None:
            raise SnvbertError("set data.panel=PATH (a phased panel VCF) or data.sim_dir")
        # panel=None means the simulated default panel, made on first use; a list, several
        # panels that training draws from (validation spans them all).
        self.simulate_cfg = dict(simulate or {}) if panel is None else None
        if panel is None:
            self.panel_paths = [str(Path(sim_dir) / "panel.vcf.gz")]
        elif isinstance(panel, str | Path):
            self.panel_paths = [str(panel)]
        else:
            self.panel_paths = [str(p) for p in panel]
        if not self.panel_paths:
            raise SnvbertError("data.panel=[] names no panel; give a path or a list of paths")
        self.panel_path = self.panel_paths[0]
        self.cache_dir, self.chrom = cache_dir, chrom
        self.populations_paths = self._per_panel(populations, "populations")
        self.genetic_map_paths = self._per_panel(genetic_map, "genetic_map")
        self.window_cfg = {"length": int(window["length"]), "overlap": int(window["overlap"])}
        self.context_bp = int(context_bp)
        self.split_cfg = dict(split)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.pin_memory, self.seed, self.val_mask = pin_memory, int(seed), val_mask
        cur = dict(curriculum)
        levels = [M.MaskLevel(**dict(level)) for level in cur.pop("levels")]
        self.curriculum = Curriculum(levels, **cur)
        self.retriever = Retriever(**retrieval)
        # The Li–Stephens HMM of the inputs (None: off); its ``auto`` values are made concrete
        # for the panel in setup(), as imputation makes them for its reference.
        self.hmm = None if hmm is None else HMMConfig.parse(hmm)
        self.panel = None
        self.parts: list[TrainingPanel] = []
        self._samplers: dict[str, WindowBatchSampler | PanelMixtureSampler] = {}

    def _per_panel(self, value: str | Sequence[str] | None, key: str) -> list[str | None]:
        """A per-panel setting (populations, genetic_map): one path, a list (one per panel) or
        null (the file beside each panel)."""
        if value is None:
            return [None] * len(self.panel_paths)
        if isinstance(value, str | Path):
            if len(self.panel_paths) > 1:
                raise SnvbertError(
                    f"data.{key}={value} is one file for {len(self.panel_paths)} panels; give a "
                    "list with one per panel, or null (the file beside each panel)"
                )
            return [str(value)]
        values = [None if v is None else str(v) for v in value]
        if len(values) != len(self.panel_paths):
            raise SnvbertError(
                f"data.{key} has {len(values)} entries for {len(self.panel_paths)} panels"
            )
        return values

    # -- setup ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Simulate the default panel when it is missing (never when a panel path was given)."""
        if self.simulate_cfg is None or Path(self.panel_path).exists():
            return
        from snvbert.simulate import simulate

        log.info("panel %s not found: simulating it (%s)", self.panel_path, self.simulate_cfg)
        simulate(Path(self.panel_path).parent, **self.simulate_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.panel is not None:
            return
        self.parts = [
            self._setup_panel(i, path, pops, gmap)
            for i, (path, pops, gmap) in enumerate(
                zip(self.panel_paths, self.populations_paths, self.genetic_map_paths, strict=True)
            )
        ]
        # Panel 0 is "the" training panel of everything that reads one (checks, the checkpoint's
        # description, imputation's reference=train); the others add training and validation data.
        first = self.parts[0]
        self.panel, self.hmm, self.morgans = first.panel, first.hmm, first.morgans
        self.genetic_map_used, self.splits, self.af = first.genetic_map, first.splits, first.af
        self.windows, self.length = first.windows, int(self.window_cfg["length"])
        self.dataset: PanelWindows | PanelMixture = (
            first.dataset if len(self.parts) == 1 else PanelMixture([p.dataset for p in self.parts])
        )

    def _setup_panel(
        self, index: int, path: str, pops: str | None, gmap: str | None
    ) -> TrainingPanel:
        from snvbert.data.vcf import load_panel

        if not Path(path).exists():
            raise SnvbertError("panel VCF not found; set data.panel=PATH", path=path)
        if pops is None and (Path(path).parent / "populations.tsv").exists():
            pops = str(Path(path).parent / "populations.tsv")
        panel = load_panel(path, cache_dir=self.cache_dir, chrom=self.chrom, populations=pops)
        hmm = None
        if self.hmm is not None:
            # The rules imputation applies to its reference, which by default is this whole
            # panel: IBS states above 1,600 haplotypes, the rate an error-free array fits to.
            hmm = self.hmm.resolved(panel.n_haps)
            log.info("HMM: %s", hmm.to_dict())
        if gmap is None and (Path(path).parent / "map.plink").exists():
            gmap = str(Path(path).parent / "map.plink")
        if gmap is not None and not Path(gmap).exists():
            raise SnvbertError(
                "genetic map not found; set data.genetic_map=PATH (a PLINK map) or null", path=gmap
            )
        morgans = genetic_positions(panel.pos, gmap)
        log.info("genetic map: %s", gmap or f"none (a constant {CM_PER_MB} cM/Mb)")
        populations = panel.populations
        splits = split_people(
            panel.n_samples,
            self.split_cfg["fractions"],
            int(self.split_cfg["seed"]),
            None if populations is None else list(populations),
        )
        af = panel.alt_freq(splits["train"]).astype(np.float64)
        length = int(self.window_cfg["length"])
        windows = make_windows(panel.pos, length, int(self.window_cfg["overlap"]), self.context_bp)
        dataset = PanelWindows(
            panel.haplotypes,
            panel.pos,
            af,
            windows,
            splits["train"],
            self.curriculum.levels,
            # each panel its own masks (panel 0: the single-panel ones)
            seed=self.seed + index,
            length=length,
            morgans=morgans,
            hmm_chromosome=hmm is not None and hmm.scope == "chromosome",
        )
        log.info(
            "data: %s%d sites, %d windows of %d (overlap %d), people train/val/test %d/%d/%d",
            f"panel {index} " if len(self.panel_paths) > 1 else "",
            panel.n_sites,
            len(windows),
            length,
            self.window_cfg["overlap"],
            *(len(splits[s]) for s in ("train", "val", "test")),
        )
        return TrainingPanel(
            path=path,
            panel=panel,
            hmm=hmm,
            # absolute, so imputation finds it from any working directory
            genetic_map=None if gmap is None else str(Path(gmap).resolve()),
            morgans=morgans,
            splits=splits,
            af=af,
            windows=windows,
            dataset=dataset,
        )

    def panel_for(self, batch: dict[str, Any]) -> Panel | None:
        """The training panel a batch was drawn from (``panel_index``; else the first)."""
        if not self.parts:
            return self.panel
        index = batch.get("panel_index")
        return self.parts[0 if index is None else int(index[0])].panel

    # -- samplers and loaders ------------------------------------------------------------------
    def sampler(self, split: str) -> WindowBatchSampler | PanelMixtureSampler:
        if split not in self._samplers:
            train = split == "train"
            final = self.curriculum.final_level
            parts = [
                WindowBatchSampler(
                    len(part.windows),
                    part.splits[split],
                    self.batch_size,
                    seed=self.seed + i,
                    stream=M.TRAIN_STREAM
                    if train
                    else M.EVAL_STREAM + ("val", "test").index(split),
                    shuffle=train,
                    # Validation and test always measure the final (array) task.
                    level=(lambda: self.curriculum.level) if train else (lambda: final),
                    fixed_epoch=None
                    if train or (split == "val" and self.val_mask == "per_epoch")
                    else 0,
                )
                for i, part in enumerate(self.parts)
            ]
            self._samplers[split] = parts[0] if len(parts) == 1 else PanelMixtureSampler(parts)
        return self._samplers[split]

    def val_fingerprint(self) -> str:
        """A fingerprint of the masks validation measures with: the chip of the final (array)
        level as validation batches are masked with it, ``strategy@epochN`` for another level.
        Unchanged across epochs when validation masks are fixed."""
        final = self.curriculum.levels[-1]
        sampler = self.sampler("val")
        if final.strategy != "array":
            return f"{final.strategy}@epoch{sampler.mask_epoch}"
        return M.fingerprint(self.parts[0].dataset.chip(sampler.stream, sampler.mask_epoch, final))

    def _loader(self, split: str) -> DataLoader:
        for part in self.parts:
            if len(part.splits[split]) == 0:
                raise SnvbertError(
                    f"the {split} split has no people; change data.split.fractions", path=part.path
                )
        extra: dict[str, Any] = {}
        loader: type[DataLoader] = DataLoader
        if split == "train":
            loader, extra = ResumableLoader, {"position": self.train_position}
        return loader(
            self.dataset,
            sampler=self.sampler(split),
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            **extra,
        )

    def train_position(self) -> dict[str, int]:
        """Where training resumes: the epoch and the batches of it already processed.

        Saved in every checkpoint (here and as the training loader's state). Lightning makes
        the training iterator before it calls ``set_epoch``, so a resumed run's sampler is set
        from this when the checkpoint is loaded: a checkpoint written mid-epoch resumes at the
        next batch of that epoch, in its order and with its masks; one written at the end of
        an epoch starts the next epoch (not epoch 0's masks again).
        """
        trainer = self.trainer
        if trainer is None:
            return {"epoch": self.sampler("train").epoch, "done": 0}
        epoch = trainer.current_epoch
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if done >= trainer.num_training_batches:
            return {"epoch": epoch + 1, "done": 0}
        return {"epoch": epoch, "done": done}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict:
        """Retrieval runs here: after masks are drawn, on the batch's device, one search per batch."""
        if "query_ctx" in batch:
            training = self.trainer is not None and self.trainer.training
            step = self.trainer.global_step if training else 0
            index = batch.get("panel_index")
            part = 0 if index is None else int(index[0])
            batch = retrieve(batch, self.retriever, self.batch_hmm(training, step, part))
        return batch

    def batch_hmm(self, training: bool, step: int, part: int = 0) -> HMMConfig | None:
        """The HMM of one batch (of training panel ``part``, resolved for its size): with
        ``err_max``, a training batch's mismatch rate is drawn log-uniformly from [err,
        err_max], a pure function of (seed, step) so a resumed run draws the same; validation
        and test always use ``err``."""
        hmm = self.parts[part].hmm if self.parts else self.hmm
        if hmm is None:
            return None
        return hmm.for_step(self.seed, M.TRAIN_STREAM, step if training else None)

    # -- state that must survive a resume -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the curriculum (for resume) and what imputation needs."""
        state: dict[str, Any] = {"curriculum": self.curriculum.state_dict()}
        if self.parts:
            state["train_position"] = self.train_position()
        if self.panel is not None:
            state["describe"] = self.describe()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state_dict["curriculum"])
        position = state_dict.get("train_position")
        if position is not None and self.parts:
            self.sampler("train").resume_at(int(position["epoch"]), int(position["done"]))

    def describe(self) -> dict[str, Any]:
        """What imputation needs to rebuild the same windows and inputs (saved in checkpoints)."""
        assert self.panel is not None
        return {
            "panel_fingerprint": self.panel.fingerprint,
            "panel_sites": self.panel.n_sites,
            "chrom": self.panel.chrom,
            "window": dict(self.window_cfg),
            "context_bp": self.context_bp,
            "train_samples": [self.panel.samples[i] for i in self.splits["train"]],
            "levels": [asdict(level) for level in self.curriculum.levels],
            "retrieval": self.retriever.settings(),
            "hmm": None if self.hmm is None else self.hmm.to_dict(),
            "genetic_map": self.genetic_map_used,
            "seed": self.seed,
            "panels": [
                {
                    "path": part.path,
                    "fingerprint": part.panel.fingerprint,
                    "sites": part.panel.n_sites,
                    "haplotypes": part.panel.n_haps,
                    "train_people": len(part.splits["train"]),
                }
                for part in self.parts
            ],
        }
