"""Write a synthetic dataset in the PASCAL VOC 2012 (+ SBD aug) or COCO 2014 layout (see datasets/synthetic.py).

Usage: python -m tools.make_synthetic OUT_DIR [--num-train N] [--num-val M] [--num-test T] [--seed S]
                                       [--layout voc|coco] [--family base|heldout] [--min-size PX]
                                       [--max-size PX] [--workers N] [--crowd-prob P]

The VOC layout goes straight into OUT_DIR (use it as data.root); the COCO one writes OUT_DIR/coco2014 and
OUT_DIR/annotations, after which ``python -m tools.prepare_coco OUT_DIR`` builds the masks and lists.
``--num-test T`` (VOC) adds a ``test`` split of T images with a JPEG only, like VOC's test set (default 0: none).
``--family heldout`` draws the held-out family of docs/heldout_family.md (other shapes, textures, colours, object
scale, clutter and image sizes; for reporting only, never for tuning); ``base`` (default) is the family the demo and
the ablations were tuned on. The family is recorded in OUT_DIR/synthetic.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from datasets.synthetic import CROWD_PROB, FAMILIES, generate
from utils.errors import exit_on_user_error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output folder (must be empty or absent)")
    parser.add_argument("--num-train", type=int, default=400, help="train_aug / train2014 images")
    parser.add_argument("--num-val", type=int, default=100, help="val / val2014 images")
    parser.add_argument("--num-test", type=int, default=0, help="voc layout: test images (JPEG only, no mask)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (same seed => byte-identical files)")
    parser.add_argument("--layout", choices=("voc", "coco"), default="voc", help="on-disk layout")
    parser.add_argument(
        "--family", choices=tuple(FAMILIES), default="base", help="generator family (heldout: for reporting only)"
    )
    sizes = ", ".join(f"{name} {f.size_range[0]}..{f.size_range[1]}" for name, f in FAMILIES.items())
    parser.add_argument("--min-size", type=int, default=None, help=f"smallest image side in pixels ({sizes})")
    parser.add_argument("--max-size", type=int, default=None, help="largest image side in pixels (the family's)")
    parser.add_argument("--workers", type=int, default=0, help="rendering processes (0 = this process)")
    parser.add_argument("--crowd-prob", type=float, default=CROWD_PROB, help="COCO layout: chance of iscrowd=1")
    args = parser.parse_args(argv)

    def body() -> int:
        start = time.perf_counter()
        summary = generate(
            args.out_dir,
            num_train=args.num_train,
            num_val=args.num_val,
            seed=args.seed,
            layout=args.layout,
            min_size=args.min_size,
            max_size=args.max_size,
            workers=args.workers,
            crowd_prob=args.crowd_prob,
            num_test=args.num_test,
            family=args.family,
        )
        seconds = time.perf_counter() - start
        splits = ", ".join(f"{name} {len(ids)}" for name, ids in summary["splits"].items())
        print(
            f"wrote {summary['num_images']} images ({splits}) with {summary['num_objects']} objects "
            f"of the {summary['family']} family in the {summary['layout']} layout to {args.out_dir} in {seconds:.1f} s"
        )
        print("objects per class: " + ", ".join(f"{name} {count}" for name, count in summary["class_counts"].items()))
        return 0

    return exit_on_user_error(body)


if __name__ == "__main__":
    raise SystemExit(main())
