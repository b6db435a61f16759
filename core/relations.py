"""Relation labels for IRN from an image's CAMs (SPEC §9): pure functions shared by tools/make_relations.py and the
tests.

A relation label marks the pixels whose class the CAMs are sure of, for training the boundary network on pairs of
them: confident foreground (class ids), confident background (0) and an unsure band (``ignore_index``, 255) between.
It comes from two *label-unary* DenseCRFs of the same image:

1. each of two background planes, ``fg_thre`` (0.30) and ``bg_thre`` (0.05), is put in front of the present classes'
   CAMs and arg-maxed (background winning ties: :func:`core.labels.cam_label`) into a slot map 0..K
   (0 = background, k = ``classes[k-1]``);
2. each slot map is refined by DenseCRF from a unary that trusts the given slot with probability ``gt_prob`` (0.7)
   and spreads the rest evenly (:func:`label_probabilities`: pydensecrf's ``unary_from_labels``), then arg-maxed;
3. the label is the high plane's class where it is foreground, 0 where both maps are background, else
   ``ignore_index`` (:func:`combine_relations`, the §2.4 band rule :func:`core.pseudo_labels.dual_label`).

:func:`relation_label` is the whole recipe for one image. The tool runs the same steps split in two
(:func:`relation_unaries`, then the two DenseCRF jobs streamed through ``utils.crf.CRFPool``, then
:func:`combine_relations`), so its labels equal :func:`relation_label`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from core.labels import cam_label
from core.pseudo_labels import check_image, dual_label
from utils.crf import dense_crf


def label_probabilities(label: np.ndarray, n: int, gt_prob: float) -> np.ndarray:
    """The probabilities whose ``-log`` is pydensecrf's label unary (``unary_from_labels(label, n, gt_prob,
    zero_unsure=False)``).

    ``utils.crf.dense_crf(image, label_probabilities(label, n, gt_prob))`` is therefore the label-unary DenseCRF: its
    unary is ``-log`` of these values (clipped at ``utils.crf.PROB_CLIP`` = 1e-5, which only a (1 − gt_prob)/(n − 1)
    below it, i.e. n > 30,000 at gt_prob 0.7, would reach), equal to ``unary_from_labels``'s to float32 precision.

    Args:
        label: int [H, W] (any integer dtype) label map in 0..n-1.
        n: the number of labels, >= 1.
        gt_prob: probability of the given label, in (0, 1).

    Returns:
        float32 [n, H, W]: ``gt_prob`` at the given label, (1 − gt_prob)/(n − 1) at every other; all ones when n = 1
        (a single label is certain).
    """
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label_probabilities: label must be an integer [H, W] map, got {label.dtype} {label.shape}")
    if n < 1:
        raise ValueError(f"label_probabilities: n must be >= 1, got {n}")
    if not 0 < gt_prob < 1:
        raise ValueError(f"label_probabilities: gt_prob must be in (0, 1), got {gt_prob}")
    if label.size and (label.min() < 0 or label.max() >= n):
        raise ValueError(f"label_probabilities: labels must be in 0..{n - 1}, got {label.min()}..{label.max()}")
    if n == 1:
        return np.ones((1, *label.shape), dtype=np.float32)
    prob = np.full((n, *label.shape), (1.0 - gt_prob) / (n - 1), dtype=np.float32)
    np.put_along_axis(prob, label[None].astype(np.intp), np.float32(gt_prob), axis=0)
    return prob


def relation_unaries(
    cam: np.ndarray, *, fg_thre: float, bg_thre: float, gt_prob: float
) -> tuple[np.ndarray, np.ndarray]:
    """The two label-unary probability maps of an image, before DenseCRF (steps 1 and the unary of step 2).

    Args:
        cam: float [K, H, W] CAMs of the present classes (K may be 0), in [0, 1].
        fg_thre: background plane of the confident-foreground map (``irn.fg_thre``, 0.30).
        bg_thre: background plane of the confident-background map (``irn.bg_thre``, 0.05).
        gt_prob: probability of the arg-max slot (``irn.crf_gt_prob``, 0.7).

    Returns:
        (fg, bg), each float32 [K+1, H, W] (:func:`label_probabilities` of the slot map at that plane; channel 0 =
        background, k = the k-th present class). With K = 0 both are ones [1, H, W], which DenseCRF leaves unchanged,
        so they are already the marginals :func:`combine_relations` needs.
    """
    cam = np.asarray(cam)
    if cam.ndim != 3:
        raise ValueError(f"relation_unaries: cam must be [K, H, W], got shape {cam.shape}")
    slots = np.arange(1, cam.shape[0] + 1)
    maps = (cam_label(cam, slots, plane) for plane in (fg_thre, bg_thre))
    fg, bg = (label_probabilities(index, len(slots) + 1, gt_prob) for index in maps)
    return fg, bg


def combine_relations(
    fg_marginals: np.ndarray, bg_marginals: np.ndarray, classes: Sequence[int] | np.ndarray, ignore_index: int = 255
) -> np.ndarray:
    """The relation label from the two maps' DenseCRF marginals (step 3).

    Each map is arg-maxed over its K+1 channels (background winning ties, then the first class:
    :func:`core.labels.cam_label` on its class channels against channel 0) and the two are combined by the band rule.

    Args:
        fg_marginals: float [K+1, H, W] marginals of the ``fg_thre`` map (channel 0 = background).
        bg_marginals: float [K+1, H, W] marginals of the ``bg_thre`` map.
        classes: the K present class ids (1..C_fg), the channels 1..K.
        ignore_index: the label of the unsure band (``data.ignore_index``).

    Returns:
        uint8 [H, W]: the fg map's class where it is foreground, 0 where both maps are background, ``ignore_index``
        elsewhere.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    for name, marginals in (("fg_marginals", fg_marginals), ("bg_marginals", bg_marginals)):
        if np.ndim(marginals) != 3 or len(marginals) != len(classes) + 1:
            raise ValueError(f"combine_relations: {name} must be [K+1={len(classes) + 1}, H, W], "
                             f"got shape {np.shape(marginals)}")  # fmt: skip
    fg, bg = (cam_label(m[1:], classes, m[0], ignore_index) for m in (fg_marginals, bg_marginals))
    return dual_label(fg, bg, ignore_index)


