"""The HMM's settings: ``data.hmm`` in training (recorded in every checkpoint), and their checks.

The YAML (``conf/data/default.yaml``, key ``hmm``) is where every value is set; this module
holds no default of its own but Beagle's IBS parameters (:class:`IBSConfig`), which the YAML's
``ibs: {}`` and ``python -m snvbert.impute hmm_states=ibs`` both fill in from here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from snvbert.errors import SnvbertError
from snvbert.hmm.model import li_stephens_err

# Beagle's imp-states: with more reference haplotypes than this, its IBS selection chooses the
# states. Measured: the IBS states beat every haplotype as states with 2,000 of them (both 5 Mb
# scenarios, every MAF bin) and lose with 600 (the demo panel: 0.904 against 0.909 overall;
# Beagle too is better there with every haplotype a state, 0.914 against 0.913).
IBS_MIN_HAPS = 1600

STATES = ("panel", "neighbours")
SELECT = ("score", "posterior")
SCOPES = ("context", "chromosome")

# The random stream of the training batches' HMM mismatch rates (``err_max``).
ERR_STREAM = 3


@dataclass(frozen=True)
class IBSConfig:
    """Beagle 5.4's IBS state selection (its ``ImpIbs``): the single home of its defaults.

    0.1 cM steps, IBS judged over 7 of them, imp-states=1600 spread over a 6 cM segment
    (1600 // 60 = 26 haplotypes a step).
    """

    haps: int = 26
    step_cm: float = 0.1
    steps: int = 7

    @classmethod
    def parse(cls, value: Mapping[str, Any], where: str = "data.hmm.ibs") -> IBSConfig:
        """A partial mapping (missing keys take Beagle's values), checked."""
        given = dict(value)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise SnvbertError(
                f"{where} has unknown key(s) {', '.join(unknown)}; it takes {', '.join(names)}"
            )
        defaults = cls()
        ibs = cls(
            haps=int(given.get("haps", defaults.haps)),
            step_cm=float(given.get("step_cm", defaults.step_cm)),
            steps=int(given.get("steps", defaults.steps)),
        )
        if ibs.haps < 1 or ibs.steps < 1 or not ibs.step_cm > 0:
            raise SnvbertError(f"{where} needs haps >= 1, steps >= 1 and step_cm > 0 (got {given})")
        return ibs


def ibs_by_default(n_ref_haps: int) -> bool:
    """The ``auto`` rule, in training and imputation alike: IBS states above IBS_MIN_HAPS."""
    return n_ref_haps > IBS_MIN_HAPS


def ibs_for_panel(ibs: IBSConfig | str | None, n_ref_haps: int) -> IBSConfig | None:
    """``ibs`` with ``auto`` made concrete for a reference of ``n_ref_haps`` haplotypes."""
    if ibs == "auto":
        return IBSConfig() if ibs_by_default(n_ref_haps) else None
    return ibs  # type: ignore[return-value]


@dataclass(frozen=True)
class HMMConfig:
    """The Li–Stephens HMM of the inputs, as ``data.hmm`` sets it.

    ``ne`` the switch rate's effective size (``1 - exp(-4 ne d / N)``, d in Morgans); ``err``
    the mismatch rate (validation's, and training's when ``err_max`` is None), or ``auto``:
    Li and Stephens' rate for the panel (:func:`li_stephens_err`), what imputation's EM fits to
    an error-free array; ``err_max`` training batches draw their rate log-uniformly from
    [err, err_max]; ``states`` ``panel`` (every haplotype a query may copy) or ``neighbours``
    (the K retrieved); ``select`` how the K neighbours are chosen (``score`` the retrieval
    score, ``posterior`` the panel HMM's copying mass in the window); ``ibs`` the states
    Beagle's IBS selection keeps (an :class:`IBSConfig`), None (every one) or ``auto`` (as
    imputation decides: IBS above IBS_MIN_HAPS reference haplotypes); ``scope`` where the panel
    HMM runs in training: over the window's retrieval ``context`` or, for array levels, over
    the ``chromosome``'s chip sites as imputation runs it.
    """

    ne: float
    err: float | str
    err_max: float | None
    states: str
    select: str
    ibs: IBSConfig | str | None
    scope: str

    @classmethod
    def parse(cls, value: Mapping[str, Any], where: str = "data.hmm") -> HMMConfig:
        """The YAML's mapping, every key required and checked; a one-line error otherwise."""
        given = dict(value)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        missing = [n for n in names if n not in given]
        if unknown or missing:
            raise SnvbertError(
                f"{where} takes exactly the keys {', '.join(names)} "
                f"(unknown: {', '.join(unknown) or 'none'}; missing: {', '.join(missing) or 'none'})"
                f"; set {where}=null to train without the HMM"
            )
        ibs = given["ibs"]
        if ibs is not None and ibs != "auto":
            if not isinstance(ibs, Mapping):
                raise SnvbertError(f"{where}.ibs={ibs} must be auto, null or a mapping")
            ibs = IBSConfig.parse(ibs, f"{where}.ibs")
        err = given["err"]
        cfg = cls(
            ne=float(given["ne"]),
            err=err if err == "auto" else float(err),
            err_max=None if given["err_max"] is None else float(given["err_max"]),
            states=str(given["states"]),
            select=str(given["select"]),
            ibs=ibs,
            scope=str(given["scope"]),
        )
        cfg.check(where)
        return cfg

    @classmethod
    def from_checkpoint(cls, value: Mapping[str, Any]) -> HMMConfig:
        """As recorded in a checkpoint; checkpoints of earlier versions omitted keys at their
        then-code defaults (states neighbours, select score, scope context, no ibs, no err_max)."""
        old = {"err_max": None, "states": "neighbours", "select": "score", "ibs": None}
        given = {**old, "scope": "context", **{k: v for k, v in value.items() if k != "enabled"}}
        return cls.parse(given, "the checkpoint's data.hmm")

    def check(self, where: str = "data.hmm") -> None:
        if self.states not in STATES:
            raise SnvbertError(f"{where}.states='{self.states}' must be one of {STATES}")
        if self.select not in SELECT:
            raise SnvbertError(f"{where}.select='{self.select}' must be one of {SELECT}")
        if self.scope not in SCOPES:
            raise SnvbertError(f"{where}.scope='{self.scope}' must be one of {SCOPES}")
        if not self.ne > 0:
            raise SnvbertError(f"{where}.ne={self.ne:g} must be positive")
        if self.states != "panel":
            for key, bad in (
                ("select=posterior", self.select == "posterior"),
                ("ibs", self.ibs is not None),
                ("scope=chromosome", self.scope == "chromosome"),
            ):
                if bad:
                    raise SnvbertError(
                        f"{where}.{key} needs {where}.states=panel (states={self.states})"
                    )
        if self.err != "auto" and not 0.0 < float(self.err) < 0.5:
            raise SnvbertError(f"{where}.err={self.err} must be auto or lie in (0, 0.5)")
        lo = 0.0 if self.err == "auto" else float(self.err)
        if self.err_max is not None and not lo <= self.err_max < 0.5:
            raise SnvbertError(
                f"{where}.err_max={self.err_max:g} must lie in [{where}.err, 0.5), or be null"
            )

    def resolved(self, n_ref_haps: int) -> HMMConfig:
        """``auto`` values made concrete for a panel of ``n_ref_haps`` haplotypes."""
        err = li_stephens_err(n_ref_haps) if self.err == "auto" else self.err
        err_max = None if self.err_max is None else max(self.err_max, float(err))
        return replace(self, err=err, err_max=err_max, ibs=ibs_for_panel(self.ibs, n_ref_haps))

    def for_step(self, seed: int, stream: int, step: int | None) -> HMMConfig:
        """The HMM one batch runs (no ``err_max`` left to draw from): a training step's rate
        (``step`` given, ``err_max`` set) drawn log-uniformly from [err, err_max], a pure
        function of (seed, step) so a resumed run draws the same; otherwise ``err``."""
        if self.err_max is None:
            return self
        if step is None:
            return replace(self, err_max=None)
        u = np.random.default_rng((seed, stream, ERR_STREAM, step)).random()
        lo, hi = math.log(float(self.err)), math.log(self.err_max)
        return replace(self, err=math.exp(lo + u * (hi - lo)), err_max=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for checkpoints and logs (:meth:`from_checkpoint` reads it back)."""
        out = asdict(self)
        if isinstance(self.ibs, IBSConfig):
            out["ibs"] = asdict(self.ibs)
        return out
