"""core/views.py: device-side photometric views."""

import torch

from core.views import PhotometricAugment, flip_boxes

OFF = {"flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}


def _images(b=3, h=8, w=10):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_all_probabilities_zero_is_identity():
    images = _images()
    out, flipped = PhotometricAugment(**OFF)(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, images) and not flipped.any()


def test_each_op_does_what_it_says():
    images = _images()
    flipped_out, flags = PhotometricAugment(**{**OFF, "flip_p": 1.0})(images, torch.Generator())
    assert flags.all() and torch.equal(flipped_out, images.flip(-1))
    gray, _ = PhotometricAugment(**{**OFF, "gray_p": 1.0})(images, torch.Generator())
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    solar, _ = PhotometricAugment(**{**OFF, "solarize_p": 1.0})(images, torch.Generator())
    assert torch.allclose(solar, torch.where(images >= 0.5, 1 - images, images))
    blurred, _ = PhotometricAugment(**{**OFF, "blur_p": 1.0, "blur_sigma": (2.0, 2.0)})(images, torch.Generator())
    assert blurred.std() < images.std()  # blur removes high-frequency variation
    assert torch.allclose(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.05)


def test_same_generator_seed_gives_same_views_and_outputs_stay_in_range():
    images = _images(b=4)
    augment = PhotometricAugment(solarize_p=0.5)
    a, fa = augment(images, torch.Generator().manual_seed(5))
    b, fb = augment(images, torch.Generator().manual_seed(5))
    c, _ = augment(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and torch.equal(fa, fb) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_flip_boxes_mirrors_only_flipped_rows():
    boxes = torch.tensor([[0, 10, 2, 7], [1, 9, 0, 12], [3, 4, 5, 6]])
    out = flip_boxes(boxes, torch.tensor([True, False, True]), width=12)
    assert out.tolist() == [[0, 10, 5, 10], [1, 9, 0, 12], [3, 4, 6, 7]]
    # flipping twice is the identity
    twice = flip_boxes(out, torch.tensor([True, False, True]), width=12)
    assert torch.equal(twice, boxes)
