"""SNVBertNet: a BERT-style encoder over one query haplotype window, with neighbour fusion.

Read top to bottom: the config, the embedding, the encoder block, the neighbour fusion (the
retrieval-augmented part), the model that strings them together, then the named sizes
(conf/model/). The batch it reads is described key by key in :mod:`snvbert.data.batch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from importlib.resources import files
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from snvbert.data.batch import MASK, VOCAB_SIZE

# Per (site, neighbour) features the fusion scores; see `neighbour_features`.
N_FUSION_FEATURES = 8
# Index of the Li–Stephens log-posterior feature; a weight of 1 on it reproduces the HMM.
HMM_FEATURE = 7
# Per fusion head the fusion emits: blended ALT fraction (centred), its logit, normalised entropy.
N_FUSION_OUTPUTS = 3
# Clamp for logit(p) of the blended neighbour allele, so a unanimous vote stays finite.
_LOGIT_EPS = 1e-3
# Scale of the logit(p) fusion output, so it enters the residual stream at about unit size.
_LOGIT_SCALE = 4.0
# Clamp for logit of the HMM's P(ALT) in the skip input: |logit| <= 9.2.
_HMM_EPS = 1e-4


def _model_yaml(name: str) -> dict[str, Any]:
    """conf/model/<name>.yaml's own keys: without its defaults list, ``_target_`` and ``???``."""
    node = OmegaConf.create((files("snvbert.conf") / "model" / f"{name}.yaml").read_text())
    return {
        k: v
        for k, v in OmegaConf.to_container(node).items()
        if k not in ("defaults", "_target_") and not OmegaConf.is_missing(node, k)
    }


# The defaults every size shares, read from conf/model/_base.yaml: the one place they are written.
DEFAULTS: dict[str, Any] = _model_yaml("_base")


