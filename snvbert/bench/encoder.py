"""Encoder benchmark: our blocks vs torch.nn.TransformerEncoder, fusion cost, training throughput.

``python -m snvbert.bench.encoder [OUT_DIR]`` prints a table and writes ``OUT_DIR/encoder.json``.
All figures are CPU wall-clock medians over repeats; the machine's thread count is recorded.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snvbert.data.batch import MASK
from snvbert.model.net import SIZES, SNVBertNet, build_net, neighbour_features

B, L, K = 16, 256, 128
REPEATS = 5


def fake_batch(B: int, L: int, K: int, mask_rate: float = 0.5, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors in the batch.py layout (no signal: for timing only). The HMM's P(ALT)
    lies in (0.01, 0.99) everywhere, so the network runs at every site (``model.hmm_certain``
    leaves none to the HMM): the full encoder's cost."""
    g = torch.Generator().manual_seed(seed)
    alleles = torch.randint(0, 2, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < mask_rate
    return {
        "tokens": alleles.masked_fill(mask, MASK),
        "alleles": alleles,
        "mask": mask,
        "pad": torch.zeros(B, L, dtype=torch.bool),
        "af": torch.rand(B, L, generator=g) * 0.5,
        "pos": torch.arange(L).expand(B, L) * 150 + 1_000_000,
        "nbr_valid": torch.ones(B, K, dtype=torch.bool),
        "nbr_score": torch.randn(B, K, generator=g) * 10,
        "nbr_alleles": torch.randint(0, 2, (B, K, L), generator=g).float(),
        "nbr_left": torch.randint(0, 30, (B, K, L), generator=g).float(),
        "nbr_right": torch.randint(0, 30, (B, K, L), generator=g).float(),
        "hmm_dose": 0.01 + 0.98 * torch.rand(B, L, generator=g),
    }


def _median_seconds(*fns: Callable[[], Any], repeats: int) -> list[float]:
    """Median wall time of each function, run interleaved (a, b, a, b, ...).

    Interleaving exposes each candidate to the same background load, which matters on a
    shared machine: timing one after the other lets a neighbour's burst land on one side only.
    """
    for fn in fns:
        fn()  # warm-up: allocator, kernel selection
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _fwd_bwd(model: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def step() -> None:
        model(x).sum().backward()

    return step


def encoder_vs_torch(size: str, repeats: int) -> dict[str, float]:
    """Forward+backward of the block stack alone (no embedding, fusion or head), same input."""
    cfg = SIZES[size]
    d, n_layer, n_head = cfg["d_model"], cfg["n_layer"], cfg["n_head"]
    ours = build_net(size, dropout=0.0).blocks
    layer = nn.TransformerEncoderLayer(
        d, n_head, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    theirs = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
    x = torch.randn(B, L, d, requires_grad=True)
    pad = torch.zeros(B, L, dtype=torch.bool)
    keep = ~pad[:, None, None, :]

    def run_ours(h: Tensor) -> Tensor:
        for block in ours:
            h = block(h, keep)
        return h

    t_ours, t_torch = _median_seconds(
        _fwd_bwd(run_ours, x),
        _fwd_bwd(lambda h: theirs(h, src_key_padding_mask=pad), x),
        repeats=repeats,
    )
    return {"ours_s": t_ours, "torch_s": t_torch, "ratio": t_ours / t_torch}


def fusion_cost(net: SNVBertNet, batch: dict[str, Tensor], repeats: int) -> dict[str, float]:
    """What the K neighbours add to a forward+backward: the whole net with and without them,
    and the fusion path alone (neighbour features and every fusion layer) timed directly."""
    plain = {k: v for k, v in batch.items() if not k.startswith("nbr_")}
    x = torch.randn(B, L, net.config.d_model, requires_grad=True)

    def fusion_only() -> None:
        valid = batch["nbr_valid"]
        feats = neighbour_features(
            batch["nbr_left"], batch["nbr_right"], batch["nbr_score"], valid
        )  # (B, L, K, F)
        alleles = batch["nbr_alleles"].transpose(1, 2)  # (B, L, K)
        log_n = torch.log(valid.sum(1).float())
        h = x
        for fusion in net.fusion.values():
            h = fusion(h, feats, alleles, valid, log_n)[0]
        h.sum().backward()

    with_f, without, alone = _median_seconds(
        lambda: net(batch)["logits"].sum().backward(),
        lambda: net(plain)["logits"].sum().backward(),
        fusion_only,
        repeats=repeats,
    )
    return {
        "with_fusion_s": with_f,
        "without_fusion_s": without,
        "fusion_s": alone,
        "fusion_layers": len(net.fusion),
    }


def train_throughput(net: SNVBertNet, batch: dict[str, Tensor], repeats: int) -> dict[str, float]:
    """A full training step (forward, masked loss, backward, AdamW) on a fake batch."""
    opt = torch.optim.AdamW(net.parameters())
    m = batch["mask"]

    def step() -> None:
        logits = net(batch)["logits"]
        loss = F.binary_cross_entropy_with_logits(logits[m], batch["alleles"][m].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    (t,) = _median_seconds(step, repeats=repeats)
    return {
        "step_s": t,
        "items_per_s": B / t,
        "masked_tokens_per_s": m.sum().item() / t,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run(
    out_dir: Path, sizes: tuple[str, ...] = ("compact", "small", "large"), repeats: int = REPEATS
) -> dict:
    """Run every measurement for each size, print a table, write ``out_dir/encoder.json``."""
    results: dict[str, Any] = {
        "setup": {
            "B": B,
            "L": L,
            "K": K,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "note": "peak_rss_mb is the process's peak so far (ru_maxrss), sizes run small to large",
        }
    }
    batch = fake_batch(B, L, K)
    for size in sizes:
        net = build_net(size, dropout=0.0)
        results[size] = {
            "params": net.count_parameters(),
            "encoder": encoder_vs_torch(size, repeats),
            "fusion": fusion_cost(net, batch, repeats),
            "train": train_throughput(net, batch, repeats),
        }
    _print_table(results, sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoder.json").write_text(json.dumps(results, indent=2))
    return results


def _print_table(results: dict[str, Any], sizes: tuple[str, ...]) -> None:
    s = results["setup"]
    print(
        f"encoder bench: B={s['B']} L={s['L']} K={s['K']}, {s['threads']} threads, median of {s['repeats']}"
    )
    head = (
        f"{'size':<7}{'params':>11}{'ours s':>9}{'torch s':>9}{'ratio':>7}{'net s':>8}"
        f"{'no-nbr s':>9}{'fusion s':>9}{'step s':>8}{'items/s':>9}{'mtok/s':>9}{'rss MB':>8}"
    )
    print(head)
    print("  (ours/torch: block stack fwd+bwd; net s / no-nbr s: whole net fwd+bwd with / without")
    print(
        "   the K neighbours; fusion s: the fusion path alone; step: fwd+bwd+AdamW; mtok = masked tokens)"
    )
    for size in sizes:
        r = results[size]
        e, f, t = r["encoder"], r["fusion"], r["train"]
        print(
            f"{size:<7}{r['params']:>11,}{e['ours_s']:>9.3f}{e['torch_s']:>9.3f}{e['ratio']:>7.2f}"
            f"{f['with_fusion_s']:>8.3f}{f['without_fusion_s']:>9.3f}{f['fusion_s']:>9.3f}"
            f"{t['step_s']:>8.3f}{t['items_per_s']:>9.1f}"
            f"{t['masked_tokens_per_s']:>9.0f}{t['peak_rss_mb']:>8.0f}"
        )


if __name__ == "__main__":
    run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/bench"))