def relation_label(
    cam: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    image: np.ndarray,
    *,
    fg_thre: float,
    bg_thre: float,
    gt_prob: float,
    crf_params: Mapping[str, Any],
    ignore_index: int = 255,
) -> np.ndarray:
    """The relation label of one image (SPEC §9), DenseCRF run in this process.

    Args:
        cam: float [K, H, W] CAMs of the present classes (K may be 0), in [0, 1].
        classes: [K] their class ids (1..C_fg).
        image: uint8 [H, W, 3] RGB (the CRF's colour features); not read when K = 0.
        fg_thre: background plane of the confident-foreground map (``irn.fg_thre``, 0.30).
        bg_thre: background plane of the confident-background map (``irn.bg_thre``, 0.05).
        gt_prob: label-unary probability of the arg-max slot (``irn.crf_gt_prob``, 0.7).
        crf_params: keyword arguments of :func:`utils.crf.dense_crf` (``iters``, ``gauss_sxy``, ...: the ``irn.crf_*``
            keys, see ``tools.make_relations.relation_crf_params``).
        ignore_index: the label of the unsure band (``data.ignore_index``).

    Returns:
        uint8 [H, W]: class ids (confident foreground), 0 (confident background), ``ignore_index``; all 0 when K = 0.
    """
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    cam = np.asarray(cam)
    if cam.ndim != 3 or cam.shape[0] != len(classes):
        raise ValueError(f"relation_label: cam must be [K={len(classes)}, H, W] (K = len(classes)), got {cam.shape}")
    fg, bg = relation_unaries(cam, fg_thre=fg_thre, bg_thre=bg_thre, gt_prob=gt_prob)
    if len(classes):  # K = 0: the unaries are the marginals already (one label)
        check_image(image, cam.shape[1:], "relation_label")
        fg, bg = (dense_crf(image, prob, **dict(crf_params)) for prob in (fg, bg))
    return combine_relations(fg, bg, classes, ignore_index)
