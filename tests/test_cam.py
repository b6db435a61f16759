"""Tests for core/cam.py: boxes, multi-scale CAMs, token/pair/online/prototype labels, local crops, SMCM views."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.cam import box_mask, multiscale_cam, resize_to_tokens
from core.labels import agreement_pair, online_seg_labels, pair_labels, prototype_labels, token_labels
from core.views import cut_crops, place_local_crops, roi_map, smcm_to_main, smcm_views
from models.par import PAR
from utils.syncs import count_syncs

IGN = 255


# ----------------------------------------------------------------------------------------------------------------------
# box_mask
# ----------------------------------------------------------------------------------------------------------------------


def test_box_mask_cell_centres() -> None:
    # 8×8 image, 4×4 grid → cells of 2 px with centres at 1, 3, 5, 7. Box rows [0, 5): centres 1, 3 inside (5 is not,
    # end-exclusive); columns [2, 8): centres 3, 5, 7 inside.
    box = torch.tensor([[0, 5, 2, 8]])
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, :2, 1:] = True
    assert torch.equal(box_mask(box, (4, 4), (8, 8)), expected)


def test_box_mask_at_full_resolution_is_the_pixel_box() -> None:
    box = torch.tensor([[1, 4, 0, 3], [0, 6, 2, 5]])
    mask = box_mask(box, (6, 5), (6, 5))
    for b, (y0, y1, x0, x1) in enumerate(box.tolist()):
        expected = torch.zeros(6, 5, dtype=torch.bool)
        expected[y0:y1, x0:x1] = True
        assert torch.equal(mask[b], expected)


def test_box_mask_rejects_bad_box() -> None:
    with pytest.raises(ValueError, match="img_box"):
        box_mask(torch.tensor([0, 4, 0, 4]), (2, 2), (4, 4))


# ----------------------------------------------------------------------------------------------------------------------
# multiscale_cam
# ----------------------------------------------------------------------------------------------------------------------


class ConvCAMModel(nn.Module):
    """Stand-in for MSFC: strided convs give token-resolution CAMs; records every batch it is called with."""

    def __init__(self, patch_size: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, patch_size, stride=patch_size)
        self.conv_aux = nn.Conv2d(3, num_classes, patch_size, stride=patch_size)
        with torch.no_grad():
            for conv in (self.conv, self.conv_aux):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
                conv.bias.zero_()
            # Class 2 of the main branch is negative everywhere → ReLU'd to 0 → must stay an all-zero channel.
            self.conv.weight[2].zero_()
            self.conv.bias[2] = -1.0
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, with_seg: bool = True) -> SimpleNamespace:
        assert with_seg is False
        self.calls.append(x.clone())
        return SimpleNamespace(cam=self.conv(x), cam_aux=self.conv_aux(x))


class RampCAMModel(nn.Module):
    """Patch 1, CAM = channel 0 × (1 + column index): position-dependent, so a flip changes the CAM."""

    patch_size = 1

    def forward(self, x: torch.Tensor, with_seg: bool = True) -> SimpleNamespace:
        ramp = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
        return SimpleNamespace(cam=x[:, :1] * ramp, cam_aux=x[:, 1:2])


def test_multiscale_cam_known_answer_single_scale() -> None:
    # Scale 1, patch 1: the pair gives x·r and (un-flipped) x·flip(r), r = [1, 2, 3, 4]; max → x·[4, 3, 3, 4].
    # x row [-1, 1, 2, 0.5]: ReLU(x·[4, 3, 3, 4]) = [0, 3, 6, 2]; min 0, max 6 → [0, 0.5, 1, 1/3]·6/(6 + 1e-5).
    images = torch.zeros(1, 3, 1, 4)
    images[0, 0, 0] = torch.tensor([-1.0, 1.0, 2.0, 0.5])
    images[0, 1, 0] = torch.tensor([0.0, 2.0, 4.0, 1.0])
    cam, cam_aux = multiscale_cam(RampCAMModel(), images, scales=(1.0,))
    expected = torch.tensor([0.0, 3.0, 6.0, 2.0]) / (6.0 + 1e-5)
    torch.testing.assert_close(cam[0, 0, 0], expected, atol=1e-7, rtol=0)
    # Aux branch: x itself (flip-invariant model), min 0, max 4.
    torch.testing.assert_close(cam_aux[0, 0, 0], torch.tensor([0.0, 2.0, 4.0, 1.0]) / (4.0 + 1e-5), atol=1e-7, rtol=0)


def test_multiscale_cam_flip_equivariant_and_normalised() -> None:
    torch.manual_seed(0)
    model = ConvCAMModel()
    images = torch.randn(2, 3, 32, 24)
    cam, cam_aux = multiscale_cam(model, images, scales=(1.0, 0.5, 1.5))
    cam_f, cam_aux_f = multiscale_cam(model, images.flip(-1), scales=(1.0, 0.5, 1.5))
    torch.testing.assert_close(cam_f, cam.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(cam_aux_f, cam_aux.flip(-1), atol=1e-5, rtol=0)
    # The model itself is not flip-equivariant, so the check above is not vacuous.
    single = model(images[:1], with_seg=False).cam
    assert not torch.allclose(model(images[:1].flip(-1), with_seg=False).cam, single.flip(-1), atol=1e-3)

    assert cam.shape == cam_aux.shape == (2, 3, 32, 24)
    for maps in (cam, cam_aux):
        assert maps.min() >= 0 and maps.max() <= 1
    flat = cam.flatten(2)
    assert torch.all(flat[:, :2].amin(-1) == 0)
    torch.testing.assert_close(flat[:, :2].amax(-1), torch.ones(2, 2), atol=1e-4, rtol=0)
    assert torch.all(cam[:, 2] == 0)  # a class that never fires stays 0 (no division blow-up)


def test_multiscale_cam_batches_flip_pairs_per_scale() -> None:
    model = ConvCAMModel()
    images = torch.randn(2, 3, 32, 32)
    cam, _ = multiscale_cam(model, images, scales=(1.0, 0.5, 1.5), max_batch=32)
    # One forward per scale, each holding the 2 images followed by their flips.
    assert [tuple(c.shape) for c in model.calls] == [(4, 3, 32, 32), (4, 3, 16, 16), (4, 3, 48, 48)]
    for call in model.calls:
        torch.testing.assert_close(call[2:], call[:2].flip(-1))

    # max_batch 2: one image with its own flip per forward; same result.
    model.calls.clear()
    cam_small, _ = multiscale_cam(model, images, scales=(1.0, 0.5, 1.5), max_batch=2)
    assert len(model.calls) == 6 and all(c.shape[0] == 2 for c in model.calls)
    for call in model.calls:
        torch.testing.assert_close(call[1], call[0].flip(-1))
    torch.testing.assert_close(cam_small, cam, atol=1e-6, rtol=0)


def test_multiscale_cam_rounds_sizes_to_the_patch_and_merges_equal_sizes() -> None:
    model = ConvCAMModel(patch_size=8)
    images = torch.randn(1, 3, 20, 36)
    # 20·1 / 8 = 2.5 → 3 → 24;  36 / 8 = 4.5 → 5 → 40;  scale 0.5: 10/8 → 8, 18/8 → 16;
    # scale 1.1: 22/8 = 2.75 → 24, 39.6/8 = 4.95 → 40 — the same size as scale 1, so it runs once.
    cam, _ = multiscale_cam(model, images, scales=(1.0, 0.5, 1.1))
    assert [tuple(c.shape[-2:]) for c in model.calls] == [(24, 40), (8, 16)]
    assert cam.shape == (1, 3, 20, 36)


def test_multiscale_cam_real_msfc() -> None:
    from models import MSFC, ViTBackbone

    torch.manual_seed(0)
    backbone = ViTBackbone(
        "vit_tiny_patch16_224", embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=64, pretrained=False
    )
    model = MSFC(
        backbone, num_classes=21, decoder_channels=8, proj_hidden_dim=16, proj_bottleneck_dim=8, proj_out_dim=8
    )
    model.eval()
    images = torch.randn(2, 3, 32, 48)
    cam, cam_aux = multiscale_cam(model, images, scales=(1.0, 0.5), max_batch=4)
    cam_f, _ = multiscale_cam(model, images.flip(-1), scales=(1.0, 0.5), max_batch=4)
    assert cam.shape == cam_aux.shape == (2, 20, 32, 48)
    assert cam.min() >= 0 and cam.max() <= 1 and not cam.requires_grad
    torch.testing.assert_close(cam_f, cam.flip(-1), atol=1e-5, rtol=0)


def test_multiscale_cam_bad_arguments() -> None:
    model = ConvCAMModel()
    with pytest.raises(ValueError, match="max_batch"):
        multiscale_cam(model, torch.randn(1, 3, 8, 8), max_batch=1)
    with pytest.raises(ValueError, match="scales"):
        multiscale_cam(model, torch.randn(1, 3, 8, 8), scales=())
    with pytest.raises(AttributeError, match="patch_size"):
        multiscale_cam(nn.Identity(), torch.randn(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------------------------------
# token_labels / pair_labels / prototype_labels
# ----------------------------------------------------------------------------------------------------------------------


def test_token_labels_thresholds_and_box() -> None:
    # Token grid 3×3 over a 6×6 crop (2 px cells, centres 1, 3, 5); box y1 = 4 puts row 2 outside.
    # high 0.75, low 0.25 (exact in binary, so "==" cases are real equalities).
    scores = torch.zeros(1, 2, 3, 3)
    scores[0, 0] = torch.tensor([[0.9, 0.0, 0.25], [0.1, 0.26, 0.0], [0.9, 0.0, 0.0]])
    scores[0, 1] = torch.tensor([[0.2, 0.75, 0.0], [0.76, 0.0, 0.25], [0.0, 0.9, 0.1]])
    # Row 0: v .9 > high → class 1; v .75 == high → ignore; v .25 == low → 0.
    # Row 1: v .76 → class 2; v .26 in the band → ignore; v .25 (class 2 channel) == low → 0.
    # Row 2: outside the box → ignore whatever the scores.
    expected = torch.tensor([[[1, IGN, 0], [2, IGN, 0], [IGN, IGN, IGN]]])
    labels = token_labels(scores, torch.tensor([[0, 4, 0, 6]]), (6, 6), high=0.75, low=0.25)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, expected)


def test_agreement_pair_is_elementwise_min_and_max() -> None:
    cam = torch.tensor([[[[0.9, 0.1], [0.5, 0.0]]]])
    cam_aux = torch.tensor([[[[0.3, 0.6], [0.5, 1.0]]]])
    lower, upper = agreement_pair(cam, cam_aux)
    assert torch.equal(lower, torch.tensor([[[[0.3, 0.1], [0.5, 0.0]]]]))
    assert torch.equal(upper, torch.tensor([[[[0.9, 0.6], [0.5, 1.0]]]]))
    with pytest.raises(ValueError, match="differ in shape"):
        agreement_pair(cam, cam_aux[..., :1])


def test_token_labels_agreement_ignores_where_the_maps_disagree() -> None:
    # One row of 4 tokens over a 2×8 crop, one class; high 0.75, low 0.25. (final, aux) per token:
    # (0.9, 0.8): both above high → class 1; (0.9, 0.5): only one above high → ignore (published on aux: ignore,
    # on final: class 1); (0.1, 0.6): only one at or below low → ignore (published on final: 0);
    # (0.1, 0.2): both at or below low → 0.
    final = torch.tensor([[[[0.9, 0.9, 0.1, 0.1]]]])
    aux = torch.tensor([[[[0.8, 0.5, 0.6, 0.2]]]])
    box, size = torch.tensor([[0, 2, 0, 8]]), (2, 8)
    lower, upper = agreement_pair(final, aux)
    labels = token_labels(lower, box, size, high=0.75, low=0.25, bg_scores=upper)
    assert torch.equal(labels, torch.tensor([[[1, IGN, IGN, 0]]]))
    # Without bg_scores the rule is the published one on its single map.
    assert torch.equal(token_labels(final, box, size, 0.75, 0.25), torch.tensor([[[1, 1, 0, 0]]]))
    assert torch.equal(
        token_labels(final, box, size, 0.75, 0.25, bg_scores=final), token_labels(final, box, size, 0.75, 0.25)
    )
    with pytest.raises(ValueError, match="background map"):
        token_labels(lower, box, size, 0.75, 0.25, bg_scores=upper[..., :2])


def test_resize_to_tokens_matches_bilinear() -> None:
    cam = torch.rand(2, 3, 16, 16)
    out = resize_to_tokens(cam, (4, 4))
    torch.testing.assert_close(out, F.interpolate(cam, size=(4, 4), mode="bilinear", align_corners=False))


def test_pair_labels_hand_checked() -> None:
    # 2×2 grid [[1, 0], [255, 1]] → tokens [1, 0, 255, 1].
    labels = torch.tensor([[[1, 0], [IGN, 1]], [[0, 0], [2, 0]]])
    pairs = pair_labels(labels)
    expected0 = torch.tensor(
        [[255, 0, 255, 1], [0, 255, 255, 0], [255, 255, 255, 255], [1, 0, 255, 255]], dtype=torch.uint8
    )
    # Second image [0, 0, 2, 0]: background pairs count as "same".
    expected1 = torch.tensor([[255, 1, 0, 1], [1, 255, 0, 1], [0, 0, 255, 0], [1, 1, 0, 255]], dtype=torch.uint8)
    assert pairs.dtype == torch.uint8 and pairs.shape == (2, 4, 4)
    assert torch.equal(pairs[0], expected0)
    assert torch.equal(pairs[1], expected1)
    assert torch.equal(pairs, pairs.transpose(1, 2))


def test_prototype_labels() -> None:
    # Grid 2×3 over a 4×6 crop; box x1 = 4 puts column 2 (centre 5) outside.
    cam = torch.zeros(1, 3, 2, 3)
    cam[0, 0, 0, 0] = 0.5  # == bkg_thre → background
    cam[0, 2, 0, 1] = 0.51  # > bkg_thre → class 3
    cam[0, 1, 1, 0] = 0.9  # class 2
    cam[0, 1, :, 2] = 0.9  # outside the box → 255
    labels = prototype_labels(cam, torch.tensor([[0, 4, 0, 4]]), (4, 6), bkg_thre=0.5)
    assert torch.equal(labels, torch.tensor([[[0, 3, IGN], [2, 0, IGN]]]))


def test_prototype_labels_agreement() -> None:
    # 1×3 grid over a 2×6 crop, two classes, bkg 0.5. Token 0: both maps above → class 2; token 1: the lower map
    # is at the threshold, the upper above → ignore (the branches disagree); token 2: both at or below → 0.
    lower = torch.zeros(1, 2, 1, 3)
    upper = torch.zeros(1, 2, 1, 3)
    lower[0, 1] = torch.tensor([0.8, 0.5, 0.2])
    upper[0, 1] = torch.tensor([0.9, 0.7, 0.5])
    box = torch.tensor([[0, 2, 0, 6]])
    assert torch.equal(prototype_labels(lower, box, (2, 6), 0.5, bg_cam=upper), torch.tensor([[[2, IGN, 0]]]))
    assert torch.equal(prototype_labels(lower, box, (2, 6), 0.5), torch.tensor([[[2, 0, 0]]]))


# ----------------------------------------------------------------------------------------------------------------------
# online_seg_labels
# ----------------------------------------------------------------------------------------------------------------------


def _identity_par(images01: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return masks


def _synthetic_cam() -> tuple[torch.Tensor, torch.Tensor]:
    """16×16, 3 classes, classes 1 and 3 present; crisp regions aligned to even pixels.

    Columns 0–5: class 1 at 1.0 (above the high plane 0.75 → class 1);
    columns 6–9: nothing (below both planes → background);
    columns 10–15: class 3 at 0.5 (between the planes → ignore);
    rows 0–3: absent class 2 at 1.0 everywhere (must never appear).
    """
    cam = torch.zeros(1, 3, 16, 16)
    cam[0, 0, :, 0:6] = 1.0
    cam[0, 2, :, 10:16] = 0.5
    cam[0, 1, 0:4, :] = 1.0
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    return cam, labels


def _region_colours(splits: tuple[int, ...], size: int = 16) -> torch.Tensor:
    """[1, 3, size, size] with vertical bands [0, s1), [s1, s2), ... coloured red, green, blue in turn."""
    image = torch.zeros(1, 3, size, size)
    bounds = [0, *splits, size]
    for band, (x0, x1) in enumerate(itertools.pairwise(bounds)):
        image[0, band % 3, :, x0:x1] = 1.0
    return image


def test_online_seg_labels_known_answer() -> None:
    cam, labels = _synthetic_cam()
    box = torch.tensor([[0, 12, 0, 16]])  # rows 12–15 are padding
    images01 = torch.rand(1, 3, 16, 16)
    out = online_seg_labels(cam, labels, images01, box, _identity_par, high=0.75, low=0.25)
    assert out.shape == (1, 16, 16) and out.dtype == torch.int64
    # Region interiors (2 px away from the region borders, which the ×0.5 round trip blends).
    assert torch.all(out[0, :12, 0:4] == 1)
    assert torch.all(out[0, :12, 7:9] == 0)
    assert torch.all(out[0, :12, 12:16] == IGN)
    assert torch.all(out[0, 12:] == IGN)
    assert not (out == 2).any()


def test_online_seg_labels_bg_cam_decides_background() -> None:
    cam, labels = _synthetic_cam()
    box = torch.tensor([[0, 16, 0, 16]])
    images01 = torch.rand(1, 3, 16, 16)
    published = online_seg_labels(cam, labels, images01, box, _identity_par, high=0.75, low=0.25)
    # bg_cam = cam is the published rule.
    same = online_seg_labels(cam, labels, images01, box, _identity_par, high=0.75, low=0.25, bg_cam=cam)
    assert torch.equal(same, published)
    # A second map that sees class 3 at 0.5 on columns 6-9 (background for cam): no longer background but ignore;
    # the foreground (from cam, columns 0-5) and the ignore band stay.
    bg_cam = cam.clone()
    bg_cam[0, 2, :, 6:10] = 0.5
    out = online_seg_labels(cam, labels, images01, box, _identity_par, high=0.75, low=0.25, bg_cam=bg_cam)
    assert torch.all(out[0, :, 0:4] == 1)
    assert torch.all(out[0, :, 6:16] == IGN)
    assert torch.all(published[0, :, 7:9] == 0)
    with pytest.raises(ValueError, match="bg_cam"):
        online_seg_labels(cam, labels, images01, box, _identity_par, 0.75, 0.25, bg_cam=bg_cam[..., :8])


def test_online_seg_labels_batches_images_with_different_classes() -> None:
    cam, labels = _synthetic_cam()
    cam2 = torch.zeros(1, 3, 16, 16)
    cam2[0, 1, :, 0:10] = 0.9  # image 2 has class 2 only, on its red left part
    cam2[0, 0] = 0.9  # absent class 1 everywhere
    labels2 = torch.tensor([[0.0, 1.0, 0.0]])
    images01 = torch.cat([_region_colours((6, 10)), _region_colours((10,))])
    boxes = torch.tensor([[0, 16, 0, 16], [0, 14, 2, 16]])
    par = PAR(num_iter=3)
    batched = online_seg_labels(
        torch.cat([cam, cam2]), torch.cat([labels, labels2]), images01, boxes, par, high=0.75, low=0.25
    )
    # Per-image runs give the same labels as the batched one (slots padded for the image with fewer classes).
    for b, (c, lab) in enumerate(((cam, labels), (cam2, labels2))):
        single = online_seg_labels(c, lab, images01[b : b + 1], boxes[b : b + 1], par, high=0.75, low=0.25)
        assert torch.equal(batched[b : b + 1], single)
    assert not (batched[0] == 2).any()
    assert not ((batched[1] == 1) | (batched[1] == 3)).any()
    assert torch.all(batched[1, :14, 2:8] == 2)
    assert torch.all(batched[1, :, :2] == IGN) and torch.all(batched[1, 14:] == IGN)


def test_online_seg_labels_with_a_host_class_count_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given most_present (known on the host), the labels are the same and nothing is read from the labels."""
    monkeypatch.delenv("MSFC_DEBUG", raising=False)
    cam, labels = _synthetic_cam()
    cam = torch.cat([cam, cam.flip(-1)])
    labels = torch.cat([labels, torch.tensor([[0.0, 1.0, 0.0]])])
    images01, boxes, par = torch.rand(2, 3, 16, 16), torch.tensor([[0, 16, 0, 16], [2, 16, 0, 14]]), PAR(num_iter=2)
    with count_syncs() as counter:
        read = online_seg_labels(cam, labels, images01, boxes, par, high=0.75, low=0.25)
    assert counter.by_site_kind and set(counter.by_kind) == {"item"}  # the class count, read from the labels
    with count_syncs() as counter:
        given = online_seg_labels(cam, labels, images01, boxes, par, high=0.75, low=0.25, most_present=2)
    assert counter.total == 0, counter.report()
    assert torch.equal(given, read)
    monkeypatch.setenv("MSFC_DEBUG", "1")
    with pytest.raises(ValueError, match="most_present=1"):
        online_seg_labels(cam, labels, images01, boxes, par, high=0.75, low=0.25, most_present=1)


