"""The minor-allele-frequency bins the field reports imputation accuracy by, defined once.

Torch-free, so that the simulator's summary and the metrics read the same edges.
"""

from __future__ import annotations

MAF_EDGES: tuple[float, ...] = (0.0, 0.001, 0.005, 0.01, 0.05, 0.5)
