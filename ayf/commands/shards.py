"""Write an image dataset as WebDataset shards with a manifest.

Size-capped .tar shards plus manifest.json (count, shape, classes, per-channel mean/std). Images
are stored as uint8 arrays, bit-exactly.
"""
from __future__ import annotations

import argparse
import json

from ayf.data.shards import Source, arrays_source, digits_source, folder_images, idx_source, write_dataset

EPILOG = """examples:
  ayf shards digits --output data/digits --val_fraction 0.2
  ayf shards idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz \\
      --pad 2 --output data/fashion_mnist/train
  ayf shards folder --root my_images/ --output data/mine      (class = sub-folder name)
  ayf shards arrays --images x.npz --output data/arrays       (keys images/x and labels/y)
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", required=True, help="output folder (must be empty unless --overwrite)")
    common.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    common.add_argument("--val_fraction", type=float, default=0.0,
                        help="hold out this share as OUTPUT/val (the rest goes to OUTPUT/train); default 0: one set")
    common.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    common.add_argument("--pad", type=int, default=0, help="zero-pad every side by this many pixels (28 -> 32: 2)")
    common.add_argument("--max_size_mb", type=float, default=64.0, help="size cap of one shard, MB (uncompressed)")
    common.add_argument("--gzip", action="store_true", help="write .tar.gz shards")
    common.add_argument("--limit", type=int, default=None, help="write only the first N images")

    sub.add_parser("digits", parents=[common], help="scikit-learn's bundled 8x8 digits (needs scikit-learn)")
    s = sub.add_parser("idx", parents=[common], help="IDX files (MNIST / Fashion-MNIST format, .gz allowed)")
    s.add_argument("--images", required=True, help="IDX image file")
    s.add_argument("--labels", default=None, help="IDX label file")
    s = sub.add_parser("arrays", parents=[common], help=".npy or .npz arrays, uint8 or float in [0, 1]")
    s.add_argument("--images", required=True, help=".npy images (N,H,W), (N,H,W,C) or (N,C,H,W), or an .npz")
    s.add_argument("--labels", default=None, help=".npy integer labels (N,)")
    s.add_argument("--images_key", default=None, help="key of the images in an .npz (default: images or x)")
    s.add_argument("--labels_key", default=None, help="key of the labels in an .npz (default: labels or y)")
    s = sub.add_parser("folder", parents=[common], help="a folder of images; the class is the sub-folder")
    s.add_argument("--root", required=True, help="folder with one sub-folder per class, or images directly")
    s.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grayscale) or 3 (RGB); default: from the first image")
    return p


def make_source(args) -> Source:
    if args.source == "digits":
        return Source(*digits_source())
    if args.source == "idx":
        return Source(*idx_source(args.images, args.labels))
    if args.source == "arrays":
        return Source(*arrays_source(args.images, args.labels, args.images_key, args.labels_key))
    items, classes = folder_images(args.root)
    return Source(None, class_names=classes, paths=items, channels=args.channels)


def run(args) -> int:
    manifests = write_dataset(
        make_source(args), args.output, val_fraction=args.val_fraction, seed=args.seed, pad=args.pad,
        limit=args.limit, overwrite=args.overwrite, max_bytes=int(args.max_size_mb * (1 << 20)), gzip=args.gzip,
    )
    for split, m in manifests.items():
        summary = {k: m[k] for k in ("count", "shape", "num_classes")}
        print(f"{split}: {len(m['shards'])} shard(s) {json.dumps(summary)}")
    return 0
