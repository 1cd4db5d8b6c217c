"""Retrieval and dataloader benchmark.

    python -m snvbert.bench.retrieval [OUT_DIR]     # default outputs/bench; writes retrieval.json

Retrieval: 4,096 queries x 512 sites (half of each query's sites hidden) against 2,000 and
10,000 panel haplotypes, K = 16 and 256, in the same run: a numpy brute force (the masked
Hamming distance written out), faiss ``IndexFlatIP`` (exact), torch matmul + top-k, and our
:class:`~snvbert.data.retrieval.Retriever` (torch engine, with the tie-breaking jitter and
exclusions it adds). Goal: ours >= 0.8x the faster of faiss and torch.

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


def run(out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    result = {"retrieval": retrieval(), "dataloader": dataloader(out_dir)}
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
