"""Simulate a human-like reference panel and held-out array targets with msprime.

``python -m snvbert.simulate out=DIR seed=N [size=tiny|demo|5mb|20mb] [demography=...]`` writes

- ``panel.vcf.gz``   reference-panel people (sorted by population, as real panels are), all sites
- ``truth.vcf.gz``   held-out target people, all sites
- ``array.vcf.gz``   the same target people at genotyping-array sites only (optionally noisy)
- ``populations.tsv``  sample and population of every panel and target person
- ``map.plink``      the recombination map used, as a PLINK genetic map (Beagle's ``map=``)
- ``manifest.json``  parameters, counts and the panel's MAF spectrum

Everything follows from ``seed``: each random choice draws from its own stream spawned from
``numpy.random.SeedSequence(seed)``, so the same seed gives byte-identical files, and changing
one knob (the array's error rate, say) leaves the draws of every other step unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from snvbert.errors import SnvbertError
from snvbert.maf import MAF_EDGES as MAF_BINS
from snvbert.utils.cli import user_errors_exit
from snvbert.utils.io import atomic_path, write_bgzipped_vcf

log = logging.getLogger("snvbert.simulate")

SPECIES = "HomSap"
DEFAULT_DEMOGRAPHY = "OutOfAfrica_3G09"
FILES = {
    "panel": "panel.vcf.gz",
    "truth": "truth.vcf.gz",
    "array": "array.vcf.gz",
    "populations": "populations.tsv",
    "map": "map.plink",
    "manifest": "manifest.json",
}
# Bumped whenever the same parameters would give different files, so that an output directory
# written by an older version is not silently reused.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Size:
    """A preset: region length and how many people to simulate."""

    length_bp: int
    panel: int
    targets: int


SIZES: dict[str, Size] = {
    "tiny": Size(length_bp=200_000, panel=60, targets=10),  # tests: a second or two
    "demo": Size(length_bp=1_000_000, panel=300, targets=50),  # `make demo`
    "5mb": Size(length_bp=5_000_000, panel=1_000, targets=100),  # DESIGN's benchmark scenario
    "20mb": Size(length_bp=20_000_000, panel=2_000, targets=200),
}


@dataclass(frozen=True)
class ArrayConfig:
    """How the genotyping array is drawn and how messy its calls are."""

    spacing_bp: int = 10_000  # one typed site per bin of this many bp
    min_maf: float = 0.05  # chips type common sites; MAF measured in the panel
    error_rate: float = 0.0  # per genotype call: one allele flipped
    missing_rate: float = 0.0  # per genotype call: written as ./.
    phased: bool = True  # false: 0/1 with het allele order randomised, so phase is lost


@dataclass(frozen=True)
class RecombinationConfig:
    """A variable recombination map: a cold background plus random hotspots.

    Human recombination is concentrated: most crossovers fall in narrow (1–2 kb) hotspots
    tens of kb apart, which is what makes LD come in blocks. A flat rate would give LD that
    decays smoothly and a too-easy (or too-hard) imputation task.
    """

    mean_rate: float | None = None  # per bp per generation; None: the species' mean
    hotspot_spacing_bp: int = 50_000  # mean distance between hotspots
    hotspot_width_bp: int = 2_000  # mean width of a hotspot
    hotspot_share: float = 0.6  # share of all recombination that falls in hotspots


@dataclass(frozen=True)
class _Streams:
    """Independent seeded random streams, one per step."""

    ancestry: int
    mutations: int
    recombination: np.random.Generator
    bases: np.random.Generator
    targets: np.random.Generator
    array_sites: np.random.Generator
    array_noise: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> _Streams:
        children = np.random.SeedSequence(seed).spawn(7)
        # msprime wants a seed in [1, 2**32 - 1].
        ancestry, mutations = (int(c.generate_state(1)[0]) % (2**32 - 2) + 1 for c in children[:2])
        rngs = [np.random.default_rng(c) for c in children[2:]]
        return cls(ancestry, mutations, *rngs)


def simulate(
    out: str | Path,
    seed: int,
    size: str = "demo",
    demography: str = DEFAULT_DEMOGRAPHY,
    array: Mapping[str, Any] | None = None,
    chrom: str = "20",
    *,
    length_bp: int | None = None,
    panel: int | None = None,
    targets: int | None = None,
    mutation_rate: float | None = None,
    recombination: Mapping[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Simulate a panel and array targets into ``out``; return the manifest.

    ``size`` picks a preset from :data:`SIZES`; ``length_bp``, ``panel`` and ``targets``
    override parts of it. ``array`` and ``recombination`` are dicts of
    :class:`ArrayConfig` / :class:`RecombinationConfig` fields. ``mutation_rate`` defaults to
    the species' mean rate (1.29e-8 for HomSap), which gives the ~40,000 sites in 5 Mb of
    DESIGN's scenario (the demographic models' own rates, fitted for other purposes, nearly
    double that).

    If ``out`` already holds a complete simulation with the same parameters it is reused;
    ``force=True`` simulates again.
    """
    out = Path(out)
    params = _parameters(
        seed,
        size,
        demography,
        array,
        chrom,
        length_bp,
        panel,
        targets,
        mutation_rate,
        recombination,
    )
    existing = _complete_manifest(out)
    if existing is not None and not force:
        if _same_parameters(existing, params):
            log.info("reusing the simulation in %s (same parameters; force=true to redo)", out)
            return existing
        raise SnvbertError(
            "this directory holds a simulation with other parameters; choose another out= or "
            "pass force=true to overwrite it",
            path=out,
        )

    _check_parameters(params)
    if out.exists() and not out.is_dir():
        raise SnvbertError("out= must be a directory, and this is a file", path=out)
    streams = _Streams.from_seed(params["seed"])
    model, species = _demographic_model(params["demography"])
    rec = RecombinationConfig(**params["recombination"])
    mean_rate = rec.mean_rate or species.genome.mean_recombination_rate
    mu = params["mutation_rate"] or species.genome.mean_mutation_rate

    populations = _sampled_populations(model)
    layout = _Layout.build(populations, params["panel"], params["targets"], streams.targets)
    rate_map = _recombination_map(params["length_bp"], mean_rate, rec, streams.recombination)
    haps, pos = _simulate_haplotypes(model, layout, rate_map, mu, streams)

    ref, alt = _bases(len(pos), streams.bases)
    # REF is the allele of a separate "reference genome" haplotype, as in real data, so ALT is
    # the major allele at some sites (where a derived allele is common); flip to match.
    ref_allele = haps[:, -1]
    haps = haps[:, :-1] ^ ref_allele[:, None]
    ref, alt = np.where(ref_allele == 1, alt, ref), np.where(ref_allele == 1, ref, alt)

    n_panel_haps = 2 * layout.n_panel
    panel_haps, target_haps = haps[:, :n_panel_haps], haps[:, n_panel_haps:]
    af = panel_haps.mean(axis=1)
    maf = np.minimum(af, 1.0 - af)
    arr_cfg = ArrayConfig(**params["array"])
    typed = _array_sites(pos, maf, arr_cfg, streams.array_sites)
    array_haps, missing = _array_noise(target_haps[typed], arr_cfg, streams.array_noise)

    spectrum = np.histogram(maf, bins=MAF_BINS)[0]
    manifest = {
        **params,
        "populations": list(populations),
        "mutation_rate_used": mu,
        "recombination_mean_rate_used": mean_rate,
        "genetic_length_cM": round(100.0 * float(rate_map.total_mass), 6),
        "counts": {
            "panel_people": layout.n_panel,
            "target_people": layout.n_targets,
            "sites": int(len(pos)),
            "array_sites": int(typed.sum()),
        },
        "maf_spectrum": {"bins": list(MAF_BINS), "sites": [int(c) for c in spectrum]},
        "files": dict(FILES),
    }

    # A stale manifest must not vouch for files that are about to be replaced.
    (out / FILES["manifest"]).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    source = f"snvbert.simulate seed={params['seed']} size={params['size']}"
    vcf = _VcfWriter(chrom=params["chrom"], length_bp=params["length_bp"], source=source)
    vcf.write(out / FILES["panel"], pos, ref, alt, panel_haps, layout.panel_names)
    vcf.write(out / FILES["truth"], pos, ref, alt, target_haps, layout.target_names)
    vcf.write(
        out / FILES["array"],
        pos[typed],
        ref[typed],
        alt[typed],
        array_haps,
        layout.target_names,
        phased=arr_cfg.phased,
        missing=missing,
    )
    _write_populations(out / FILES["populations"], layout)
    _write_plink_map(out / FILES["map"], params["chrom"], params["length_bp"], rate_map)
    with atomic_path(out / FILES["manifest"]) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    _log_summary(out, manifest)
    return manifest


