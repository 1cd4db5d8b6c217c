"""Retrieval and dataloader benchmark.

    python -m snvbert.bench.retrieval [OUT_DIR]     # default outputs/bench; writes retrieval.json

Retrieval: 4,096 queries x 512 sites (half of each query's sites hidden) against 2,000 and
10,000 panel haplotypes, K = 16 and 256, in the same run: a numpy brute force (the masked
Hamming distance written out), faiss ``IndexFlatIP`` (exact), torch matmul + top-k, and our
:class:`~snvbert.data.retrieval.Retriever` (torch engine, with the tie-breaking jitter and
exclusions it adds). Goal: ours >= 0.8x the faster of faiss and torch.

Recall: recall@128 of faiss's IVF and HNSW indexes against exact search on a simulated panel
of 6,000 haplotypes, window by window as imputation searches (:func:`recall`).

Dataloader: batches per second out of the demo panel's training dataloader (retrieval
included, as in training) with 0 and 2 workers, against the time of one training step of the
`small` model on such a batch, so the table says whether data loading could be the bottleneck.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from snvbert.config import retriever

N_QUERIES, N_SITES = 4096, 512
CONF = Path(__file__).resolve().parents[2] / "conf"


def _best(fn, reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _numpy_brute(q: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), 256):  # chunks keep the (q, n, sites) array in memory
        qq = q[start : start + 256]
        observed = qq != 0
        mismatch = ((p[None, :, :] != qq[:, None, :]) & observed[:, None, :]).sum(-1)
        out[start : start + 256] = np.argpartition(mismatch, k, axis=1)[:, :k]
    return out


def _torch_topk(query: torch.Tensor, panel: torch.Tensor, k: int) -> tuple:
    return torch.topk(query @ panel.T, k, dim=1)


def _train_step(module, optimizer, batch) -> None:
    optimizer.zero_grad()
    module.training_step(batch, 0).backward()
    optimizer.step()


def retrieval(reps: int = 3) -> list[dict]:
    import faiss

    rng = np.random.default_rng(0)
    rows = []
    for n_panel in (2_000, 10_000):
        panel = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n_panel, N_SITES))
        query = rng.choice(np.array([-1, 1], dtype=np.int8), size=(N_QUERIES, N_SITES))
        query[rng.random(query.shape) < 0.5] = 0
        pt, qt = torch.from_numpy(panel).float(), torch.from_numpy(query).float()
        jitter = torch.from_numpy(rng.random(n_panel).astype(np.float32) * 0.5)
        exclude = torch.zeros(N_QUERIES, n_panel, dtype=torch.bool)
        exclude[torch.arange(N_QUERIES), torch.arange(N_QUERIES) % n_panel] = True
        index = faiss.IndexFlatIP(N_SITES)
        index.add(panel.astype(np.float32))
        qf = query.astype(np.float32)
        for k in (16, 256):
            ours = retriever(k=k)
            t = {
                "faiss_flat": _best(partial(index.search, qf, k), reps),
                "torch_topk": _best(partial(_torch_topk, qt, pt, k), reps),
                "snvbert": _best(partial(ours.search, qt, pt, jitter, exclude), reps),
            }
            if n_panel == 2_000:  # the brute force is slow; 1/8 of the queries shows the scale
                t["numpy_brute"] = _best(partial(_numpy_brute, query[:512], panel, k), 1) * 8
            qps = {name: N_QUERIES / sec for name, sec in t.items()}
            fastest = max(qps["faiss_flat"], qps["torch_topk"])
            rows.append(
                {"panel": n_panel, "k": k, "qps": qps, "ours_vs_fastest": qps["snvbert"] / fastest}
            )
    return rows


def dataloader(out_dir: Path, n_batches: int = 30) -> list[dict]:
    from snvbert.config import datamodule
    from snvbert.model.module import SNVBertModule
    from snvbert.model.net import SNVBertNet
    from snvbert.simulate import simulate

    sim = out_dir / "sim-demo"
    simulate(sim, seed=1, size="demo")
    rows = []
    step_time = None
    for workers in (0, 2):
        dm = datamodule(
            panel=str(sim / "panel.vcf.gz"),
            cache_dir=str(out_dir / "cache"),
            batch_size=8,
            num_workers=workers,
            persistent_workers=workers > 0,
            retrieval={"k": 128},
            curriculum={"levels": [{"strategy": "array"}]},
        )
        dm.setup()
        loader = dm.train_dataloader()
        it = iter(loader)
        first = dm.on_after_batch_transfer(next(it), 0)
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            dm.on_after_batch_transfer(batch, 0)
            n += 1
            if n == n_batches:
                break
        dt = time.perf_counter() - t0
        if step_time is None:
            net = SNVBertNet(d_model=128, n_layer=8, n_head=4, max_len=dm.length)
            lr = float(OmegaConf.load(CONF / "train.yaml")["lr"])  # the configured default
            module = SNVBertModule(net, torch.optim.AdamW, None, lr=lr)
            opt = torch.optim.AdamW(module.parameters(), lr=lr)
            module.log = lambda *a, **k: None  # no trainer attached
            step_time = _best(partial(_train_step, module, opt, first), 2)
        rows.append(
            {
                "workers": workers,
                "batches_per_s": n / dt,
                "items_per_s": n * first["tokens"].shape[0] / dt,
                "small_train_step_s": step_time,
                "loader_s_per_batch": dt / n,
            }
        )
    return rows


def recall(out_dir: Path, k: int = 128) -> list[dict]:
    """recall@K of faiss's approximate indexes against exact search, as imputation searches: a
    simulated 1 Mb panel of 6,000 haplotypes (demo, 3,000 people, seed 3), the array's target
    haplotypes as queries, each window of the shipped model's geometry searched over the chip
    sites of its context, K = 128. The r² they cost is measured by ``snvbert.impute
    retrieval.index=ivf|hnsw`` (README, Scale)."""
    from snvbert.data.encoding import plus_minus
    from snvbert.data.vcf import load_panel, read_target
    from snvbert.data.windows import make_windows
    from snvbert.impute import load_trained
    from snvbert.pretrained import default_checkpoint
    from snvbert.simulate import simulate

    sim = out_dir / "sim-recall"
    simulate(sim, seed=3, size="demo", panel=3000, targets=100)
    pan = load_panel(sim / "panel.vcf.gz", cache_dir=out_dir / "cache", progress=False)
    tgt = read_target(sim / "array.vcf.gz", chrom=pan.chrom)
    chip = np.searchsorted(pan.pos, tgt.pos)  # the array's sites are panel sites
    describe = load_trained(default_checkpoint(), torch.device("cpu")).describe
    windows = make_windows(
        pan.pos,
        int(describe["window"]["length"]),
        int(describe["window"]["overlap"]),
        int(describe["context_bp"]),
    )
    settings = {"nlist": 64, "nprobe": 8, "hnsw_m": 32, "feature_sites": None}
    exact = retriever(k=k, engine="torch", index="flat", **settings)
    rows = []
    for index in ("ivf", "hnsw"):
        approx = retriever(k=k, engine="faiss", index=index, **settings)
        hits, tied, total, seconds = 0, 0, 0, 0.0
        for w in windows:
            cols = np.flatnonzero((chip >= w.ctx_start) & (chip < w.ctx_end))
            if len(cols) == 0:
                continue
            panel = torch.from_numpy(plus_minus(np.asarray(pan.haplotypes[chip[cols]]).T)).float()
            query = torch.from_numpy(plus_minus(tgt.genotypes[cols].T)).float()
            jitter = torch.from_numpy(
                np.random.default_rng(w.index).random(panel.shape[0]).astype(np.float32) * 0.5
            )
            want_scores, want, _ = exact.search(query, panel, jitter)
            t0 = time.perf_counter()
            got_scores, got, _ = approx.search(query, panel, jitter)
            seconds += time.perf_counter() - t0
            hits += sum(
                len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want, strict=True)
            )
            # a neighbour as close as the exact K-th is as good (ties abound over few sites)
            tied += int((got_scores >= want_scores[:, -1:]).sum())
            total += want.numel()
        rows.append(
            {
                "index": index,
                "haplotypes": pan.n_haps,
                "k": k,
                "windows": len(windows),
                "recall": hits / total,
                "recall_ties": tied / total,
                "seconds": seconds,
            }
        )
    return rows


def run(out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    result = {
        "retrieval": retrieval(),
        "dataloader": dataloader(out_dir),
        "recall": recall(out_dir),
    }
    (out_dir / "retrieval.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nretrieval: {N_QUERIES} queries x {N_SITES} sites, queries per second (higher is better)"
    )
    print(
        f"{'panel':>7} {'K':>4} {'numpy':>9} {'faiss':>9} {'torch':>9} {'snvbert':>9} {'ours/best':>9}"
    )
    for r in result["retrieval"]:
        q = r["qps"]
        print(
            f"{r['panel']:>7} {r['k']:>4} {q.get('numpy_brute', float('nan')):>9.0f} {q['faiss_flat']:>9.0f} "
            f"{q['torch_topk']:>9.0f} {q['snvbert']:>9.0f} {r['ours_vs_fastest']:>9.2f}"
        )
    print("\nrecall@K of approximate search against exact, as imputation searches (README, Scale)")
    print(
        f"{'index':>7} {'haps':>6} {'K':>4} {'windows':>8} {'recall':>7} {'as close':>9} {'search s':>9}"
    )
    for r in result["recall"]:
        print(
            f"{r['index']:>7} {r['haplotypes']:>6} {r['k']:>4} {r['windows']:>8} "
            f"{r['recall']:>7.3f} {r['recall_ties']:>9.3f} {r['seconds']:>9.2f}"
        )
    print(
        "\ntrain dataloader (demo panel, array masks, K=128, 16 haplotypes per batch, retrieval included)"
    )
    print(f"{'workers':>7} {'batches/s':>10} {'items/s':>9} {'s/batch':>8} {'small step s':>12}")
    for r in result["dataloader"]:
        print(
            f"{r['workers']:>7} {r['batches_per_s']:>10.1f} {r['items_per_s']:>9.0f} "
            f"{r['loader_s_per_batch']:>8.3f} {r['small_train_step_s']:>12.3f}"
        )
    return result


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/bench"))
