"""Heads (SPEC §1.2): classifier logits/CAM, LargeFOV decoder, DINO-style projection head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.heads import LargeFOV, ProjectionHead, TokenClassifier


def test_logits_are_classifier_on_global_max_pool():
    torch.manual_seed(0)
    clf = TokenClassifier(dim=6, num_classes=4)
    tokens = torch.randn(3, 6, 5, 7)
    gmp = tokens.amax(dim=(2, 3))  # [B, D] channel-wise max over positions
    expected = gmp @ clf.weight.view(4, 6).T
    torch.testing.assert_close(clf(tokens), expected)
    assert clf(tokens).shape == (3, 4)


def test_cam_is_weight_on_every_token_and_equals_logit_at_dominant_token():
    torch.manual_seed(0)
    clf = TokenClassifier(dim=6, num_classes=4)
    tokens = torch.rand(2, 6, 4, 5)
    # Token (2, 3) is the channel-wise maximum in every channel, so GMP(tokens) is exactly that token and
    # logit_c = w_c · GMP = CAM_c at (2, 3); it is also the CAM argmax for classes whose weights are all positive.
    tokens[:, :, 2, 3] = 2.0 + torch.rand(2, 6)
    cam = clf.cam(tokens)
    assert cam.shape == (2, 4, 4, 5)
    torch.testing.assert_close(cam, torch.einsum("cd,bdhw->bchw", clf.weight.view(4, 6), tokens))
    torch.testing.assert_close(cam[:, :, 2, 3], clf(tokens))
    with torch.no_grad():
        clf.weight.abs_()
    cam = clf.cam(tokens)
    argmax = cam.flatten(2).argmax(-1)
    assert (argmax == 2 * 5 + 3).all()
    torch.testing.assert_close(cam.flatten(2).amax(-1), clf(tokens))


def test_classifier_has_no_bias():
    names = [n for n, _ in TokenClassifier(8, 3).named_parameters()]
    assert names == ["weight"]


def test_largefov_shape_receptive_field_and_no_bias():
    torch.manual_seed(0)
    dec = LargeFOV(in_channels=8, num_classes=5, channels=6, dilation=2)
    assert all(m.bias is None for m in dec.modules() if isinstance(m, torch.nn.Conv2d))
    assert sum(isinstance(m, torch.nn.Conv2d) for m in dec.modules()) == 3
    x = torch.randn(2, 8, 13, 13, requires_grad=True)
    out = dec(x)
    assert out.shape == (2, 5, 13, 13)  # token resolution kept
    # Two 3x3 convs at dilation 2 reach offsets {-4, -2, 0, 2, 4} around the centre (6, 6), nothing else.
    out[0, :, 6, 6].sum().backward()
    reach = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(13, 13, dtype=torch.bool)
    expected[2:11:2, 2:11:2] = True
    assert reach[10, 6] and reach[2, 2]
    assert not (reach & ~expected).any()


def test_largefov_matches_explicit_definition():
    torch.manual_seed(0)
    dec = LargeFOV(4, 3, channels=5, dilation=3)
    x = torch.randn(1, 4, 7, 7)
    y = F.relu(F.conv2d(x, dec.conv1.weight, padding=3, dilation=3))
    y = F.relu(F.conv2d(y, dec.conv2.weight, padding=3, dilation=3))
    torch.testing.assert_close(dec(x), F.conv2d(y, dec.classifier.weight))


def test_projection_head_gain_fixed_and_output_bounded():
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=8, hidden_dim=16, bottleneck_dim=4, out_dim=10)
    g = head.weight_gain
    assert g.shape == (10, 1) and torch.equal(g, torch.ones(10, 1)) and not g.requires_grad
    x = torch.randn(5, 8)
    out = head(x)
    assert out.shape == (5, 10)
    # Unit bottleneck · unit-norm rows -> every output is a cosine in [-1, 1].
    assert out.abs().max() <= 1 + 1e-5
    row_norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(10))
    # Known answer: the output equals normalise(mlp(x)) @ normalise_rows(v).T.
    v = head.last_layer.parametrizations.weight.original1
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(v, dim=1).T
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert g.grad is None and v.grad is not None and v.grad.abs().sum() > 0


def test_projection_head_gain_stays_one_after_optimizer_step():
    torch.manual_seed(0)
    head = ProjectionHead(8, 16, 4, 10)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    head(torch.randn(3, 8)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(head.weight_gain, torch.ones(10, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(10))


@pytest.mark.parametrize("bad", [(0, 3), (4, 0)])
def test_classifier_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive"):
        TokenClassifier(*bad)
