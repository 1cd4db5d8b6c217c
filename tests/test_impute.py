"""snvbert.impute: output format, site harmonisation, atomic writes, and one-line errors."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cyvcf2 import VCF

import snvbert.data.vcf_writer as vcf_writer
import snvbert.impute as imp
from snvbert.data.sites import match_sites, prepare_target
from snvbert.data.vcf_writer import _format_missing_row, dosage_r2, format_samples
from snvbert.errors import SnvbertError
from snvbert.impute import impute
from snvbert.utils.io import write_bgzipped_vcf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_sim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint from a very short debug run on ``tiny_sim`` (quality is irrelevant here)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from snvbert.train import train

    tmp = tmp_path_factory.mktemp("ckpt")
    run = tmp / "run"
    overrides = [
        "debug=default",
        f"data.sim_dir={tiny_sim}",
        f"paths.root_dir={tmp}",
        f"paths.log_dir={tmp}",
        f"paths.output_dir={run}",
        f"paths.cache_dir={tmp / 'cache'}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.detect_anomaly=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)
    # A Hydra run folder holds its config: impute reads the training retrieval.k from it.
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("impute_cache")


def _impute_tiny(ckpt: Path, sim: Path, out: Path, cache: Path, **settings) -> dict:
    """impute the simulation's array against its panel, on the test cache, without progress."""
    return impute(
        ckpt,
        sim / "panel.vcf.gz",
        sim / "array.vcf.gz",
        out,
        cache_dir=cache,
        progress=False,
        **settings,
    )


def _r2_beside_the_hmm(
    sim: Path, imputed: Path, cache: Path, tmp_path: Path
) -> tuple[float, float]:
    """Overall r² of ``imputed`` and of the HMM alone (snvbert.hmm.imputer) on the simulation."""
    from snvbert.evaluate import evaluate
    from snvbert.hmm.imputer import impute_hmm

    panel, array = sim / "panel.vcf.gz", sim / "array.vcf.gz"
    hmm = tmp_path / "hmm.vcf.gz"
    impute_hmm(panel, array, hmm, genetic_map=sim / "map.plink", cache_dir=cache, progress=False)
    scores = evaluate(
        sim / "truth.vcf.gz",
        imputed,
        panel,
        array,
        compare=[hmm],
        labels=["imputed", "hmm"],
        bootstrap=0,
        cache_dir=cache,
    )["inputs"]
    return scores["imputed"]["r2"], scores["hmm"]["r2"]


