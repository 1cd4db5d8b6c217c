"""Session-wide fixtures: small simulated data sets that many test files read (never write)."""

from __future__ import annotations

from pathlib import Path

import pytest

from snvbert.simulate import simulate


@pytest.fixture(scope="session")
def tiny_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean ``size=tiny`` simulation (seed 7): panel, truth, array, map, manifest.

    ~200 kb, 60 panel people, 10 targets, ~20 array sites. Shared by the session: treat the
    directory as read-only (copy it before changing anything).
    """
    out = tmp_path_factory.mktemp("sim")
    simulate(out, seed=7, size="tiny")
    return out


@pytest.fixture(scope="session")
def tiny_sim_noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``tiny_sim`` (same seed, so the same panel and truth) with a messy array:
    1 % genotype errors, 2 % missing calls, unphased GTs. Read-only, like ``tiny_sim``.
    """
    out = tmp_path_factory.mktemp("sim_noisy")
    simulate(
        out,
        seed=7,
        size="tiny",
        array={"error_rate": 0.01, "missing_rate": 0.02, "phased": False},
    )
    return out