def test_online_seg_labels_with_par_follows_colour_regions() -> None:
    # Image colours match the CAM regions, so PAR sharpens rather than blurs across them.
    cam, labels = _synthetic_cam()
    images01 = _region_colours((6, 10))
    seen: dict[str, torch.Tensor] = {}
    par = PAR()

    def recording_par(img: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        seen["img"], seen["masks"] = img, masks
        return par(img, masks)

    out = online_seg_labels(cam, labels, images01, torch.tensor([[0, 16, 0, 16]]), recording_par, 0.75, 0.25)
    # PAR runs at half resolution on both stacks (2 × (background + 2 classes)), each a distribution over slots.
    assert seen["img"].shape == (1, 3, 8, 8) and seen["masks"].shape == (1, 6, 8, 8)
    torch.testing.assert_close(seen["masks"][:, :3].sum(1), torch.ones(1, 8, 8))
    assert torch.all(out[0, :, 0:4] == 1)
    assert torch.all(out[0, :, 7:9] == 0)
    assert torch.all(out[0, :, 12:] == IGN)
    assert not (out == 2).any()


def test_online_seg_labels_no_foreground_is_background() -> None:
    cam = torch.rand(1, 3, 8, 8)
    out = online_seg_labels(
        cam, torch.zeros(1, 3), torch.rand(1, 3, 8, 8), torch.tensor([[0, 8, 0, 6]]), _identity_par, 0.75, 0.25
    )
    expected = torch.zeros(1, 8, 8, dtype=torch.int64)
    expected[..., 6:] = IGN
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------------------------------------------------
# roi_map / place_local_crops / cut_crops
# ----------------------------------------------------------------------------------------------------------------------


def test_roi_map_thresholds() -> None:
    cam = torch.zeros(1, 2, 1, 5)
    cam[0, 0, 0] = torch.tensor([0.25, 0.26, 0.75, 0.1, 0.0])
    cam[0, 1, 0] = torch.tensor([0.0, 0.0, 0.0, 0.8, 0.74])
    # v = [0.25, 0.26, 0.75, 0.8, 0.74] → [0 (== low), 1, 2 (== high), 2, 1].
    assert torch.equal(roi_map(cam, high=0.75, low=0.25), torch.tensor([[[0, 1, 2, 2, 1]]]))


def _reference_mean_roi(roi: torch.Tensor, tops: torch.Tensor, size: int) -> torch.Tensor:
    means = torch.empty(tops.shape[:2], dtype=torch.float64)
    for b in range(tops.shape[0]):
        for i, (y, x) in enumerate(tops[b].tolist()):
            means[b, i] = roi[b, y : y + size, x : x + size].double().mean()
    return means


def test_place_local_crops_bounds_distinct_negative_and_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    roi = torch.randint(0, 3, (2, 32, 40), generator=gen)
    roi[0, :, :20] = 0  # a background-heavy half so both negative and positive crops occur
    tops, negative = place_local_crops(roi, num=8, size=8, neg_thre=0.2, generator=torch.Generator().manual_seed(1))
    assert tops.shape == (2, 8, 2) and tops.dtype == torch.int64 and negative.shape == (2, 8)
    assert tops[..., 0].min() >= 0 and tops[..., 0].max() <= 32 - 8
    assert tops[..., 1].min() >= 0 and tops[..., 1].max() <= 40 - 8
    for b in range(2):
        assert len({tuple(t) for t in tops[b].tolist()}) == 8
        # Enough candidates exist, so every centre has ROI ≤ 1.
        centres = roi[b, tops[b, :, 0] + 4, tops[b, :, 1] + 4]
        assert (centres <= 1).all()
    assert torch.equal(negative, _reference_mean_roi(roi, tops, 8) <= 0.2)

    again, _ = place_local_crops(roi, num=8, size=8, neg_thre=0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tops, again)


def test_place_local_crops_negative_flag_rule() -> None:
    # All-background ROI → mean 0 ≤ 0.2 → negative; all-ROI-1 → mean 1 → positive (but still a candidate).
    roi = torch.stack([torch.zeros(16, 16, dtype=torch.int64), torch.ones(16, 16, dtype=torch.int64)])
    _, negative = place_local_crops(roi, num=4, size=6, neg_thre=0.2, generator=torch.Generator().manual_seed(0))
    assert negative[0].all() and not negative[1].any()


def test_place_local_crops_fallback_when_too_few_candidates() -> None:
    roi = torch.full((2, 20, 20), 2, dtype=torch.int64)
    roi[0, 9:11, 9:11] = 0  # image 0: 4 candidates < 6 → any interior pixel
    roi[1, 5:15, 5:15] = 1  # image 1: 100 candidates ≥ 6 → only those
    tops, negative = place_local_crops(roi, num=6, size=8, neg_thre=0.2, generator=torch.Generator().manual_seed(3))
    assert len({tuple(t) for t in tops[0].tolist()}) == 6
    assert tops.min() >= 0 and tops.max() <= 12
    centres0 = roi[0, tops[0, :, 0] + 4, tops[0, :, 1] + 4]
    assert (centres0 == 2).sum() >= 2  # at most 4 of the 6 centres can be candidates
    centres1 = roi[1, tops[1, :, 0] + 4, tops[1, :, 1] + 4]
    assert (centres1 == 1).all()
    assert torch.equal(negative, _reference_mean_roi(roi, tops, 8) <= 0.2)


@pytest.mark.parametrize("num", [1, 3, 8])
def test_place_local_crops_draws_as_torch_multinomial_without_a_host_read(num: int) -> None:
    """The centres are those of torch.multinomial(weights, num, replacement=False) on the same generator, and the
    generator ends in the same state; no host read (torch.multinomial validates its weights on the host)."""
    for seed in range(20):
        roi = torch.randint(0, 3, (3, 20, 24), generator=torch.Generator().manual_seed(seed))
        roi[0] = 2
        roi[0, 8:10, 8:10] = 0  # image 0: 4 candidates, fewer than 8 → every interior pixel
        size, span_y, span_x = 6, 15, 19
        interior = roi[:, size // 2 : size // 2 + span_y, size // 2 : size // 2 + span_x].flatten(1)
        candidates = interior <= 1
        weights = torch.where((candidates.sum(1) >= num)[:, None], candidates, torch.ones_like(candidates)).float()
        ours, reference = torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(100 + seed)
        with count_syncs() as counter:
            tops, _ = place_local_crops(roi, num=num, size=size, neg_thre=0.2, generator=ours)
        assert counter.total == 0, counter.report()
        picked = torch.multinomial(weights, num, replacement=False, generator=reference)
        assert torch.equal(tops, torch.stack([picked // span_x, picked % span_x], dim=-1))
        assert torch.equal(ours.get_state(), reference.get_state())


def test_place_local_crops_bad_arguments() -> None:
    roi = torch.zeros(1, 10, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="size"):
        place_local_crops(roi, num=2, size=12, neg_thre=0.2)
    with pytest.raises(ValueError, match="num"):
        place_local_crops(roi, num=10, size=9, neg_thre=0.2)  # only 2×2 = 4 interior centres


def test_cut_crops_image_major(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    tops = torch.tensor([[[0, 0], [5, 7]], [[2, 3], [6, 8]]])
    crops = cut_crops(images, tops, 4)
    assert crops.shape == (4, 3, 4, 4)
    for b in range(2):
        for i in range(2):
            y, x = tops[b, i].tolist()
            assert torch.equal(crops[b * 2 + i], images[b, :, y : y + 4, x : x + 4])
    monkeypatch.delenv("MSFC_DEBUG", raising=False)
    with count_syncs() as counter:
        cut_crops(images, tops, 4)
    assert counter.total == 0  # the fit check reads tops on the host: MSFC_DEBUG=1 only
    monkeypatch.setenv("MSFC_DEBUG", "1")
    with pytest.raises(ValueError, match="do not fit"):
        cut_crops(images, torch.tensor([[[7, 0]], [[0, 0]]]), 4)


# ----------------------------------------------------------------------------------------------------------------------
# SMCM views
# ----------------------------------------------------------------------------------------------------------------------


def _token_model(x: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """A "network" that is exactly equivariant on pixel → token maps: average pooling by the patch."""
    return F.avg_pool2d(x, patch)


def test_smcm_views_shapes_and_content() -> None:
    x = torch.randn(2, 3, 32, 32)
    views = smcm_views(x, scale=0.75, patch=8)
    assert views["rot"].shape == (2, 3, 32, 32)
    assert views["scaled"].shape == (2, 3, 24, 24)  # round(32·0.75 / 8)·8 = 24
    assert views["quads"].shape == (8, 3, 16, 16)
    assert torch.equal(views["rot"], x.flip(-1).flip(-2))
    q = views["quads"]
    for b in range(2):
        assert torch.equal(q[4 * b + 0], x[b, :, :16, :16])  # top-left
        assert torch.equal(q[4 * b + 1], x[b, :, :16, 16:])  # top-right
        assert torch.equal(q[4 * b + 2], x[b, :, 16:, :16])  # bottom-left
        assert torch.equal(q[4 * b + 3], x[b, :, 16:, 16:])  # bottom-right


def test_smcm_views_rejects_quadrants_off_the_patch_grid() -> None:
    with pytest.raises(ValueError, match="multiple of 2·patch"):
        smcm_views(torch.randn(1, 3, 24, 24), scale=0.75, patch=8)  # 12 is not a multiple of 8


def test_smcm_to_main_inverts_rot_and_quads_exactly() -> None:
    torch.manual_seed(0)
    maps = torch.randn(2, 4, 32, 32, requires_grad=True)  # 4 "classes"
    main = _token_model(maps)  # [2, 4, 4, 4]
    views = smcm_views(maps, scale=0.75, patch=8)
    back = smcm_to_main({k: _token_model(v) for k, v in views.items()}, (4, 4))
    assert back.shape == (3, 2, 4, 4, 4)  # rot, scaled, quads
    torch.testing.assert_close(back[0], main, atol=1e-6, rtol=0)
    torch.testing.assert_close(back[2], main, atol=1e-6, rtol=0)
    # Differentiable: the mapped views carry gradient back to the input.
    back.sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_smcm_to_main_stitches_quadrants_in_order() -> None:
    # Distinct value per quadrant and image: TL 1, TR 2, BL 3, BR 4, plus 10·b.
    maps = torch.zeros(2, 1, 32, 32)
    for b in range(2):
        maps[b, 0, :16, :16], maps[b, 0, :16, 16:] = 1 + 10 * b, 2 + 10 * b
        maps[b, 0, 16:, :16], maps[b, 0, 16:, 16:] = 3 + 10 * b, 4 + 10 * b
    quads = _token_model(smcm_views(maps, scale=0.75, patch=8)["quads"])  # [8, 1, 2, 2], constant per quadrant
    assert quads[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 11, 12, 13, 14]
    stitched = smcm_to_main({"quads": quads}, (4, 4))[0]
    torch.testing.assert_close(stitched, _token_model(maps))
    # Stitched then resized when the main grid differs (here 8×8: nearest-quadrant values survive in the corners).
    big = smcm_to_main({"quads": quads}, (8, 8))[0]
    assert big[1, 0, 0, 0] == 11 and big[1, 0, 0, -1] == 12 and big[1, 0, -1, 0] == 13 and big[1, 0, -1, -1] == 14


def test_smcm_to_main_scaled_view_keeps_image_order() -> None:
    # A per-image constant map survives any resize, so the scaled view maps back to exactly that constant.
    maps = torch.tensor([1.0, 5.0]).view(2, 1, 1, 1).expand(2, 3, 32, 32)
    views = smcm_views(maps, scale=0.75, patch=8)
    back = smcm_to_main({"scaled": _token_model(views["scaled"])}, (4, 4))
    assert back.shape == (1, 2, 3, 4, 4)
    torch.testing.assert_close(back[0], _token_model(maps))


def test_smcm_to_main_rejects_unknown_view() -> None:
    with pytest.raises(ValueError, match="view_cams keys"):
        smcm_to_main({"rotated": torch.zeros(1, 2, 4, 4)}, (4, 4))