@pytest.fixture(scope="session")
def clean(tiny_ckpt: Path, tiny_sim: Path, cache: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("imputed") / "imputed.vcf.gz"
    summary = _impute_tiny(tiny_ckpt, tiny_sim, out, cache, gp=True)
    return out, summary


def _records(path: Path) -> dict[tuple[int, str, str], dict]:
    out = {}
    vcf = VCF(str(path))
    gp = "ID=GP," in vcf.raw_header
    for v in vcf:
        out[(v.POS, v.REF, v.ALT[0])] = {
            "ds": v.format("DS")[:, 0].copy(),
            "gp": v.format("GP").copy() if gp else None,
            "gt": v.genotypes,
            "imp": v.INFO.get("IMP") is not None,
            "dr2": v.INFO.get("DR2"),
        }
    return out


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Rewrite a VCF's text line by line (``edit(line) -> line``), bgzipped and indexed."""
    with gzip.open(src, "rt") as f:
        lines = [edit(line) for line in f]
    write_bgzipped_vcf(lines, dst)
    return dst


def test_output_is_a_valid_sorted_vcf_with_every_panel_site_once(clean, tiny_sim: Path) -> None:
    out, summary = clean
    assert Path(str(out) + ".tbi").exists()
    view = subprocess.run(["bcftools", "view", "-H", str(out)], capture_output=True, text=True)
    assert view.returncode == 0, view.stderr
    panel_keys = [(v.POS, v.REF, v.ALT[0]) for v in VCF(str(tiny_sim / "panel.vcf.gz"))]
    keys = [(v.POS, v.REF, v.ALT[0]) for v in VCF(str(out))]
    assert len(view.stdout.splitlines()) == len(keys)
    assert keys == sorted(keys, key=lambda k: k[0])
    assert sorted(keys) == sorted(panel_keys) and len(set(keys)) == len(keys)
    header = VCF(str(out)).raw_header
    for needed in (
        "##source=snvbert",
        "##snvbertCommand=",
        "##contig=<ID=20,length=",
        "ID=DR2",
        "ID=IMP",
        "ID=GP",
        "ID=DS",
    ):
        assert needed in header
    assert summary["sites"]["imputed"] + summary["sites"]["typed"] == len(panel_keys)


def test_dosage_and_genotype_probabilities_agree(clean) -> None:
    recs = _records(clean[0])
    ds = np.stack([r["ds"] for r in recs.values()])
    gp = np.stack([r["gp"] for r in recs.values()])
    assert np.allclose(gp.sum(-1), 1.0, atol=0.002)
    assert np.allclose(ds, gp[..., 1] + 2 * gp[..., 2], atol=0.003)
    assert ds.min() >= 0 and ds.max() <= 2
    gt = np.stack([np.array(r["gt"])[:, :2] for r in recs.values()])
    assert np.all(np.stack([np.array(r["gt"])[:, 2] for r in recs.values()]) == 1)  # phased
    # The best guess agrees with the dosage: hom-ref where DS is small, hom-alt where large.
    assert np.all(gt.sum(-1)[ds < 0.4] == 0) and np.all(gt.sum(-1)[ds > 1.6] == 2)


def test_gp_false_writes_gt_ds_only_with_the_same_values(
    clean, tiny_ckpt: Path, tiny_sim: Path, cache: Path, tmp_path: Path
) -> None:
    """The default output is GT:DS (Beagle's default, gp=false): the same genotypes, dosages and
    DR2 as with GP, no GP in the header or records, and bcftools reads it."""
    out = tmp_path / "gt_ds.vcf.gz"
    _impute_tiny(tiny_ckpt, tiny_sim, out, cache)
    view = subprocess.run(["bcftools", "view", "-H", str(out)], capture_output=True, text=True)
    assert view.returncode == 0, view.stderr
    assert {line.split("\t")[8] for line in view.stdout.splitlines()} == {"GT:DS"}
    assert "ID=GP" not in VCF(str(out)).raw_header
    with_gp = _records(clean[0])
    for v in VCF(str(out)):
        r = with_gp[(v.POS, v.REF, v.ALT[0])]
        assert np.array_equal(v.format("DS")[:, 0], r["ds"])
        assert v.genotypes == r["gt"] and v.INFO.get("DR2") == r["dr2"]
    with pytest.raises(SnvbertError, match="gp=yes must be true or false"):
        _impute_tiny(tiny_ckpt, tiny_sim, out, cache, gp="yes")


def test_typed_genotypes_are_written_as_given(clean, tiny_sim: Path) -> None:
    recs = _records(clean[0])
    array = {(v.POS, v.REF, v.ALT[0]): v.genotypes for v in VCF(str(tiny_sim / "array.vcf.gz"))}
    for key, gts in array.items():
        assert recs[key]["gt"] == gts
        assert not recs[key]["imp"]
    assert sum(r["imp"] for r in recs.values()) == len(recs) - len(array)


def test_chr_prefix_and_swapped_alleles_give_the_same_imputation(
    clean, tiny_ckpt: Path, tiny_sim: Path, cache: Path, tmp_path: Path
) -> None:
    """A 'chr20' target with REF/ALT swapped at non-ambiguous sites imputes exactly as the clean one."""
    swapped: list[int] = []

    def edit(line: str) -> str:
        if line.startswith("##contig=<ID=20"):
            return line.replace("ID=20", "ID=chr20")
        if line.startswith("#"):
            return line
        f = line.rstrip("\n").split("\t")
        f[0] = "chr" + f[0]
        if {f[3], f[4]} not in ({"A", "T"}, {"C", "G"}) and int(f[1]) % 2 == 0:
            swapped.append(int(f[1]))
            f[3], f[4] = f[4], f[3]
            f[9:] = [g.translate(str.maketrans("01", "10")) for g in f[9:]]
        return "\t".join(f) + "\n"

    target = _rewrite(tiny_sim / "array.vcf.gz", tmp_path / "chr_swapped.vcf.gz", edit)
    assert swapped, "the rewrite should swap some sites"
    out = tmp_path / "out.vcf.gz"
    summary = impute(
        tiny_ckpt, tiny_sim / "panel.vcf.gz", target, out, cache_dir=cache, progress=False
    )
    assert summary["adjustments"]["flipped"] == len(swapped)
    assert summary["adjustments"]["chr_renamed"] > 0
    a, b = _records(clean[0]), _records(out)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key]["ds"], b[key]["ds"]), key
        assert a[key]["gt"] == b[key]["gt"], key


class _Sites:
    """A minimal panel/target stand-in for match_sites."""

    def __init__(self, pos: list[int], ref: str, alt: str) -> None:
        self.pos = np.array(pos)
        self.ref = np.array(list(ref))
        self.alt = np.array(list(alt))
        self.n_sites = len(pos)


def test_match_sites_flips_drops_and_passes_through() -> None:
    panel = _Sites([10, 20, 30, 40, 50], "ACAGA", "GTTCG")
    # 10 exact; 20 swapped (T/C) -> flipped; 30 A/T swapped -> ambiguous, dropped;
    # 40 G>A vs panel G>C -> dropped; 60 absent from the panel -> passed through.
    target = _Sites([10, 20, 30, 40, 60], "ATTGC", "GCAAT")
    m = match_sites(panel, target)  # type: ignore[arg-type]
    assert m.panel_index.tolist() == [0, 1]
    assert m.flipped.tolist() == [False, True]
    assert m.passthrough.tolist() == [4]
    assert m.counts["dropped_strand_ambiguous_swap"] == 1
    assert m.counts["dropped_allele_mismatch"] == 1


