"""MSFC loss terms (SPEC §4), one small module each, and `combine` that weighs and sums them; the second stage's
cross-entropies (SPEC §10, `losses/soft_ce.py`); IRN's affinity loss (SPEC §9, `losses/affinity.py`)."""

from losses.affinity import AffinityLoss
from losses.classification import MultiLabelSoftMargin
from losses.combine import TERMS, TermSchedule, active_terms, combine, term_weight
from losses.energy import EnergyLoss
from losses.memory_contrast import MemoryContrast, adaptive_memory_weight
from losses.multiview import MultiViewContrast
from losses.segmentation import BalancedCrossEntropy
from losses.soft_ce import HardCrossEntropy, SoftCrossEntropy
from losses.token_contrast import ClassTokenContrast, PatchTokenContrast

__all__ = [
    "TERMS",
    "AffinityLoss",
    "BalancedCrossEntropy",
    "ClassTokenContrast",
    "EnergyLoss",
    "HardCrossEntropy",
    "MemoryContrast",
    "MultiLabelSoftMargin",
    "MultiViewContrast",
    "PatchTokenContrast",
    "SoftCrossEntropy",
    "TermSchedule",
    "active_terms",
    "adaptive_memory_weight",
    "combine",
    "term_weight",
]
