"""Validation during training (SPEC §5.3): CAM, aux-CAM and segmentation mIoU of the model on a split."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Subset

from core import cam as camlib
from core.labels import cam_label
from datasets import collate_eval
from engine.inference import predict_seg_logits
from utils import dist
from utils.checkpoint import unwrap
from utils.logging import progress_bar
from utils.metrics import ConfusionMatrix
from utils.visualize import cam_heatmap, overlay, side_by_side

# The panels of a validation overlay, left to right: named in each image's caption band and in its TensorBoard tag.
OVERLAY_PANELS = ("image", "CAM", "CAM label", "prediction", "ground truth")


@torch.no_grad()
def validate(
    model: nn.Module, dataset, cfg: DictConfig, device: torch.device
) -> tuple[dict[str, float], list[np.ndarray]]:
    """CAM, aux-CAM and segmentation mIoU on ``dataset`` (eval mode), sharded over ranks (SPEC §5.3).

    CAMs are the multi-scale CAMs (§2.1) masked by the image labels, labelled at ``cam.bkg_thre`` by
    :func:`core.labels.cam_label` (the rule of ``tools.evaluate --source cams``); segmentation uses ``eval.*``
    (scales, flip, fusion, resize). Both run in fp32: validation opens no autocast, so neither ``cam.precision``
    nor ``eval.precision`` applies here. Confusion matrices are all-reduced, so every rank returns the same numbers.
    Also returns up to ``train.num_vis`` overlays (:data:`OVERLAY_PANELS`: image | CAM | CAM label | prediction |
    ground truth, named in a caption band on top) from rank 0's first images.
    """
    bare = unwrap(model)
    was_training = bare.training
    bare.eval()
    num_classes, ignore_index = int(cfg.data.num_classes), int(cfg.data.ignore_index)
    matrices = {name: ConfusionMatrix(num_classes, ignore_index) for name in ("cam", "cam_aux", "seg")}
    indices = dist.shard(range(len(dataset)))
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=int(cfg.data.num_workers),
                        collate_fn=collate_eval)  # fmt: skip
    overlays: list[np.ndarray] = []
    ev = cfg.eval
    for item in progress_bar(loader, desc="validate", disable=not dist.is_main_process(), leave=False):
        image = item["img"][0].to(device)[None]  # [1, 3, H, W] uint8
        gt = item["mask"][0].numpy()
        present = torch.nonzero(item["label"][0]).flatten()
        cam, cam_aux = camlib.multiscale_cam(bare, bare.normalize(image), tuple(cfg.cam.scales), int(cfg.cam.max_batch))
        shape = tuple(gt.shape)
        labels = {}
        for name, maps in (("cam", cam), ("cam_aux", cam_aux)):
            kept = maps[0, present.to(device)].float().cpu().numpy()
            labels[name] = cam_label(kept, (present + 1).numpy(), float(cfg.cam.bkg_thre), ignore_index)
            matrices[name].update(labels[name], gt)
        logits = predict_seg_logits(bare, image, tuple(ev.scales), bool(ev.flip), ev.flip_fusion, ev.scale_fusion,
                                    ev.resize, resize_mode=str(ev.resize_mode))  # fmt: skip
        prediction = logits[0].argmax(0).cpu().numpy().astype(np.uint8)
        matrices["seg"].update(prediction, gt)
        if dist.is_main_process() and len(overlays) < int(cfg.train.num_vis):
            rgb = image[0].permute(1, 2, 0).cpu().numpy()
            heat = cam[0, present.to(device)].amax(0).float().cpu().numpy() if len(present) else np.zeros(shape)
            cam_panels = [cam_heatmap(rgb, heat), overlay(rgb, labels["cam"])]
            panels = [rgb, *cam_panels, overlay(rgb, prediction), overlay(rgb, gt)]
            overlays.append(side_by_side(panels, titles=OVERLAY_PANELS))
    results = {}
    for name, matrix in matrices.items():
        results[f"{name}_miou"] = float(matrix.all_reduce().compute()["miou"] or 0.0)
    bare.train(was_training)
    return results, overlays
