"""Class names and ids of the supported datasets. Index 0 is always background."""

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# The 80 official COCO category ids (they skip numbers) and names, in the order that maps them to 1..80.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

COCO_CLASSES: tuple[str, ...] = ("background", *(name for _, name in COCO_CATEGORIES))

# COCO category id -> contiguous label 1..80 (0 is background).
COCO_ID_TO_LABEL: dict[int, int] = {cat_id: i + 1 for i, (cat_id, _) in enumerate(COCO_CATEGORIES)}

# The VOC classes under their COCO names (all 20 exist in COCO); used by the synthetic COCO layout.
VOC_TO_COCO_NAME: dict[str, str] = {
    "aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
    "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv",
}  # fmt: skip


def class_names(dataset: str) -> tuple[str, ...]:
    """Class names including background for ``dataset`` ('voc' or 'coco')."""
    if dataset == "voc":
        return VOC_CLASSES
    if dataset == "coco":
        return COCO_CLASSES
    raise ValueError(f"unknown dataset {dataset!r}: expected 'voc' or 'coco' (config key data.name)")
