"""MSFC loss terms (SPEC §4), one small module each, and `combine` that weighs and sums them."""

from losses.classification import MultiLabelSoftMargin
from losses.combine import TERMS, TermSchedule, active_terms, combine, term_weight
from losses.energy import EnergyLoss
from losses.memory_contrast import MemoryContrast, adaptive_memory_weight
from losses.multiview import MultiViewContrast
from losses.segmentation import BalancedCrossEntropy
from losses.token_contrast import ClassTokenContrast, PatchTokenContrast

__all__ = [
    "TERMS",
    "BalancedCrossEntropy",
    "ClassTokenContrast",
    "EnergyLoss",
    "MemoryContrast",
    "MultiLabelSoftMargin",
    "MultiViewContrast",
    "PatchTokenContrast",
    "TermSchedule",
    "active_terms",
    "adaptive_memory_weight",
    "combine",
    "term_weight",
]