@dataclass
class NetConfig:
    """The net's settings, one per key of ``model`` in the config.

    No default is written here: those every size shares are conf/model/_base.yaml's
    (:data:`DEFAULTS`), and a size's d_model, n_layer, n_head (and dropout where it differs)
    are conf/model/<size>.yaml's (:data:`SIZES`). :meth:`from_any`, and so ``SNVBertNet(...)``
    and :func:`build_net`, fills in what a caller leaves out from the former, as
    ``model=<size>`` does.
    """

    d_model: int
    n_layer: int
    n_head: int
    dropout: float
    max_len: int  # longest window (sites) the learned position embedding covers
    # Depths 0..n_layer at which neighbours are fused (0 = after the embedding); None -> (0, n_layer).
    fusion_layers: tuple[int, ...] | None
    fusion_heads: int | None  # None -> n_head
    # At init, fusion head h weights neighbours by ((left+1)(right+1))^c_h, c_h spread over this range.
    fusion_init_sharpness: tuple[float, float]
    dist_unit_bp: float  # genomic distance unit of the sinusoidal encoding
    bias: bool  # biases in the blocks' linear layers
    # Add gain * logit(hmm_dose), the data's Li–Stephens P(ALT) over every panel state, to the
    # output logit, with the rest of the head starting near 0: the net starts as the HMM and
    # learns corrections to it.
    hmm_skip: bool
    # With hmm_skip: a hidden site where the HMM's P(ALT) is within this of 0 or 1 takes the
    # HMM's answer (gain * its logit) and is left out of the network's sequence, which holds the
    # typed sites and the uncertain hidden ones, at their own window positions; the network's
    # cost falls with the share of uncertain tokens (4.5 % on the 5 Mb scenario's array at
    # 1e-3). 0: the network runs at every site.
    hmm_certain: float
    # With hmm_certain: a hidden site whose panel minor-allele frequency (the batch's ``af``) is
    # at least this takes the HMM's answer too, whatever its P(ALT). The network's margin over
    # the HMM lies at the rare sites, while the common ones hold most uncertain tokens (57 % at
    # MAF >= 0.05 on the 5 Mb scenario's array). None: every MAF.
    hmm_common_maf: float | None

    def __post_init__(self) -> None:
        # Hydra hands lists as ListConfig; store plain tuples so the config pickles and compares.
        if self.fusion_layers is None:
            self.fusion_layers = (0, self.n_layer)
        self.fusion_layers = tuple(sorted({int(d) for d in self.fusion_layers}))
        self.fusion_init_sharpness = tuple(float(c) for c in self.fusion_init_sharpness)
        if self.fusion_heads is None:
            self.fusion_heads = self.n_head
        self.hmm_certain = float(self.hmm_certain)
        if not 0.0 <= self.hmm_certain < 0.5:
            raise ValueError(f"hmm_certain={self.hmm_certain} must be in [0, 0.5)")
        if self.hmm_common_maf is not None:
            self.hmm_common_maf = float(self.hmm_common_maf)
            if not 0.0 < self.hmm_common_maf <= 0.5:
                raise ValueError(f"hmm_common_maf={self.hmm_common_maf} must be in (0, 0.5]")
        if self.d_model % self.n_head or self.d_model % 2:
            raise ValueError(
                f"d_model={self.d_model} must be even and divisible by n_head={self.n_head}"
            )
        bad = [d for d in self.fusion_layers if not 0 <= d <= self.n_layer]
        if bad:
            raise ValueError(f"fusion_layers {bad} outside 0..n_layer={self.n_layer}")

    @classmethod
    def from_any(
        cls, cfg: NetConfig | Mapping[str, Any] | None = None, **overrides: Any
    ) -> NetConfig:
        """A config from a NetConfig, a dict (checkpoint hparams, Hydra node) or keywords;
        keys not given take :data:`DEFAULTS`."""
        given = asdict(cfg) if isinstance(cfg, NetConfig) else dict(cfg or {})
        given.update(overrides)
        given.pop("_target_", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        missing = sorted(known - set(DEFAULTS) - set(given))
        if missing:
            raise TypeError(f"model config lacks {missing}: a size sets them ({sorted(SIZES)})")
        return cls(**{**DEFAULTS, **given})


class Embedding(nn.Module):
    """token + site index in window + genomic distance from the first site + allele frequency."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.tok = nn.Embedding(VOCAB_SIZE, d)
        self.pos = nn.Embedding(cfg.max_len, d)
        self.af_mlp = nn.Sequential(nn.Linear(3, d), nn.GELU(), nn.Linear(d, d))
        # Periods from 2*pi units (~600 bp) to 2*pi*1e4 units (~6 Mb): spans site spacing to window span.
        inv_freq = 1.0 / (10_000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dist_unit_bp = cfg.dist_unit_bp
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        tokens: Tensor,
        pos_bp: Tensor,
        af: Tensor,
        index: Tensor | None = None,
        origin: Tensor | None = None,
    ) -> Tensor:
        """tokens, pos_bp, af (B, L); ``index`` (B, L) each token's site index in its window
        and ``origin`` (B, 1) the window's first position, when the tokens are a selection of
        the window's sites (default: the whole window, in order)."""
        B, L = tokens.shape
        if index is None:
            if L > self.pos.num_embeddings:
                raise ValueError(
                    f"window of {L} sites exceeds model max_len={self.pos.num_embeddings}"
                )
            index = torch.arange(L, device=tokens.device)
        elif int(index.max()) >= self.pos.num_embeddings:
            raise ValueError(
                f"window of {int(index.max()) + 1} sites exceeds model max_len="
                f"{self.pos.num_embeddings}"
            )
        origin = pos_bp[:, :1] if origin is None else origin
        # Subtract in integers first: bp positions reach 2.5e8, beyond float32's exact range.
        # PAD sites have pos 0, so their distance clamps to 0.
        dist = (pos_bp - origin).clamp(min=0).float() / self.dist_unit_bp  # (B, L)
        angle = dist[..., None] * self.inv_freq  # (B, L, D/2)
        maf = torch.minimum(af, 1 - af)
        # log10(maf) / 4 lies in [-1, 0]: the rare end, where the model most needs resolution.
        af_feats = torch.stack([af, maf, torch.log10(maf + 1e-4) / 4], dim=-1)  # (B, L, 3)
        x = (
            self.tok(tokens)
            + self.pos(index)
            + torch.cat([angle.sin(), angle.cos()], dim=-1)
            + self.af_mlp(af_feats.float())
        )  # (B, L, D)
        return self.drop(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, keep: Tensor | Segments | None) -> Tensor:
        """x (B, L, D); ``keep`` the SDPA mask (True: may attend) or, for a packed row (1, T),
        its :class:`Segments` (attention within each segment)."""
        B, L, D = x.shape
        qkv = self.qkv(x)
        if isinstance(keep, Segments):
            y = keep.attend(qkv.view(L, 3, self.n_head, D // self.n_head), self._sdpa)
            return self.resid_drop(self.proj(y.view(B, L, D)))
        q, k, v = (
            t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in qkv.split(D, 2)
        )  # (B, H, L, Dh)
        y = self._sdpa(q, k, v, keep).transpose(1, 2).contiguous().view(B, L, D)
        return self.resid_drop(self.proj(y))

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)


class Segments:
    """Attention within the segments of a packed row (T tokens, ``segment`` (T,) each one's
    row, rows in increasing order as ``torch.nonzero`` gives them).

    The segments are grouped by length (each group's lengths within a factor of 2 of one
    another) and each group runs as one padded batch: the attention pairs cost about the sum of
    the squared lengths, not T^2 as a block-diagonal mask over the whole row would.
    """

    def __init__(self, segment: Tensor) -> None:
        T = segment.numel()
        _, counts = torch.unique_consecutive(segment, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        self.groups: list[tuple[Tensor, Tensor]] = []
        # group g holds the segments with 2^(g-1) < length <= 2^g
        group = torch.ceil(torch.log2(counts.double())).long()
        for g in torch.unique(group).tolist():
            chosen = torch.nonzero(group == g).squeeze(1)
            n = counts[chosen]
            width = int(n.max())
            slot = torch.arange(width, device=segment.device)
            valid = slot[None, :] < n[:, None]  # (G, W)
            index = torch.where(valid, starts[chosen][:, None] + slot[None, :], T)  # T: padding
            self.groups.append((index, valid))
        # the groups' tokens in their order -> the row's order
        self.inverse = torch.argsort(torch.cat([index[valid] for index, valid in self.groups]))

    def attend(self, qkv: Tensor, sdpa: Any) -> Tensor:
        """qkv (T, 3, H, Dh) -> attention output (T, H * Dh)."""
        T, _, H, Dh = qkv.shape
        padded = torch.cat([qkv, qkv.new_zeros(1, 3, H, Dh)])  # row T: padding
        ys = []
        for index, valid in self.groups:
            q, k, v = padded[index].permute(2, 0, 3, 1, 4).unbind(0)  # each (G, H, W, Dh)
            y = sdpa(q, k, v, valid[:, None, None, :])  # (G, H, W, Dh)
            ys.append(y.transpose(1, 2).reshape(*index.shape, H * Dh)[valid])
        return torch.cat(ys)[self.inverse]


class MLP(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, keep: Tensor | Segments | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


def neighbour_features(
    left: Tensor, right: Tensor, score: Tensor, valid: Tensor, hmm: Tensor | None = None
) -> Tensor:
    """Per (site, neighbour) features that the fusion scores, (B, L, K, N_FUSION_FEATURES).

    The left and right agreement runs carry nearly all the signal (DESIGN, "What we measured"):
    ((left+1)(right+1))^4 is exp(4 * (log1p(left) + log1p(right))), so attention logits linear
    in these features can express that rule exactly, and learn around it.
    """
    ll, lr = torch.log1p(left), torch.log1p(right)  # (B, K, L)
    # Whole-context score, standardised over the valid neighbours of each row (scale-free).
    v = valid.float()
    n = v.sum(1, keepdim=True).clamp(min=1)
    mean = (score * v).sum(1, keepdim=True) / n
    std = (((score - mean) ** 2 * v).sum(1, keepdim=True) / n).sqrt().clamp(min=1.0)
    score_z = ((score - mean) / std * v)[:, :, None].expand_as(ll)  # (B, K, L)
    feats = torch.stack(
        [
            ll,
            lr,
            (left == 0).float(),  # a mismatch right beside the site: the copying switched here
            (right == 0).float(),
            torch.log1p(torch.minimum(left, right)),  # the weaker side bounds the evidence
            ll * lr / 4,  # interaction, so the model can go beyond the product rule
            score_z,
            # log of the neighbour's Li–Stephens copying posterior: softmax over k of this
            # feature alone is the HMM's own weighting (0 when the data does not provide it).
            torch.log(hmm.clamp(min=1e-6)) if hmm is not None else torch.zeros_like(ll),
        ],
        dim=-1,
    )  # (B, K, L, F)
    return feats.transpose(1, 2).contiguous()  # (B, L, K, F)


class NeighbourFusion(nn.Module):
    """Attention over the K retrieved neighbours at each site, separately per site.

    Keys are cheap per-(site, neighbour) features (agreement runs etc.), the value is the
    neighbour's allele, so head h yields p_h(l) = sum_k w_hlk * allele_kl, a blended ALT
    fraction: an HMM-like copying estimate whose weighting the query position chooses. It never
    attends over K*L positions nor pools neighbours into one vector, and with K >= 2 valid keys
    the softmax is not the trivially-1 single-key softmax that sank the second seed.
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        H, Fn = cfg.fusion_heads, N_FUSION_FEATURES
        self.n_head = H
        self.ln = nn.LayerNorm(cfg.d_model)
        self.query = nn.Linear(cfg.d_model, H * Fn)  # per head, a weight on each feature
        self.out = nn.Linear(N_FUSION_OUTPUTS * H, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.init_sharpness = cfg.fusion_init_sharpness

    def reset_query_bias(self) -> None:
        # Start as the measured near-HMM rule, weight ((left+1)(right+1))^c with c from 2 to 5
        # across heads (r² 0.963 at c=4), not as uniform weights: a uniform blend of the
        # neighbours is about the allele frequency (r² 0.37). With the rule in place, step 0
        # already imputes like it, every later step refines rather than rediscovers it, and the
        # entropy diagnostic starts from a meaningful, non-uniform value. Heads of different
        # sharpness let the net choose per site between "copy the best" and "blend many".
        lo, hi = self.init_sharpness
        c = (
            torch.linspace(lo, hi, self.n_head)
            if self.n_head > 1
            else torch.tensor([(lo + hi) / 2])
        )
        bias = torch.zeros(self.n_head, N_FUSION_FEATURES)
        bias[:, 0] = c  # log1p(left)
        bias[:, 1] = c  # log1p(right)
        # The second half of the heads starts as the Li–Stephens HMM instead (weight 1 on its
        # log-posterior), so the net begins between the run rule and the HMM and learns which
        # to trust where.
        hmm_heads = torch.arange(self.n_head) >= self.n_head // 2 if self.n_head > 1 else None
        if hmm_heads is not None:
            bias[hmm_heads] = 0.0
            bias[hmm_heads, HMM_FEATURE] = 1.0
        with torch.no_grad():
            self.query.bias.copy_(bias.flatten())

    def forward(
        self, x: Tensor, feats: Tensor, alleles: Tensor, valid: Tensor, log_n_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, L, D); feats (B, L, K, F); alleles (B, L, K); valid (B, K); log_n_valid (B,).

        Returns the updated x, the fusion summary (B, L, 3H), weights (B, L, H, K) and the
        normalised entropy (B, L, H).
        """
        # fp32 whatever the autocast: in bf16, 1 - 1e-3 rounds to 1 so logit(p) of a unanimous
        # vote is inf, and attention logits near 60 lose the resolution the weighting needs.
        with torch.autocast(x.device.type, enabled=False):
            return self._forward_fp32(
                x.float(), feats.float(), alleles.float(), valid, log_n_valid.float()
            )

    def _forward_fp32(
        self, x: Tensor, feats: Tensor, alleles: Tensor, valid: Tensor, log_n_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, L, _ = x.shape
        q = self.query(self.ln(x)).view(B, L, self.n_head, N_FUSION_FEATURES)  # (B, L, H, F)
        logits = torch.einsum("blhf,blkf->blhk", q, feats)  # (B, L, H, K)
        keep = valid[:, None, None, :]  # (B, 1, 1, K)
        # A finite fill, not -inf: 0 * fill stays 0 in the entropy, and a row with no valid
        # neighbour gives no NaN (its weights are zeroed below).
        logw = torch.log_softmax(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), dim=-1)
        w = logw.exp() * keep  # (B, L, H, K)
        p = torch.einsum("blhk,blk->blh", w, alleles)  # (B, L, H) blended ALT fraction
        entropy = -(w * logw).sum(-1)  # (B, L, H)
        # Normalised to [0, 1] by log(n_valid); one valid key is degenerate by definition -> 0.
        denom = log_n_valid.clamp(min=1e-6)[:, None, None]  # (B, 1, 1)
        ent_norm = torch.where(
            log_n_valid[:, None, None] > 0, entropy / denom, torch.zeros_like(entropy)
        )
        summary = torch.cat(
            [2 * p - 1, torch.logit(p, eps=_LOGIT_EPS) / _LOGIT_SCALE, ent_norm], dim=-1
        )  # (B, L, 3H)
        x = x + self.drop(self.out(summary))
        return x, summary, w, ent_norm


class SNVBertNet(nn.Module):
    """Embedding -> [fusion] -> blocks with fusions at configured depths -> head: one logit per site.

    Build it from a NetConfig, a dict or flat keywords (Hydra: ``_target_`` plus the NetConfig
    fields, so ``model.dropout=0.2`` works).
    """

    def __init__(self, config: NetConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = NetConfig.from_any(config, **kwargs)
        self.config = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.fusion = nn.ModuleDict({str(d): NeighbourFusion(cfg) for d in cfg.fusion_layers})
        self.ln_f = nn.LayerNorm(cfg.d_model)
        # The head reads LN(h) and, directly, the last fusion's summary: a shortcut from the
        # neighbour vote to the logit that does not have to survive the blocks.
        self.n_summary = N_FUSION_OUTPUTS * cfg.fusion_heads
        self.head = nn.Linear(cfg.d_model + self.n_summary, 1)
        if cfg.hmm_skip:
            self.hmm_gain = nn.Parameter(torch.ones(()))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # GPT-2: scale the residual projections so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))
        for f in self.fusion.values():
            f.reset_query_bias()
        if self.config.hmm_skip:
            # The HMM skip carries the prediction at step 0; the head reads the fusion summary
            # with weight 0 and the residual stream with the usual small weights (a correction of
            # ~0.2 in logit; zero weights would starve every block of gradient at the start).
            with torch.no_grad():
                self.head.weight[0, self.config.d_model :] = 0.0
        elif self.config.fusion_layers:
            # The shortcut starts as the mean over fusion heads of logit(p_h): at step 0 the net
            # already predicts like the measured near-HMM rule wherever neighbours are given.
            H, D = self.config.fusion_heads, self.config.d_model
            with torch.no_grad():
                self.head.weight[0, D + H : D + 2 * H] = _LOGIT_SCALE / H

    def forward(
        self, batch: Mapping[str, Tensor], return_weights: bool = False
    ) -> dict[str, Tensor]:
        """Logits (B, L) of P(alt); the fusion's mean normalised entropy; optionally its weights.

        Neighbours are optional: without ``nbr_*`` keys the fusions are skipped (ablation,
        benchmarks) and ``fusion_entropy`` is NaN. With ``hmm_certain`` the network runs over
        :meth:`uncertain_sites` only and the rest take the HMM skip alone; ``ran`` (B, L) says
        where it ran. The chosen sites run packed: all of the batch's in one sequence, attention
        kept within each row (:class:`Segments`), so the cost follows the sites chosen.
        """
        if "packed_rows" in batch:  # neighbour features made at the chosen sites only
            rows, sites = batch["packed_rows"], batch["packed_sites"]
            return self._forward_chosen(batch, rows, sites, True, return_weights)
        run = self.uncertain_sites(batch)
        if run is None:
            out = self._forward(batch, return_weights)
            out["ran"] = ~batch["pad"]
            return out
        rows, sites = torch.nonzero(run, as_tuple=True)
        return self._forward_chosen(batch, rows, sites, False, return_weights)

    def _forward_chosen(
        self,
        batch: Mapping[str, Tensor],
        rows: Tensor,
        sites: Tensor,
        neighbours_packed: bool,
        return_weights: bool = False,
    ) -> dict[str, Tensor]:
        """The network packed over the chosen (row, site) pairs (T,), the skip elsewhere."""
        skip = self._skip_logits(batch)  # (B, L)
        B, L = skip.shape
        ran = torch.zeros_like(batch["pad"]).index_put((rows, sites), torch.ones_like(rows).bool())
        if rows.numel() == 0:  # the HMM is certain everywhere: nothing to run
            out = {"logits": skip, "fusion_entropy": skip.new_tensor(float("nan")), "ran": ran}
            if return_weights:
                k, h = batch["nbr_valid"].shape[1], self.config.fusion_heads
                out["fusion_weights"] = skip.new_zeros(B, h, L, k)
            return out
        packed = _packed_sites(batch, rows, sites, neighbours_packed)
        out = self._forward(packed, return_weights, packed=True)
        out["logits"] = skip.index_put((rows, sites), out["logits"][0].float())
        if "fusion_weights" in out:  # (T, 1, H, K) back at the window's sites
            w = out["fusion_weights"][:, 0]
            full = w.new_zeros(B, L, *w.shape[1:])
            out["fusion_weights"] = full.index_put((rows, sites), w).permute(0, 2, 1, 3)
        out["ran"] = ran
        return out

    def uncertain_sites(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """Where the network runs (``hmm_certain`` > 0), (B, L) bool: every typed site and every
        hidden one whose HMM P(ALT) is more than ``hmm_certain`` from 0 and 1 (and, with
        ``hmm_common_maf``, whose panel MAF is below it); None when it runs everywhere."""
        if "hmm_dose" not in batch or "nbr_alleles" not in batch:
            return None
        return self.chosen_sites(batch["tokens"], batch["pad"], batch["hmm_dose"], batch["af"])

    def chosen_sites(self, tokens: Tensor, pad: Tensor, dose: Tensor, af: Tensor) -> Tensor | None:
        """:meth:`uncertain_sites` from the tokens, pad, the HMM's P(ALT) and the panel ALT
        frequency (B, L) alone (so imputation knows them before retrieval); None when the
        network runs everywhere."""
        eps, common = self.config.hmm_certain, self.config.hmm_common_maf
        if not eps or not self.config.hmm_skip or not self.fusion:
            return None
        dose = dose.float()
        settled = (dose <= eps) | (dose >= 1.0 - eps)
        if common is not None:
            af = af.float()
            settled |= torch.minimum(af, 1.0 - af) >= common
        return ~pad & ~((tokens == MASK) & settled)

    def _skip_logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """gain * logit(P(ALT) of the HMM), the output where the network does not run."""
        return self.hmm_gain * torch.logit(batch["hmm_dose"].float(), eps=_HMM_EPS)

    def _forward(
        self, batch: Mapping[str, Tensor], return_weights: bool, packed: bool = False
    ) -> dict[str, Tensor]:
        """The network over rows of sites (B, L); ``packed``: one row (1, T) of sites from
        several rows (``segment`` (T,) each one's row; attention stays within a row), whose
        neighbour inputs are per site: (T, K, 1), (T, K)."""
        tokens, pad = batch["tokens"], batch["pad"]
        B, L = tokens.shape
        x = self.embed(
            tokens, batch["pos"], batch["af"], batch.get("site_index"), batch.get("origin")
        )  # (B, L, D)
        if packed:
            keep: Tensor | Segments = Segments(batch["segment"])
            fused_pad = torch.zeros(L, 1, dtype=torch.bool, device=tokens.device)
        else:
            keep = ~pad[:, None, None, :]  # (B, 1, 1, L) SDPA: True = may attend to this key
            fused_pad = pad

        nbr = None
        if self.fusion and "nbr_alleles" in batch:
            valid = batch["nbr_valid"]
            feats = neighbour_features(
                batch["nbr_left"].float(),
                batch["nbr_right"].float(),
                batch["nbr_score"].float(),
                valid,
                batch["nbr_hmm"].float() if "nbr_hmm" in batch else None,
            )  # (B, L, K, F); packed (T, 1, K, F)
            alleles = batch["nbr_alleles"].float().transpose(1, 2)  # (B, L, K)
            nbr = (feats, alleles, valid, torch.log(valid.sum(1).float()))

        D = self.config.d_model
        summary = x.new_zeros(B, L, self.n_summary)
        entropies: list[Tensor] = []
        weights = None
        for depth in range(self.config.n_layer + 1):
            if nbr is not None and str(depth) in self.fusion:
                h = x.view(L, 1, D) if packed else x
                h, summary, weights, ent = self.fusion[str(depth)](h, *nbr)
                x, summary = h.view(B, L, D), summary.view(B, L, -1)
                entropies.append(ent.detach()[~fused_pad].mean())
            if depth < self.config.n_layer:
                x = self.blocks[depth](x, keep)

        logits = self.head(torch.cat([self.ln_f(x), summary], dim=-1)).squeeze(-1)  # (B, L)
        if self.config.hmm_skip and nbr is not None:
            if "hmm_dose" not in batch:
                raise ValueError(
                    "model.hmm_skip needs the HMM's dosage in the batch (data.hmm, not null); "
                    "set model.hmm_skip=false to train without it"
                )
            logits = logits.float() + self._skip_logits(batch)
        entropy = torch.stack(entropies).mean() if entropies else logits.new_tensor(float("nan"))
        out = {"logits": logits, "fusion_entropy": entropy}
        if return_weights and weights is not None:
            # (B, H, L, K); packed: as the fusion made it, (T, 1, H, K)
            out["fusion_weights"] = (
                weights.detach() if packed else weights.detach().permute(0, 2, 1, 3)
            )
        return out

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: ``embedding``, ``block.0``..``block.N-1``, ``fusion``, ``head``.

        The training-health check reads gradients per group, so a part that stops learning is
        named in the report.
        """
        groups: dict[str, list[nn.Parameter]] = {"embedding": []}
        groups.update({f"block.{i}": [] for i in range(self.config.n_layer)})
        groups.update({"fusion": [], "head": []})
        for name, p in self.named_parameters():
            part = name.split(".")[0]
            if part == "embed":
                groups["embedding"].append(p)
            elif part == "blocks":
                groups[f"block.{name.split('.')[1]}"].append(p)
            elif part == "fusion":
                groups["fusion"].append(p)
            elif part in ("ln_f", "head", "hmm_gain"):
                groups["head"].append(p)
            else:
                raise AssertionError(f"parameter {name} belongs to no group")
        return groups

    def decay_split(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weight-decayed, not decayed): decay only Linear weights, not norms, biases, embeddings."""
        decay = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        ids = {id(p) for p in decay}
        return decay, [p for p in self.parameters() if id(p) not in ids]

    def count_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# What a net config stored before a key existed means: the behaviour of that version (a
# checkpoint from before model.hmm_certain ran the network at every site, one from before
# model.hmm_common_maf at every MAF).
LEGACY_NET: dict[str, Any] = {"hmm_certain": 0.0, "hmm_common_maf": None}


def net_from_checkpoint(raw: Mapping[str, Any]) -> SNVBertNet:
    """The trained net of a checkpoint ``snvbert.train`` wrote (torch.load's dict), in eval
    mode, without Lightning: its config from ``hyper_parameters["net"]`` (keys it lacks mean
    what they meant when it was written, :data:`LEGACY_NET`), its weights from ``state_dict``."""
    net = SNVBertNet({**LEGACY_NET, **raw["hyper_parameters"]["net"]})
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.eval()


# The per-site keys of a batch, (B, L) or (B, K, L), that a selection of sites gathers.
_SITE_KEYS = ("tokens", "pos", "af", "hmm_dose")
_NEIGHBOUR_SITE_KEYS = ("nbr_left", "nbr_right", "nbr_alleles", "nbr_hmm")


def _packed_sites(
    batch: Mapping[str, Tensor], rows: Tensor, sites: Tensor, neighbours_packed: bool = False
) -> dict[str, Tensor]:
    """The chosen sites (rows, sites) (T,) of a batch as one row (1, T): per-site keys
    (1, T), the neighbour keys per site (T, K, 1) and (T, K), ``segment`` each site's row.
    ``neighbours_packed``: the batch's neighbour keys are already (T, K) (retrieve made them
    at these sites only)."""
    out: dict[str, Tensor] = {}
    for key in _SITE_KEYS:
        if key in batch:
            out[key] = batch[key][rows, sites][None]
    for key in _NEIGHBOUR_SITE_KEYS:
        if key in batch:
            t = batch[key]
            out[key] = (t if neighbours_packed else t[rows, :, sites])[:, :, None]  # (T, K, 1)
    for key in ("nbr_valid", "nbr_score"):
        if key in batch:
            out[key] = batch[key][rows]
    out["pad"] = torch.zeros_like(out["tokens"], dtype=torch.bool)
    out["site_index"] = sites[None]
    out["origin"] = batch["pos"][rows, 0][None]
    out["segment"] = rows
    return out


# What makes each named size, read from conf/model/<size>.yaml: the one place it is written.
SIZES: dict[str, dict[str, Any]] = {
    path.name.removesuffix(".yaml"): _model_yaml(path.name.removesuffix(".yaml"))
    for path in sorted((files("snvbert.conf") / "model").iterdir(), key=lambda p: p.name)
    if path.name.endswith(".yaml") and not path.name.startswith("_")
}


def build_net(size: str, **overrides: Any) -> SNVBertNet:
    """A net of a named size, as ``model=<size>`` builds it, e.g. ``build_net("small", dropout=0.0)``."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    return SNVBertNet(**{**SIZES[size], **overrides})
