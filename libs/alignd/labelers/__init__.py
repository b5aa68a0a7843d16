"""Labelers: who ranks the K completions of a prompt (no torch, no grpc, no numpy).

A labeler turns (prompt, completions) into a ranking, a best-first permutation
of completion indices (the `ranking` of `alignd.data.Comparison`). Two kinds
sit behind the `Labeler` protocol: the simulated labeler here, and external
labels ingested through the coordinator's API (provided by the coordinator).

Layout: `simulated` (the Labeler protocol, the simulated labeler and its noise), `agreement` (measured and
expected agreement), `calibration` (the temperature for a target agreement). Every name is importable from
`alignd.labelers`.
"""

from __future__ import annotations

from alignd.labelers.agreement import Item as Item
from alignd.labelers.agreement import agreement, expected_agreement, pair_agreement
from alignd.labelers.calibration import PAPER_AGREEMENT as PAPER_AGREEMENT
from alignd.labelers.calibration import Calibration, calibrate_temperature
from alignd.labelers.simulated import GoldScorer, Labeler, SimulatedLabeler

# Item and PAPER_AGREEMENT are importable from here too, outside __all__ as before the split.

__all__ = [
    "Calibration",
    "GoldScorer",
    "Labeler",
    "SimulatedLabeler",
    "agreement",
    "calibrate_temperature",
    "expected_agreement",
    "pair_agreement",
]