def test_interrupted_run_leaves_nothing(
    tiny_ckpt: Path, tiny_sim: Path, cache: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = {"n": 0}

    def failing(p, gp):
        calls["n"] += 1
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of writing

    monkeypatch.setattr(vcf_writer, "format_samples", failing)
    out = tmp_path / "out.vcf.gz"
    with pytest.raises(KeyboardInterrupt):
        _impute_tiny(tiny_ckpt, tiny_sim, out, cache)
    assert calls["n"] == 1
    assert list(tmp_path.iterdir()) == []


def test_unphased_target_is_a_one_line_error(
    tiny_ckpt: Path, tiny_sim_noisy: Path, cache: Path, tmp_path: Path
) -> None:
    with pytest.raises(SnvbertError) as err:
        _impute_tiny(tiny_ckpt, tiny_sim_noisy, tmp_path / "out.vcf.gz", cache)
    message = str(err.value)
    assert "\n" not in message
    assert "unphased" in message and "beagle gt=" in message and "impute=false" in message


@pytest.fixture(scope="session")
def other_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another simulation than the checkpoint's: another seed (another panel, map and array),
    12 panel people (24 haplotypes, fewer than the tiny run's K of 32), arrays of one site per
    15 kb. Read-only."""
    from snvbert.simulate import simulate

    out = tmp_path_factory.mktemp("other_sim")
    simulate(out, seed=11, size="tiny", panel=12, array={"spacing_bp": 15_000})
    return out


def test_a_checkpoint_imputes_another_panel_and_says_how_it_differs(
    tiny_ckpt: Path, tiny_sim: Path, other_sim: Path, cache: Path, tmp_path: Path
) -> None:

    args = (other_sim / "panel.vcf.gz", other_sim / "array.vcf.gz")
    out = tmp_path / "other.vcf.gz"
    summary = impute(
        tiny_ckpt,
        *args,
        out,
        cache_dir=cache,
        progress=False,
        genetic_map=other_sim / "map.plink",
    )
    panel = summary["panel"]
    assert not panel["training_panel"] and panel["haplotypes"] == 24
    assert panel["trained"]["train_people"] > 0 and panel["trained"]["array_spacing_bp"]
    assert summary["k"] == 24 and summary["k_trained"] == 32  # K shrank to the panel
    assert summary["genetic_map"] == str(other_sim / "map.plink")
    text = imp.format_summary(summary)
    assert "trained on another panel" in text and "shrunk" in text and "1 cM/Mb" not in text
    # Windows, retrieval and HMM rebuilt on this panel: the answer is the HMM's level, not the
    # collapse a model reading the training panel's windows would give.
    r2, hmm_r2 = _r2_beside_the_hmm(other_sim, out, cache, tmp_path)
    assert hmm_r2 > 0.3
    assert r2 >= hmm_r2 - 0.03

    # Without a map the training map (another region's) is not used: the constant one is.
    plain = impute(tiny_ckpt, *args, tmp_path / "plain.vcf.gz", cache_dir=cache, progress=False)
    assert plain["genetic_map"] is None and "1 cM/Mb" in imp.format_summary(plain)
    # On its own panel the checkpoint says so, and keeps K and its map.
    own = _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "own.vcf.gz", cache)
    assert own["panel"]["training_panel"] and own["k"] == 32
    assert "trained on this panel" in imp.format_summary(own)


def test_reference_train_on_another_panel_is_a_one_line_error(
    tiny_ckpt: Path, other_sim: Path, cache: Path, tmp_path: Path
) -> None:
    with pytest.raises(SnvbertError, match="reference=all") as err:
        impute(
            tiny_ckpt,
            other_sim / "panel.vcf.gz",
            other_sim / "array.vcf.gz",
            tmp_path / "out.vcf.gz",
            reference="train",
            cache_dir=cache,
            progress=False,
        )
    assert str(other_sim / "panel.vcf.gz") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.vcf.gz").exists()


def test_target_on_another_build_is_an_error_naming_both_files(
    tiny_ckpt: Path, tiny_sim: Path, cache: Path, tmp_path: Path
) -> None:
    def shift(line: str) -> str:
        if line.startswith("#"):
            return line
        f = line.split("\t")
        f[1] = str(int(f[1]) + 1)
        return "\t".join(f)

    target = _rewrite(tiny_sim / "array.vcf.gz", tmp_path / "shifted.vcf.gz", shift)
    with pytest.raises(SnvbertError, match="share only") as err:
        impute(
            tiny_ckpt,
            tiny_sim / "panel.vcf.gz",
            target,
            tmp_path / "out.vcf.gz",
            cache_dir=cache,
            progress=False,
        )
    assert str(target) in str(err.value) and "panel.vcf.gz" in str(err.value)


def test_cli_bad_target_exits_2_without_traceback(
    tiny_ckpt: Path, tiny_sim: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "array.vcf"
    bad.write_text("this is not a VCF\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snvbert.impute",
            f"ckpt={tiny_ckpt}",
            f"panel={tiny_sim / 'panel.vcf.gz'}",
            f"target={bad}",
            f"out={tmp_path / 'out.vcf.gz'}",
            f"cache_dir={tmp_path / 'cache'}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("snvbert: error:")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.vcf.gz").exists()


def test_format_samples_writes_gt_ds_gp_exactly() -> None:
    """The compiled formatter against numpy arithmetic on the same float64 values (thousandths
    rounded half to even), on random probabilities, ties and the extremes."""
    p = np.array([[0.0, 1.0, 0.25, 0.75]], dtype=np.float32)
    text = format_samples(p, gp=True)[0].tobytes().decode()
    assert text == "0|1:1.000:0.000,1.000,0.000\t0|1:1.000:0.188,0.625,0.188\n"
    assert format_samples(p)[0].tobytes().decode() == "0|1:1.000\t0|1:1.000\n"
    # a pass-through row with a missing call
    missing = np.array([np.nan, 1.0, 0.0, 1.0], dtype=np.float32)
    assert _format_missing_row(missing, gp=False) == b"./.:.\t0|1:1.000\n"
    assert _format_missing_row(missing, gp=True) == b"./.:.:.\t0|1:1.000:0.000,1.000,0.000\n"
    rng = np.random.default_rng(0)
    big = rng.random((300, 60), dtype=np.float32)
    big[:, :6] = [0.0, 1.0, 0.5, 0.5, 0.0625, 0.9375]  # ties, both ends
    p1, p2 = big[:, 0::2].astype(np.float64), big[:, 1::2].astype(np.float64)

    def field(x: np.ndarray) -> np.ndarray:
        v = np.rint(x * 1000).astype(np.int64)
        return np.char.add(
            np.char.add((v // 1000).astype(str), "."), np.char.zfill((v % 1000).astype(str), 3)
        )

    gt = np.char.add(np.char.add(np.where(p1 > 0.5, "1", "0"), "|"), np.where(p2 > 0.5, "1", "0"))
    gp = [(1 - p1) * (1 - p2), p1 * (1 - p2) + (1 - p1) * p2, p1 * p2]
    columns = gt
    for part in [":", field(p1 + p2), ":", field(gp[0]), ",", field(gp[1]), ",", field(gp[2])]:
        columns = np.char.add(columns, part)
    expected = ["\t".join(row) + "\n" for row in columns]
    got = [row.tobytes().decode() for row in format_samples(big, gp=True)]
    assert got == expected
    gt_ds = ["\t".join(row) + "\n" for row in np.char.add(np.char.add(gt, ":"), field(p1 + p2))]
    assert [row.tobytes().decode() for row in format_samples(big)] == gt_ds


def test_dosage_r2_is_one_for_certain_calls_and_zero_without_information() -> None:
    certain = np.array([[0, 1, 1, 1, 0, 0, 1, 0]], dtype=np.float32)
    assert dosage_r2(certain)[0] == pytest.approx(1.0)
    flat = np.full((1, 8), 0.3, dtype=np.float32)
    assert dosage_r2(flat)[0] == pytest.approx(0.0)


def test_dosage_r2_ignores_the_posterior_dust_of_non_carriers() -> None:
    """One sure carrier among 50 people, every other haplotype at P(ALT) 0.02: Beagle's
    formula over the raw probabilities gives 0.33; with the tails cut (below 0.05 as 0) the
    dose is as informative as it looks, DR2 1."""
    p = np.full((1, 100), 0.02, dtype=np.float32)
    p[0, 0] = 1.0
    assert dosage_r2(p)[0] == pytest.approx(1.0)
    ds, ex2 = p[0, 0::2] + p[0, 1::2], (p[0, 0::2] + p[0, 1::2]) + 2 * p[0, 0::2] * p[0, 1::2]
    raw = ((ds**2).sum() - ds.sum() ** 2 / 50) / (ex2.sum() - ds.sum() ** 2 / 50)
    assert raw == pytest.approx(0.327, abs=1e-3)


def _predict_kwargs(pan, batch_size: int, **extra) -> dict:
    """predict's keyword arguments for the tiny panel: every panel person a reference, CPU."""
    import torch

    return {
        "af": pan.alt_freq(np.arange(pan.n_samples)),
        "k": 16,
        "batch_size": batch_size,
        "device": torch.device("cpu"),
        "autocast": None,
        "progress": False,
        **extra,
    }


def _tiny_predict_inputs(tiny_ckpt: Path, tiny_sim: Path, cache: Path) -> tuple[tuple, dict]:
    """predict's arguments for the tiny panel's array: every target outside the panel, every
    panel person a reference, the simulation's genetic map, 4 people a batch."""
    import torch

    from snvbert.data.genetic_map import genetic_positions
    from snvbert.data.vcf import load_panel

    model = imp.load_trained(tiny_ckpt, torch.device("cpu"))
    pan = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=cache, progress=False)
    _, match, calls = prepare_target(pan, tiny_sim / "array.vcf.gz", tiny_sim / "panel.vcf.gz")
    targets = np.arange(calls.shape[1] // 2)
    args = (model, pan, match.panel_index, calls, -1 - targets, np.arange(pan.n_samples))
    kwargs = _predict_kwargs(pan, 4, morgans=genetic_positions(pan.pos, tiny_sim / "map.plink"))
    return args, kwargs


@pytest.mark.parametrize("ibs", [False, True])
def test_chromosome_wide_hmm_equals_the_per_window_hmm(
    ibs: bool, tiny_ckpt: Path, tiny_sim: Path, cache: Path, monkeypatch
) -> None:
    """Imputation runs the panel-state HMM once per chromosome: where a window's context is the
    whole chromosome, that is exactly the per-window HMM training uses (same predictions),
    missing calls included, over every reference haplotype or over the IBS-selected ones; with
    too little memory it falls back to the per-window HMM."""
    import torch

    from snvbert.data.genetic_map import genetic_positions
    from snvbert.data.vcf import load_panel
    from snvbert.hmm import ChromosomeHMM, IBSConfig

    model = imp.load_trained(tiny_ckpt, torch.device("cpu"))
    assert model.hmm.states == "panel"
    model.describe["context_bp"] = 10**8  # every window's context is the whole chromosome
    pan = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=cache, progress=False)
    _, match, calls = prepare_target(pan, tiny_sim / "array.vcf.gz", tiny_sim / "panel.vcf.gz")
    calls = calls.copy()
    calls[3, 1] = calls[7, 4] = -1  # missing calls: emitted as 1, predicted
    targets = np.arange(calls.shape[1] // 2)
    args = (model, pan, match.panel_index, calls, -1 - targets, np.arange(pan.n_samples))
    kwargs = _predict_kwargs(
        pan,
        3,
        morgans=genetic_positions(pan.pos, tiny_sim / "map.plink"),
        hmm_ibs=IBSConfig() if ibs else None,
    )
    calls_seen = []

    class Spy(ChromosomeHMM):
        def posteriors(self, *a, **k):
            calls_seen.append(1)
            return super().posteriors(*a, **k)

        def compact_posteriors(self, *a, **k):
            calls_seen.append(1)
            return super().compact_posteriors(*a, **k)

    monkeypatch.setattr(imp, "ChromosomeHMM", Spy)
    whole = imp.predict(*args, **kwargs)
    # once for the block of people (every target fits in HMM_MEMORY_BYTES), not per window
    assert len(calls_seen) == 1
    # memory for two people, less than a batch of 3: blocks of two, still chromosome-wide
    per_person = 2 * len(match.panel_index) * pan.n_haps * 4
    monkeypatch.setattr(imp, "HMM_MEMORY_BYTES", 2 * per_person)
    small_blocks = imp.predict(*args, **kwargs)
    assert len(calls_seen) == 1 + -(-len(targets) // 2)
    np.testing.assert_allclose(small_blocks, whole, atol=1e-5)  # other batches: float order
    monkeypatch.setattr(imp, "HMM_MEMORY_BYTES", 0)
    per_window = imp.predict(*args, **kwargs)
    assert len(calls_seen) == 1 + -(-len(targets) // 2)
    assert not np.isnan(whole).any()
    assert np.allclose(whole, per_window, atol=2e-4)


def test_hmm_mismatch_rate_is_fitted_to_the_targets(
    clean, tiny_ckpt: Path, tiny_sim: Path, cache: Path
) -> None:
    """hmm_err=auto: the HMM feature's mismatch rate is fitted to the targets' calls (reported in
    the summary); flipped calls raise it; hmm_err=train keeps the checkpoint's, a number sets
    it (and changes the imputation); anything else is a one-line error."""
    import torch

    from snvbert.data.genetic_map import genetic_positions
    from snvbert.data.vcf import load_panel
    from snvbert.hmm import IBSConfig, li_stephens_err

    _, summary = clean
    pan = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=cache, progress=False)
    assert li_stephens_err(pan.n_haps) <= summary["hmm_err"] < 0.05
    model = imp.load_trained(tiny_ckpt, torch.device("cpu"))
    _, match, calls = prepare_target(pan, tiny_sim / "array.vcf.gz", tiny_sim / "panel.vcf.gz")
    targets = -1 - np.arange(calls.shape[1] // 2)
    args = (model, pan, match.panel_index)
    rest = (targets, np.arange(pan.n_samples), genetic_positions(pan.pos, None))
    fitted = imp.fit_hmm_err(*args, calls, *rest, torch.device("cpu"), None)
    assert fitted == pytest.approx(summary["hmm_err"])
    flipped = calls.copy()
    flip = np.random.default_rng(0).random(calls.shape) < 0.1
    flipped[flip] = 1 - flipped[flip]
    assert imp.fit_hmm_err(*args, flipped, *rest, torch.device("cpu"), None) > fitted + 0.03

    kwargs = _predict_kwargs(pan, 5)
    trained = imp.predict(*args, calls, targets, np.arange(pan.n_samples), **kwargs)
    loose = imp.predict(*args, calls, targets, np.arange(pan.n_samples), hmm_err=0.2, **kwargs)
    assert np.abs(trained - loose).max() > 0.05
    # hmm_states: auto makes every reference haplotype a state for a panel this small (the
    # summary says so), the IBS-selected ones above Beagle's 1,600; the two impute differently
    assert summary["hmm_ibs"] is None
    assert "states: every reference haplotype" in imp.format_summary(summary)
    assert imp._resolve_hmm_states("auto", None, 1600) is None
    assert imp._resolve_hmm_states("auto", None, 1602) == IBSConfig()
    assert imp._resolve_hmm_states("ibs", IBSConfig(8, 0.2, 3), 10).haps == 8
    assert imp._resolve_hmm_states("train", None, 5000) == "train"
    ibs_summary = {**summary, "hmm_ibs": {"haps": 26, "step_cm": 0.1, "steps": 7}}
    assert "states: IBS-selected (26 a 0.1 cM step over 7 steps)" in imp.format_summary(ibs_summary)
    panel_states = imp.predict(
        *args, calls, targets, np.arange(pan.n_samples), **kwargs, hmm_ibs=None
    )
    ibs_states = imp.predict(
        *args, calls, targets, np.arange(pan.n_samples), **kwargs, hmm_ibs=IBSConfig()
    )
    assert np.abs(panel_states - ibs_states).max() > 0.01
    with pytest.raises(SnvbertError, match="hmm_states=every must be auto, ibs, panel or train"):
        _impute_tiny(tiny_ckpt, tiny_sim, tiny_sim / "never.vcf.gz", cache, hmm_states="every")
    assert not (tiny_sim / "never.vcf.gz").exists()
    assert imp._resolve_hmm_err("train") is None
    assert imp._resolve_hmm_err("1e-3") == 0.001
    for bad in ("often", "0.7", "0"):
        with pytest.raises(SnvbertError, match=f"hmm_err={bad} must be auto, train or a rate"):
            imp._resolve_hmm_err(bad)


def test_packed_features_at_the_chosen_sites_equal_the_dense_ones(
    tiny_ckpt: Path, tiny_sim: Path, cache: Path, monkeypatch
) -> None:
    """With the HMM's P(ALT) known before retrieval, imputation makes the neighbour features at
    the network's chosen sites only (retrieve(..., sites=)); the predictions equal those of the
    dense features with the network choosing the same sites itself (on this tiny panel it leaves
    out about a third of the sites; 95 % on the 5 Mb scenario's array)."""
    args, kwargs = _tiny_predict_inputs(tiny_ckpt, tiny_sim, cache)
    model = args[0]
    assert model.net.config.hmm_certain > 0
    chosen, seen = [], []
    real_retrieve, real_forward = imp.retrieve, type(model.net).forward

    def spy_forward(net, batch, *a, **k):
        out = real_forward(net, batch, *a, **k)
        chosen.append(float(out["ran"][~batch["pad"]].float().mean()))
        return out

    def packed_retrieve(*a, **k):
        seen.append(a[-1] is not None)
        return real_retrieve(*a, **k)

    monkeypatch.setattr(type(model.net), "forward", spy_forward)
    monkeypatch.setattr(imp, "retrieve", packed_retrieve)
    packed = imp.predict(*args, **kwargs)
    assert all(seen) and 0 < np.mean(chosen) < 0.9
    monkeypatch.setattr(imp, "retrieve", lambda *a, **k: real_retrieve(*a[:-1], None, **k))
    dense = imp.predict(*args, **kwargs)
    assert not np.isnan(packed).any()
    assert np.allclose(packed, dense, atol=1e-5)


def test_context_reduced_to_typed_and_window_sites_changes_no_prediction(
    tiny_ckpt: Path, tiny_sim: Path, cache: Path, monkeypatch
) -> None:
    """Imputation builds each window's context over its typed sites and the window's own only
    (every other context column is hidden for every query): the predictions equal those over
    the whole context, and with more typed sites than the features keep, the whole context is
    used."""
    args, kwargs = _tiny_predict_inputs(tiny_ckpt, tiny_sim, cache)
    real = imp._context_columns
    widths = []

    def spy(window, typed, feature_sites):
        span = real(window, typed, feature_sites)
        widths.append((len(span), window.ctx_end - window.ctx_start))
        return span

    monkeypatch.setattr(imp, "_context_columns", spy)
    reduced = imp.predict(*args, **kwargs)
    assert all(n < full for n, full in widths)  # every context was reduced
    monkeypatch.setattr(
        imp, "_context_columns", lambda window, *_: slice(window.ctx_start, window.ctx_end)
    )
    whole = imp.predict(*args, **kwargs)
    assert not np.isnan(reduced).any()
    np.testing.assert_allclose(reduced, whole, atol=1e-5)
    window = imp.make_windows(args[1].pos, 32, 8, 10_000)[1]
    typed = np.arange(window.ctx_start, window.ctx_end, 2)
    assert real(window, typed, len(typed) - 1) == slice(window.ctx_start, window.ctx_end)


def test_progress_is_logged_as_lines_off_a_terminal(caplog) -> None:
    """Under SLURM or nohup (stderr not a terminal) progress is plain log lines with done,
    total and an ETA, not a silent bar; on a terminal it is tqdm's bar; disabled, nothing."""
    import io
    import logging

    from tqdm import tqdm

    from snvbert.utils.progress import LineProgress, progress

    log = logging.getLogger("snvbert.test.progress")
    with caplog.at_level(logging.INFO, logger="snvbert.test.progress"):
        bar = progress(4, "imputing", "windows", log, every=0.0, stream=io.StringIO())
        assert isinstance(bar, LineProgress)
        for _ in range(4):
            bar.update()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("imputing: 1/4 windows (25 %)") and "ETA" in lines[0]
    assert lines[-1].startswith("imputing: 4/4 windows (100 %)")
    assert len(lines) == 4  # one a step (every=0), the last once

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress(4, "x", "y", log, stream=Terminal()), tqdm)
    quiet = progress(4, "x", "y", log, enabled=False, stream=io.StringIO())
    assert isinstance(quiet, tqdm) and quiet.disable


def test_threads_setting_is_checked(tiny_sim: Path, tmp_path: Path) -> None:
    """threads= sets the CPU threads; less than one is a one-line error naming the setting."""
    with pytest.raises(SnvbertError, match="threads=0"):
        imp.impute(
            tmp_path / "none.ckpt",
            tiny_sim / "panel.vcf.gz",
            tiny_sim / "array.vcf.gz",
            tmp_path / "out.vcf.gz",
            threads=0,
        )


def test_hmm_certain_at_imputation_moves_where_the_network_runs(
    clean, tiny_ckpt: Path, tiny_sim: Path, cache: Path, tmp_path: Path
) -> None:
    """impute hmm_certain= overrides the checkpoint's model.hmm_certain: 0.4 leaves more sites
    to the HMM (other dosages; the summary says so); a value outside [0, 0.5) is a one-line
    error that writes nothing."""
    out, summary = clean
    assert summary["hmm_certain"] == pytest.approx(imp.AUTO_CERTAIN_FACTOR * 1e-3)  # auto
    assert summary["hmm_common_maf"] is None  # auto, no cap trained, HMM over every haplotype
    trained = _impute_tiny(
        tiny_ckpt, tiny_sim, tmp_path / "trained.vcf.gz", cache, hmm_certain="train"
    )
    assert trained["hmm_certain"] == pytest.approx(1e-3)  # the checkpoint's
    wide = _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "wide.vcf.gz", cache, hmm_certain=0.4)
    assert wide["hmm_certain"] == 0.4
    assert "(0.4, 0.6)" in imp.format_summary(wide)
    a, b = _records(out), _records(tmp_path / "wide.vcf.gz")
    changed = sum(not np.allclose(a[key]["ds"], b[key]["ds"]) for key in a if a[key]["imp"])
    assert changed > 0
    c = _records(tmp_path / "trained.vcf.gz")
    assert sum(not np.allclose(a[key]["ds"], c[key]["ds"]) for key in a if a[key]["imp"]) > 0
    for bad, why in (
        (0.5, "must be at least 0"),
        (-0.1, "must be at least 0"),
        ("x", "must be auto"),
    ):
        with pytest.raises(SnvbertError, match=f"hmm_certain={bad} {why}"):
            _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "bad.vcf.gz", cache, hmm_certain=bad)
    assert not (tmp_path / "bad.vcf.gz").exists()


def test_hmm_common_maf_leaves_common_sites_to_the_hmm(
    tiny_ckpt: Path, tiny_sim: Path, other_sim: Path, cache: Path, tmp_path: Path
) -> None:
    """impute hmm_common_maf=0.05: at imputed sites of panel MAF >= 0.05 the output is the HMM
    skip's (that of a run where the network runs almost nowhere, hmm_certain=0.4999), at rarer
    ones the network still moves it; the summary says so; auto caps at AUTO_COMMON_MAF only
    with IBS-selected states; a bad value is one line."""
    from snvbert.data.vcf import load_panel

    capped = _impute_tiny(
        tiny_ckpt, tiny_sim, tmp_path / "capped.vcf.gz", cache, hmm_common_maf=0.05
    )
    assert capped["hmm_common_maf"] == 0.05
    ibs = _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "ibs.vcf.gz", cache, hmm_states="ibs")
    assert ibs["hmm_common_maf"] == imp.AUTO_COMMON_MAF  # auto with IBS-selected states
    assert ibs["panel"]["typed_per_mb"] >= imp.AUTO_COMMON_MAF_MIN_DENSITY
    sparse = impute(  # an array of one site per 15 kb: auto leaves common sites to the net
        tiny_ckpt,
        other_sim / "panel.vcf.gz",
        other_sim / "array.vcf.gz",
        tmp_path / "sparse.vcf.gz",
        cache_dir=cache,
        progress=False,
        hmm_states="ibs",
    )
    assert sparse["panel"]["typed_per_mb"] < imp.AUTO_COMMON_MAF_MIN_DENSITY
    assert sparse["hmm_common_maf"] is None
    assert (
        _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "off.vcf.gz", cache, hmm_common_maf="off")[
            "hmm_common_maf"
        ]
        is None
    )
    assert "panel MAF is below 0.05" in imp.format_summary(capped)
    _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "skip.vcf.gz", cache, hmm_certain=0.4999)
    pan = load_panel(tiny_sim / "panel.vcf.gz", cache_dir=cache, progress=False)
    af = np.asarray(pan.haplotypes).mean(1)
    maf = {
        (int(p), r, a): min(f, 1 - f)
        for p, r, a, f in zip(pan.pos, pan.ref, pan.alt, af, strict=True)
    }
    a, b = _records(tmp_path / "capped.vcf.gz"), _records(tmp_path / "skip.vcf.gz")
    imputed = [key for key in a if a[key]["imp"]]
    same = {key: np.allclose(a[key]["ds"], b[key]["ds"], atol=1e-3) for key in imputed}
    common = [key for key in imputed if maf[key] >= 0.05]
    rare = [key for key in imputed if maf[key] < 0.05]
    assert len(common) > 50 and len(rare) > 50
    assert np.mean([same[key] for key in common]) > 0.99
    assert np.mean([same[key] for key in rare]) < 0.99
    with pytest.raises(SnvbertError, match="hmm_common_maf=0.7 must be auto, train, off"):
        _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "bad.vcf.gz", cache, hmm_common_maf=0.7)
    assert not (tmp_path / "bad.vcf.gz").exists()


