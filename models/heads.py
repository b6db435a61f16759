"""MSFC heads (SPEC §1.2): token classifiers with their CAMs, the LargeFOV decoder, the DINO-style projection head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class TokenClassifier(nn.Module):
    """Bias-free 1×1 conv D -> C_fg on a token map (SPEC §1.2).

    The image logits use the classifier on the global max pool of the tokens; the CAM is the same weight applied to
    every token (no bias, no ReLU), so a view's CAM is `F.conv2d(tokens, classifier.weight)`.

    Args:
        dim: token dimension D.
        num_classes: foreground classes C_fg.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        if dim <= 0 or num_classes <= 0:
            raise ValueError(f"TokenClassifier: dim and num_classes must be positive, got {dim}, {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, dim, 1, 1))
        # The default nn.Conv2d initialisation (uniform, bound 1/sqrt(fan_in)), as for the conv this replaces.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image logits from `tokens [B, D, h, w]` -> `[B, C_fg]` = W · GMP(tokens) (SPEC §1.2)."""
        pooled = F.adaptive_max_pool2d(tokens, 1)
        return F.conv2d(pooled, self.weight).flatten(1)

    def cam(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class activation map `[B, C_fg, h, w]` = W · token at every position (no bias, no ReLU)."""
        return F.conv2d(tokens, self.weight)


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV style decoder on the final tokens (SPEC §1.2), output at token resolution.

    3×3 conv (dilation d) -> ch, ReLU, 3×3 conv (dilation d) -> ch, ReLU, 1×1 conv -> C; no biases.

    Args:
        in_channels: token dimension D.
        num_classes: C including background.
        channels: hidden width (512).
        dilation: dilation d of both 3×3 convs (5).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 5) -> None:
        super().__init__()
        if min(in_channels, num_classes, channels, dilation) <= 0:
            raise ValueError(
                f"LargeFOV: in_channels, num_classes, channels, dilation must be positive, got "
                f"{in_channels}, {num_classes}, {channels}, {dilation}"
            )
        # padding = dilation keeps the token grid size for a 3×3 kernel.
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        # He initialisation for the convs followed by ReLU keeps the activation scale through the bias-free stack.
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens [B, D, h, w]` -> segmentation logits `[B, C, h, w]`."""
        x = F.relu(self.conv1(tokens))
        x = F.relu(self.conv2(x))
        return self.classifier(x)


class ProjectionHead(nn.Module):
    """DINO-style projection head for the class-token contrast (SPEC §1.2, §4.3).

    Linear D -> hidden, GELU, Linear hidden -> hidden, GELU, Linear hidden -> bottleneck, L2-normalise, then a
    weight-normalised Linear bottleneck -> out without bias whose gain g is fixed at 1 (not trainable), so every
    output unit is a cosine between the bottleneck vector and a unit-norm prototype.

    Args:
        in_dim: D.
        hidden_dim: MLP width (2048).
        bottleneck_dim: L2-normalised bottleneck (256).
        out_dim: output dimension (1024).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 1024) -> None:
        super().__init__()
        if min(in_dim, hidden_dim, bottleneck_dim, out_dim) <= 0:
            raise ValueError(
                f"ProjectionHead: dims must be positive, got {in_dim}, {hidden_dim}, {bottleneck_dim}, {out_dim}"
            )
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        # weight = g · v / ||v|| per output row (dim 0); g is fixed at 1 so only the direction v is learned.
        self.last_layer = weight_norm(last, name="weight", dim=0)
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(False)

    @property
    def weight_gain(self) -> torch.Tensor:
        """The weight-norm magnitude g `[out_dim, 1]` (fixed at 1)."""
        return self.last_layer.parametrizations.weight.original0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [N, D]` -> `[N, out_dim]`."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, eps=1e-6)
        return self.last_layer(x)
