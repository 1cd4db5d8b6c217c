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
from dataclasses import asdict
from pathlib import Path
from typing import Any

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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def mask_epoch(self) -> int:
        return self.epoch if self.fixed_epoch is None else self.fixed_epoch

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def descriptors(self) -> list[Descriptor]:
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
        out = [out[i] for i in order]
        rank, world = self._rank_world()
        if world > 1:
            per_rank = math.ceil(len(out) / world)
            out = (out * 2)[: per_rank * world][rank::world]
        return out

    def __iter__(self):
        return iter(self.descriptors())

    def __len__(self) -> int:
        n = self.n_windows * math.ceil(len(self.persons) / self.batch_persons)
        return math.ceil(n / self._rank_world()[1])


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
            spacing_bp=level.spacing_bp,
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


def _identity(batch: Any) -> Any:
    return batch


class SNVDataModule(L.LightningDataModule):
    """Panel VCF -> cache -> splits, windows, masks -> batches with retrieved neighbours."""

    def __init__(
        self,
        *,
        panel: str | None,
        sim_dir: str | None,
        simulate: dict | None,
        cache_dir: str,
        chrom: str | None,
        populations: str | None,
        genetic_map: str | None,
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
        # panel=None means the simulated default panel, made on first use.
        self.simulate_cfg = dict(simulate or {}) if panel is None else None
        self.panel_path = str(panel) if panel is not None else str(Path(sim_dir) / "panel.vcf.gz")
        self.cache_dir, self.chrom = cache_dir, chrom
        self.populations_path = populations
        self.genetic_map_path = genetic_map
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
        self._samplers: dict[str, WindowBatchSampler] = {}

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
        from snvbert.data.vcf import load_panel

        if not Path(self.panel_path).exists():
            raise SnvbertError("panel VCF not found; set data.panel=PATH", path=self.panel_path)
        pops = self.populations_path
        if pops is None and (Path(self.panel_path).parent / "populations.tsv").exists():
            pops = str(Path(self.panel_path).parent / "populations.tsv")
        self.panel = load_panel(
            self.panel_path, cache_dir=self.cache_dir, chrom=self.chrom, populations=pops
        )
        if self.hmm is not None:
            # The rules imputation applies to its reference, which by default is this whole
            # panel: IBS states above 1,600 haplotypes, the rate an error-free array fits to.
            self.hmm = self.hmm.resolved(self.panel.n_haps)
            log.info("HMM: %s", self.hmm.to_dict())
        gmap = self.genetic_map_path
        if gmap is None and (Path(self.panel_path).parent / "map.plink").exists():
            gmap = str(Path(self.panel_path).parent / "map.plink")
        if gmap is not None and not Path(gmap).exists():
            raise SnvbertError(
                "genetic map not found; set data.genetic_map=PATH (a PLINK map) or null", path=gmap
            )
        # absolute, so imputation finds it from any working directory
        self.genetic_map_used = None if gmap is None else str(Path(gmap).resolve())
        self.morgans = genetic_positions(self.panel.pos, gmap)
        log.info("genetic map: %s", gmap or f"none (a constant {CM_PER_MB} cM/Mb)")
        populations = self.panel.populations
        self.splits = split_people(
            self.panel.n_samples,
            self.split_cfg["fractions"],
            int(self.split_cfg["seed"]),
            None if populations is None else list(populations),
        )
        self.af = self.panel.alt_freq(self.splits["train"]).astype(np.float64)
        self.windows = make_windows(
            self.panel.pos,
            int(self.window_cfg["length"]),
            int(self.window_cfg["overlap"]),
            self.context_bp,
        )
        self.length = int(self.window_cfg["length"])
        self.dataset = PanelWindows(
            self.panel.haplotypes,
            self.panel.pos,
            self.af,
            self.windows,
            self.splits["train"],
            self.curriculum.levels,
            seed=self.seed,
            length=self.length,
            morgans=self.morgans,
            hmm_chromosome=self.hmm is not None and self.hmm.scope == "chromosome",
        )
        log.info(
            "data: %d sites, %d windows of %d (overlap %d), people train/val/test %d/%d/%d",
            self.panel.n_sites,
            len(self.windows),
            self.length,
            self.window_cfg["overlap"],
            *(len(self.splits[s]) for s in ("train", "val", "test")),
        )

    # -- samplers and loaders ------------------------------------------------------------------
    def sampler(self, split: str) -> WindowBatchSampler:
        if split not in self._samplers:
            train = split == "train"
            final = self.curriculum.final_level
            self._samplers[split] = WindowBatchSampler(
                len(self.windows),
                self.splits[split],
                self.batch_size,
                seed=self.seed,
                stream=M.TRAIN_STREAM if train else M.EVAL_STREAM + ("val", "test").index(split),
                shuffle=train,
                # Validation and test always measure the final (array) task.
                level=(lambda: self.curriculum.level) if train else (lambda: final),
                fixed_epoch=None
                if train or (split == "val" and self.val_mask == "per_epoch")
                else 0,
            )
        return self._samplers[split]

    def val_fingerprint(self) -> str:
        """A fingerprint of the masks validation measures with: the chip of the final (array)
        level as validation batches are masked with it, ``strategy@epochN`` for another level.
        Unchanged across epochs when validation masks are fixed."""
        final = self.curriculum.levels[-1]
        sampler = self.sampler("val")
        if final.strategy != "array":
            return f"{final.strategy}@epoch{sampler.mask_epoch}"
        return M.fingerprint(self.dataset.chip(sampler.stream, sampler.mask_epoch, final))

    def _loader(self, split: str) -> DataLoader:
        if len(self.splits[split]) == 0:
            raise SnvbertError(f"the {split} split has no people; change data.split.fractions")
        return DataLoader(
            self.dataset,
            sampler=self.sampler(split),
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
        )

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
            batch = retrieve(batch, self.retriever, self.batch_hmm(training, step))
        return batch

    def batch_hmm(self, training: bool, step: int) -> HMMConfig | None:
        """The HMM of one batch: with ``err_max``, a training batch's mismatch rate is drawn
        log-uniformly from [err, err_max], a pure function of (seed, step) so a resumed run
        draws the same; validation and test always use ``err``."""
        if self.hmm is None:
            return None
        return self.hmm.for_step(self.seed, M.TRAIN_STREAM, step if training else None)

    # -- state that must survive a resume -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the curriculum (for resume) and what imputation needs."""
        state: dict[str, Any] = {"curriculum": self.curriculum.state_dict()}
        if self.panel is not None:
            state["describe"] = self.describe()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state_dict["curriculum"])

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
        }