def test_the_gpu_path_gives_the_cpu_path_s_predictions(
    tiny_ckpt: Path, tiny_sim: Path, cache: Path, monkeypatch
) -> None:
    """predict's GPU path (the dense torch HMM per block, neighbour features over the whole
    window, the network choosing its sites itself), run here on CPU tensors, predicts what the
    CPU path (compiled HMM, sparse read-out, packed features) does: the code a GPU runs is
    held to the one this machine measures."""
    args, kwargs = _tiny_predict_inputs(tiny_ckpt, tiny_sim, cache)
    cpu = imp.predict(*args, **kwargs)
    dense = []
    real = imp.ChromosomeHMM.posteriors

    def spy(self, *a, **k):
        dense.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(imp.ChromosomeHMM, "posteriors", spy)
    monkeypatch.setattr(imp, "_compiled_path", lambda device: False)
    gpu = imp.predict(*args, **kwargs)
    assert dense  # the dense (B, N, U) posteriors the GPU path uses
    assert not np.isnan(gpu).any()
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_a_stripped_checkpoint_imputes_exactly_as_the_training_one(
    tiny_ckpt: Path, tiny_sim: Path, cache: Path, tmp_path: Path
) -> None:
    import torch

    from snvbert.pretrained import strip_checkpoint

    raw = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    slim = tmp_path / "slim.ckpt"
    torch.save(strip_checkpoint(raw, {"recipe": "test"}), slim)
    assert slim.stat().st_size < tiny_ckpt.stat().st_size / 2  # no optimizer, no loops
    torch.load(slim, weights_only=True)  # plain values only: loading runs no code
    # The slim one forgets the training map's path (no other panel can use it): given the same
    # map, both impute alike.
    gmap = {"genetic_map": tiny_sim / "map.plink"}
    got = _records(_impute_tiny(slim, tiny_sim, tmp_path / "slim.vcf.gz", cache, **gmap)["out"])
    want = _records(
        _impute_tiny(tiny_ckpt, tiny_sim, tmp_path / "full.vcf.gz", cache, **gmap)["out"]
    )
    assert got.keys() == want.keys()
    for key, rec in want.items():
        np.testing.assert_array_equal(got[key]["ds"], rec["ds"])
    with pytest.raises(SnvbertError, match="snvbert.train"):
        strip_checkpoint({"state_dict": {}}, {})