# --------------------------------------------------------------------------- parameters


def _parameters(
    seed: int,
    size: str,
    demography: str,
    array: Mapping[str, Any] | None,
    chrom: str,
    length_bp: int | None,
    panel: int | None,
    targets: int | None,
    mutation_rate: float | None,
    recombination: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Everything that determines the output, as plain JSON values (the manifest's head)."""
    size = str(size)
    if size not in SIZES:
        raise SnvbertError(f"unknown size={size!r}; choose one of {', '.join(SIZES)}")
    preset = SIZES[size]

    def pick(name: str, value: Any, default: Any, kind: type) -> Any:
        return _convert(default if value is None else value, kind, name)

    return {
        "format_version": FORMAT_VERSION,
        "seed": _convert(seed, int, "seed"),
        "size": size,
        "demography": str(demography),
        "chrom": str(chrom),
        "length_bp": pick("length_bp", length_bp, preset.length_bp, int),
        "panel": pick("panel", panel, preset.panel, int),
        "targets": pick("targets", targets, preset.targets, int),
        "mutation_rate": None
        if mutation_rate is None
        else _convert(mutation_rate, float, "mutation_rate"),
        "array": _fields(ArrayConfig, array, "array"),
        "recombination": _fields(RecombinationConfig, recombination, "recombination"),
    }


def _fields(cls: type, given: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """The dataclass's defaults updated with ``given``; unknown keys are a user error."""
    values = dataclasses.asdict(cls())
    unknown = sorted(set(given or {}) - set(values))
    if unknown:
        raise SnvbertError(
            f"unknown {name} option(s) {', '.join(unknown)}; known: {', '.join(values)}"
        )
    for key, value in (given or {}).items():
        default = values[key]
        if value is None:
            if default is not None:
                raise SnvbertError(f"{name}.{key} needs a value (default {default})")
            continue
        kind = float if default is None else type(default)
        values[key] = _convert(value, kind, f"{name}.{key}")
    return values


def _convert(value: Any, kind: type, name: str) -> Any:
    """``value`` as ``kind`` (bool, int or float), or a one-line error naming the option."""
    wanted = {bool: "true or false", int: "an integer", float: "a number"}[kind]
    if isinstance(value, bool) != (kind is bool):
        raise SnvbertError(f"{name} must be {wanted}, not {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise SnvbertError(f"{name} must be {wanted}, not {value!r}") from None
    if kind is int and converted != float(value):
        raise SnvbertError(f"{name} must be {wanted}, not {value!r}")
    return converted


def _check_parameters(params: Mapping[str, Any]) -> None:
    """One-line errors for values that cannot work, before any time is spent simulating."""
    if params["seed"] < 0:
        raise SnvbertError(f"seed must be a non-negative integer, not {params['seed']}")
    if params["length_bp"] < 1_000:
        raise SnvbertError(f"length_bp must be at least 1000, not {params['length_bp']}")
    if params["panel"] < 1 or params["targets"] < 1:
        raise SnvbertError("panel and targets must each be at least 1 person")
    if not params["chrom"] or any(c.isspace() for c in params["chrom"]):
        raise SnvbertError(f"chrom must be a name without spaces, not {params['chrom']!r}")
    arr = params["array"]
    for key in ("error_rate", "missing_rate"):
        if not 0.0 <= arr[key] < 1.0:
            raise SnvbertError(f"array.{key} must be in [0, 1), not {arr[key]}")
    if arr["spacing_bp"] < 1:
        raise SnvbertError(f"array.spacing_bp must be positive, not {arr['spacing_bp']}")
    if not 0.0 <= arr["min_maf"] <= 0.5:
        raise SnvbertError(f"array.min_maf must be in [0, 0.5], not {arr['min_maf']}")
    rec = params["recombination"]
    if not 0.0 <= rec["hotspot_share"] < 1.0:
        raise SnvbertError(
            f"recombination.hotspot_share must be in [0, 1), not {rec['hotspot_share']}"
        )
    if rec["hotspot_spacing_bp"] < 1 or rec["hotspot_width_bp"] < 1:
        raise SnvbertError("recombination.hotspot_spacing_bp and hotspot_width_bp must be positive")
    for key, value in (
        ("mutation_rate", params["mutation_rate"]),
        ("recombination.mean_rate", rec["mean_rate"]),
    ):
        if value is not None and not 0.0 < value < 1e-5:
            raise SnvbertError(f"{key} must be a per-bp rate in (0, 1e-5), not {value}")


def _complete_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a finished simulation in ``out`` (it is written last), else None."""
    path = out / FILES["manifest"]
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    needed = [out / name for name in files.values()]
    needed += [out / (FILES[k] + ".tbi") for k in ("panel", "truth", "array")]
    if set(files) != set(FILES) or not all(p.is_file() for p in needed):
        return None
    return manifest


def _same_parameters(manifest: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    return all(manifest.get(key) == value for key, value in params.items())


# --------------------------------------------------------------------------- demography


def _demographic_model(model_id: str) -> tuple[Any, Any]:
    """The stdpopsim HomSap model and species (offline: no genetic maps are fetched)."""
    import stdpopsim

    species = stdpopsim.get_species(SPECIES)
    ids = [m.id for m in species.demographic_models]
    if model_id not in ids:
        raise SnvbertError(
            f"unknown demography={model_id!r}; stdpopsim {SPECIES} models are: {', '.join(ids)}"
        )
    return species.get_demographic_model(model_id), species


def _sampled_populations(model: Any) -> tuple[str, ...]:
    """The first three populations that can be sampled today (all of them if fewer)."""
    names = tuple(
        p.name for p in model.model.populations if p.allow_samples and p.default_sampling_time == 0
    )
    if not names:
        raise SnvbertError(f"demography={model.id!r} has no population sampled at time 0")
    return names[:3]


@dataclass(frozen=True)
class _Layout:
    """Who is simulated, in which population, and in which output file.

    msprime individuals come out grouped by population; panel people keep that order, target
    people are shuffled, and one extra person of the first population carries the haplotype
    that plays the reference genome (it defines REF and is not written).
    """

    sample_sets: tuple[tuple[str, int], ...]  # (population, people), in msprime order
    panel_people: np.ndarray  # individual indices of panel people, in output order
    target_people: np.ndarray  # individual indices of target people, in output order
    reference_person: int
    panel_pops: tuple[str, ...]
    target_pops: tuple[str, ...]

    @property
    def n_panel(self) -> int:
        return len(self.panel_people)

    @property
    def n_targets(self) -> int:
        return len(self.target_people)

    @property
    def panel_names(self) -> list[str]:
        return _names("P", self.n_panel)

    @property
    def target_names(self) -> list[str]:
        return _names("T", self.n_targets)

    @classmethod
    def build(
        cls, populations: tuple[str, ...], n_panel: int, n_targets: int, rng: np.random.Generator
    ) -> _Layout:
        panel_per = _spread(n_panel, len(populations))
        target_per = _spread(n_targets, len(populations))
        sample_sets, panel, targets, pop_of = [], [], [], []
        reference = -1
        start = 0
        for i, name in enumerate(populations):
            extra = 1 if i == 0 else 0
            count = panel_per[i] + target_per[i] + extra
            sample_sets.append((name, count))
            panel.extend(range(start, start + panel_per[i]))
            targets.extend(range(start + panel_per[i], start + panel_per[i] + target_per[i]))
            if extra:
                reference = start + count - 1
            pop_of.extend([name] * count)
            start += count
        target_order = rng.permutation(np.asarray(targets, dtype=np.int64))
        return cls(
            sample_sets=tuple(sample_sets),
            panel_people=np.asarray(panel, dtype=np.int64),
            target_people=target_order,
            reference_person=reference,
            panel_pops=tuple(pop_of[i] for i in panel),
            target_pops=tuple(pop_of[i] for i in target_order),
        )


def _spread(n: int, k: int) -> list[int]:
    """``n`` people over ``k`` populations as evenly as possible (earlier ones get the rest)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _names(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]


# --------------------------------------------------------------------------- simulation


def _recombination_map(
    length_bp: int, mean_rate: float, rec: RecombinationConfig, rng: np.random.Generator
) -> Any:
    """A seeded msprime RateMap: flat background plus non-overlapping random hotspots.

    The map's mean rate is ``mean_rate`` exactly, so the region's genetic length is
    human-like; ``hotspot_share`` of it falls in the hotspots.
    """
    import msprime

    n_hot = int(rng.poisson(length_bp / rec.hotspot_spacing_bp))
    centres = np.sort(rng.integers(0, length_bp, size=n_hot))
    widths = np.maximum(1, np.round(rec.hotspot_width_bp * rng.uniform(0.5, 1.5, n_hot))).astype(
        np.int64
    )
    heat = rng.exponential(1.0, n_hot)  # hotspot intensities vary over orders of magnitude
    starts = np.clip(centres - widths // 2, 0, length_bp)
    ends = np.clip(starts + widths, 0, length_bp)
    keep, last_end = [], 0
    for i in range(n_hot):  # drop hotspots overlapping the previous one kept
        if starts[i] >= last_end and ends[i] > starts[i]:
            keep.append(i)
            last_end = ends[i]
    keep = np.asarray(keep, dtype=np.int64)
    share = rec.hotspot_share if len(keep) else 0.0
    background = (1.0 - share) * mean_rate
    position = np.unique(np.concatenate([[0, length_bp], starts[keep], ends[keep]]))
    rate = np.full(len(position) - 1, background)
    if len(keep):
        mass = share * mean_rate * length_bp * heat[keep] / heat[keep].sum()
        index = np.searchsorted(position, starts[keep])
        rate[index] += mass / (ends[keep] - starts[keep])
    return msprime.RateMap(position=position, rate=rate)


def _simulate_haplotypes(
    model: Any, layout: _Layout, rate_map: Any, mutation_rate: float, streams: _Streams
) -> tuple[np.ndarray, np.ndarray]:
    """Biallelic single-mutation sites: (haplotypes uint8 (sites, haps), 1-based positions).

    Haplotype columns are panel people (2 each, in output order), then target people, then the
    reference haplotype last. Sites hit by more than one mutation are dropped (real callers
    would see them as multi-allelic or recurrent), as are sites monomorphic in panel ∪ targets.
    """
    import msprime

    ts = msprime.sim_ancestry(
        samples=[
            msprime.SampleSet(n, population=pop, time=0, ploidy=2) for pop, n in layout.sample_sets
        ],
        demography=model.model,
        recombination_rate=rate_map,
        sequence_length=rate_map.sequence_length,
        discrete_genome=True,
        random_seed=streams.ancestry,
    )
    ts = msprime.sim_mutations(
        ts,
        rate=mutation_rate,
        model=msprime.BinaryMutationModel(),
        discrete_genome=True,
        random_seed=streams.mutations,
    )
    hits = np.bincount(ts.mutations_site, minlength=ts.num_sites)
    ts = ts.delete_sites(np.flatnonzero(hits != 1))

    nodes = ts.individuals_nodes
    order = np.concatenate(
        [
            nodes[layout.panel_people].ravel(),
            nodes[layout.target_people].ravel(),
            nodes[layout.reference_person, :1],
        ]
    )
    haps = np.empty((ts.num_sites, len(order)), dtype=np.uint8)
    for i, variant in enumerate(ts.variants(samples=order, copy=False)):
        haps[i] = variant.genotypes
    carriers = haps[:, :-1].sum(axis=1, dtype=np.int64)
    polymorphic = (carriers > 0) & (carriers < haps.shape[1] - 1)
    # msprime's discrete genome has coordinates 0..L-1; VCF positions are 1-based.
    pos = ts.sites_position.astype(np.int64) + 1
    return haps[polymorphic], pos[polymorphic]


_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)
_TRANSITION = np.array([2, 3, 0, 1])  # A<->G, C<->T
_TRANSVERSIONS = np.array([[1, 3], [0, 2], [1, 3], [0, 2]])


def _bases(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ancestral and derived bases (as single-character strings) with a human-like Ti/Tv of 2."""
    ancestral = rng.integers(0, 4, n)
    transition = rng.random(n) < 2.0 / 3.0
    pick = rng.integers(0, 2, n)
    derived = np.where(transition, _TRANSITION[ancestral], _TRANSVERSIONS[ancestral, pick])
    as_str = _BASES.view("S1").astype(str)
    return as_str[ancestral], as_str[derived]


def _array_sites(
    pos: np.ndarray, maf: np.ndarray, cfg: ArrayConfig, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of typed sites: one random panel-common site per ``spacing_bp`` bin."""
    eligible = np.flatnonzero(maf >= cfg.min_maf)
    bins = (pos[eligible] - 1) // cfg.spacing_bp
    keys = rng.random(len(eligible))
    order = np.lexsort((keys, bins))
    _, first = np.unique(bins[order], return_index=True)
    typed = np.zeros(len(pos), dtype=bool)
    typed[eligible[order[first]]] = True
    return typed


def _array_noise(
    haps: np.ndarray, cfg: ArrayConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Array calls from true haplotypes: lost phase, genotype errors and missing calls.

    Returns the haplotype alleles to write (sites, 2 * people) and a missing mask
    (sites, people). All draws are made whatever the rates, so raising a rate only adds
    errors on top of the ones a lower rate made.
    """
    calls = haps.reshape(haps.shape[0], -1, 2).copy()  # (sites, people, 2)
    shape = calls.shape[:2]
    swap = rng.random(shape) < 0.5
    error = rng.random(shape) < cfg.error_rate
    which = rng.integers(0, 2, shape)
    missing = rng.random(shape) < cfg.missing_rate
    if not cfg.phased:
        # Unphased output still lists two alleles; a fixed order (0/1, never 1/0) would leak
        # the true phase of the het through the order, so draw it.
        calls[swap] = calls[swap][:, ::-1]
    calls[error, which[error]] ^= 1
    return calls.reshape(haps.shape), missing


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _VcfWriter:
    """VCF 4.2 text with one-character GT fields, built row-blocks at a time with numpy."""

    chrom: str
    length_bp: int
    source: str
    block_sites: int = 2_000

    def header(self, samples: list[str]) -> str:
        lines = [
            "##fileformat=VCFv4.2",
            '##FILTER=<ID=PASS,Description="All filters passed">',
            f"##contig=<ID={self.chrom},length={self.length_bp}>",
            f"##source={self.source}",
            '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
            "\t".join(
                ["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples]
            ),
        ]
        return "\n".join(lines) + "\n"

    def lines(
        self,
        pos: np.ndarray,
        ref: np.ndarray,
        alt: np.ndarray,
        haps: np.ndarray,
        samples: list[str],
        phased: bool,
        missing: np.ndarray | None,
    ) -> Iterator[str]:
        yield self.header(samples)
        n_people = len(samples)
        sep = ord("|") if phased else ord("/")
        for lo in range(0, len(pos), self.block_sites):
            hi = min(lo + self.block_sites, len(pos))
            calls = haps[lo:hi].reshape(hi - lo, n_people, 2)
            text = np.empty((hi - lo, n_people, 4), dtype=np.uint8)  # "a|b\t" per person
            text[..., 0] = calls[..., 0] + ord("0")
            text[..., 1] = sep
            text[..., 2] = calls[..., 1] + ord("0")
            text[..., 3] = ord("\t")
            text[:, -1, 3] = ord("\n")
            if missing is not None:
                gap = missing[lo:hi]
                text[gap, 0] = text[gap, 2] = ord(".")
                text[gap, 1] = ord("/")
            rows = text.reshape(hi - lo, -1)
            yield "".join(
                f"{self.chrom}\t{p}\t.\t{r}\t{a}\t.\tPASS\t.\tGT\t" + row.tobytes().decode("ascii")
                for p, r, a, row in zip(pos[lo:hi], ref[lo:hi], alt[lo:hi], rows, strict=True)
            )

    def write(
        self,
        path: Path,
        pos: np.ndarray,
        ref: np.ndarray,
        alt: np.ndarray,
        haps: np.ndarray,
        samples: list[str],
        *,
        phased: bool = True,
        missing: np.ndarray | None = None,
    ) -> None:
        write_bgzipped_vcf(self.lines(pos, ref, alt, haps, samples, phased, missing), path)


def _write_populations(path: Path, layout: _Layout) -> None:
    rows = ["sample\tpopulation"]
    rows += [f"{s}\t{p}" for s, p in zip(layout.panel_names, layout.panel_pops, strict=True)]
    rows += [f"{s}\t{p}" for s, p in zip(layout.target_names, layout.target_pops, strict=True)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(rows) + "\n")


def _write_plink_map(path: Path, chrom: str, length_bp: int, rate_map: Any) -> None:
    """PLINK genetic map (``chrom . cM bp``), one row per rate change, for Beagle's ``map=``.

    The rate is constant between rows, so linear interpolation between them is exact. Row
    ``bp`` (1-based) holds the map position of msprime coordinate ``bp - 1``.
    """
    bp = np.unique(np.concatenate([[1, length_bp], rate_map.position[1:-1].astype(np.int64) + 1]))
    cm = 100.0 * rate_map.get_cumulative_mass(bp - 1)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{chrom}\t.\t{c:.8f}\t{b}\n" for c, b in zip(cm, bp, strict=True)))


def _log_summary(out: Path, manifest: Mapping[str, Any]) -> None:
    counts = manifest["counts"]
    bins, sites = manifest["maf_spectrum"]["bins"], manifest["maf_spectrum"]["sites"]
    spectrum = "  ".join(
        f"[{lo:g},{hi:g}{']' if i == len(sites) - 1 else ')'}: {n}"
        for i, (lo, hi, n) in enumerate(zip(bins[:-1], bins[1:], sites, strict=True))
    )
    log.info(
        "simulated %s (%s, %d bp, %.2f cM, chrom %s, seed %d): %d panel + %d target people, "
        "%d sites, %d array sites",
        manifest["size"],
        manifest["demography"],
        manifest["length_bp"],
        manifest["genetic_length_cM"],
        manifest["chrom"],
        manifest["seed"],
        counts["panel_people"],
        counts["target_people"],
        counts["sites"],
        counts["array_sites"],
    )
    log.info("panel MAF spectrum (sites): %s", spectrum)
    log.info("wrote %s", ", ".join(str(out / name) for name in manifest["files"].values()))


# --------------------------------------------------------------------------- command line


@hydra.main(version_base=None, config_path="pkg://snvbert.conf", config_name="simulate")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    """``python -m snvbert.simulate out=DIR seed=N`` (options: conf/simulate.yaml)."""
    simulate(
        out=Path(cfg.out),
        seed=cfg.seed,
        size=cfg.size,
        demography=cfg.demography,
        array=OmegaConf.to_container(cfg.array, resolve=True),
        chrom=str(cfg.chrom),
        length_bp=cfg.length_bp,
        panel=cfg.panel,
        targets=cfg.targets,
        mutation_rate=cfg.mutation_rate,
        recombination=OmegaConf.to_container(cfg.recombination, resolve=True),
        force=cfg.force,
    )


if __name__ == "__main__":
    main()