def test_impute_without_ckpt_uses_the_shipped_model_and_says_so(
    tiny_sim: Path, cache: Path, tmp_path: Path
) -> None:
    """The shipped model (make pretrained; never retrained here) on a panel it never saw: one
    small file with its recipe beside it, at the HMM's level or above on this array."""
    import json

    import torch

    from snvbert.pretrained import DEFAULT_CKPT, DEFAULT_RECIPE

    assert DEFAULT_CKPT.stat().st_size <= 10 * 1024**2
    torch.load(DEFAULT_CKPT, weights_only=True)  # plain values only: loading runs no code
    recipe = json.loads(DEFAULT_RECIPE.read_text())
    sims = recipe["training_data"]["simulations"]
    assert sims and {s["demography"] for s in sims} == {"OutOfAfrica_3G09"}
    assert recipe["command"].startswith("make pretrained") and recipe["training"]["steps"] > 0
    out = tmp_path / "shipped.vcf.gz"
    summary = impute(
        None,
        tiny_sim / "panel.vcf.gz",
        tiny_sim / "array.vcf.gz",
        out,
        cache_dir=cache,
        progress=False,
        genetic_map=tiny_sim / "map.plink",
    )
    assert summary["shipped_model"] and summary["ckpt"] == str(DEFAULT_CKPT)
    assert not summary["panel"]["training_panel"]
    text = imp.format_summary(summary)
    assert "the default model shipped with snvbert, trained on another panel" in text
    r2, hmm_r2 = _r2_beside_the_hmm(tiny_sim, out, cache, tmp_path)
    assert r2 >= hmm_r2 - 0.01


def test_no_shipped_model_is_a_one_line_error(
    tiny_sim: Path, cache: Path, tmp_path: Path, monkeypatch
) -> None:
    import snvbert.pretrained as pretrained

    monkeypatch.setattr(pretrained, "DEFAULT_CKPT", tmp_path / "absent.ckpt")
    with pytest.raises(SnvbertError, match="make pretrained"):
        impute(
            None,
            tiny_sim / "panel.vcf.gz",
            tiny_sim / "array.vcf.gz",
            tmp_path / "out.vcf.gz",
            cache_dir=cache,
            progress=False,
        )
    assert not (tmp_path / "out.vcf.gz").exists()
