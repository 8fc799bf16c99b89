"""Write an image dataset as WebDataset shards with a manifest.

Size-capped .tar shards plus manifest.json (count, shape, classes, per-channel mean/std). Images
are stored as uint8 arrays, bit-exactly; with --vae, as the latents of a diffusers AutoencoderKL (the
posterior's mean and std, or its mean), and an interrupted write resumes when run again.
"""
from __future__ import annotations

import argparse
import json

from ayf.data.shards import (
    LATENT_DTYPES,
    CaptionSource,
    Source,
    arrays_source,
    caption_records,
    digits_source,
    folder_images,
    idx_source,
    write_dataset,
)
from ayf.encoders import NORMALISATIONS, PIXEL_RANGES, STORED, VAEEncoder
from ayf.errors import ConfigError

EPILOG = """examples:
  ayf shards digits --output data/digits --val_fraction 0.2
  ayf shards idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz \\
      --pad 2 --output data/fashion_mnist/train
  ayf shards folder --root my_images/ --output data/mine      (class = sub-folder name)
  ayf shards arrays --images x.npz --output data/arrays       (keys images/x and labels/y)
  ayf shards folder --root imagenet512/ --output data/in512_latents --vae sd-vae-ft-mse/
      (latents of a local diffusers AutoencoderKL, normalised like EDM2's; run it again to resume)
  ayf shards captions --input pairs.jsonl --pipeline FLUX.1-dev/ --output data/pairs
      (latents by the pipeline's VAE and the captions' embeddings by its text encoders)
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
    common.add_argument("--subset", type=int, default=None, help="write a random N of the images (seeded by "
                        "--seed), every class in its share: e.g. a 50k reference set for FID")
    vae = common.add_argument_group("latents (a diffusers AutoencoderKL; needs ayf[diffusers])")
    vae.add_argument("--vae", default=None, metavar="DIR",
                     help="store the latents of the AutoencoderKL saved in DIR instead of pixels")
    vae.add_argument("--vae_normalisation", default=None,
                     help=f"{' or '.join(NORMALISATIONS)} (default), or a JSON object "
                          '\'{"mean": [...], "std": [...]}\' of the raw latents per channel')
    vae.add_argument("--vae_pixel_range", default=None, choices=tuple(PIXEL_RANGES),
                     help="the pixel range the VAE is fed: [0,1] (default, EDM2's) or [-1,1] (diffusers')")
    vae.add_argument("--stored", default=None, choices=STORED,
                     help="posterior (default): the posterior's mean and std, a fresh latent per read; mean: the mean")
    vae.add_argument("--latent_dtype", default=None, choices=LATENT_DTYPES, help="the stored arrays' type (default float32)")
    vae.add_argument("--batch_size", type=int, default=None, help="images per VAE batch (default 32)")
    vae.add_argument("--device", default=None, help="where the VAE runs (default: cuda when available, else cpu)")

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
    s.add_argument("--resolution", type=int, default=None,
                   help="scale each image's short side to N and crop the centre square (ImageNet's usual crop); "
                        "default: keep the images as they are (all of one size)")
    s = sub.add_parser("captions", parents=[common], help="image-caption pairs: latents by a text-to-image "
                       "pipeline's VAE and the captions' embeddings by its text encoders (needs ayf[text])")
    s.add_argument("--input", required=True, help='a JSONL file of {"image": path, "caption": text} lines '
                   '(optionally "label": an int), or a folder with captions.jsonl; paths relative to it')
    s.add_argument("--pipeline", required=True, metavar="DIR",
                   help="the pipeline folder (pipe.save_pretrained): its text encoders, and its vae/ unless --pixels")
    s.add_argument("--pixels", action="store_true", help="store the pixels (in model units) instead of latents")
    s.add_argument("--max_length", type=int, default=None, help="tokens of the sequence text encoder per caption "
                   "(default: its tokenizer's, at most 512); longer captions are truncated, and said so")
    s.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 or 3; default: from the first image")
    s.add_argument("--resolution", type=int, default=None, help="scale the short side to N, crop the centre square")
    return p


def make_source(args) -> Source:
    if args.source == "captions":
        records, (bad, first) = caption_records(args.input)
        if bad:
            print(f"skipped {bad} bad record(s) of {bad + len(records)} (first: {first})")
        return CaptionSource(records, args.channels, args.resolution)
    if args.source == "digits":
        return Source(*digits_source())
    if args.source == "idx":
        return Source(*idx_source(args.images, args.labels))
    if args.source == "arrays":
        return Source(*arrays_source(args.images, args.labels, args.images_key, args.labels_key))
    items, classes = folder_images(args.root)
    if args.resolution is not None and args.resolution < 1:
        raise ConfigError(f"--resolution must be a positive size, got {args.resolution}")
    return Source(None, class_names=classes, paths=items, channels=args.channels, resolution=args.resolution)


LATENT_OPTIONS = ("vae_normalisation", "vae_pixel_range", "stored", "latent_dtype", "batch_size", "device")


def parse_normalisation(text):
    """``--vae_normalisation``: a preset name, or a JSON object."""
    if text is None or not text.lstrip().startswith("{"):
        return text or "edm2_sd"
    try:
        return json.loads(text)
    except ValueError as err:
        raise ConfigError(f"--vae_normalisation is not a JSON object: {err}") from None


def make_encoder(args):
    """The VAEEncoder of ``--vae`` (None without it; the latent options need it)."""
    if args.vae is None:
        given = [f"--{k}" for k in LATENT_OPTIONS if getattr(args, k, None) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) --vae")
        return None
    return VAEEncoder(args.vae, normalisation=parse_normalisation(args.vae_normalisation),
                      pixel_range=args.vae_pixel_range or "[0,1]", stored=args.stored or "posterior")


def caption_encoders(args) -> tuple:
    """``(image encoder, PromptEncoder)`` of ``ayf shards captions``: the pipeline's VAE (or pixels)
    and its text encoders."""
    from ayf.encoders import IdentityEncoder
    from ayf.text import PromptEncoder

    if args.vae is not None:
        raise ConfigError("ayf shards captions takes the pipeline's VAE (its vae/ folder), or --pixels: leave out --vae")
    prompts = PromptEncoder(args.pipeline, args.max_length, device=args.device or "cpu")
    if args.pixels:
        return IdentityEncoder(), prompts
    return VAEEncoder(f"{args.pipeline}/vae", normalisation=parse_normalisation(args.vae_normalisation or "vae_config"),
                      pixel_range=args.vae_pixel_range or "[-1,1]", stored=args.stored or "posterior"), prompts


def run(args) -> int:
    prompts = None
    if args.source == "captions":
        encoder, prompts = caption_encoders(args)
    else:
        encoder = make_encoder(args)  # a bad VAE folder fails before the source is read
    latent = {} if encoder is None else {"encoder": encoder, "latent_dtype": args.latent_dtype or "float32",
                                         "batch_size": args.batch_size or 32, "device": args.device}
    if prompts is not None:
        latent["prompts"] = prompts
        print(f"captions encoded by {prompts.folder} (tokens {prompts.lengths[0]} / {prompts.lengths[1]})")
    if encoder is not None:
        print(f"encoding with {encoder.describe()}")
    source = make_source(args)
    if args.subset is not None:
        if args.limit is not None:
            raise ConfigError("give --subset or --limit, not both")
        source = source.subset(args.subset, args.seed)
    manifests = write_dataset(
        source, args.output, val_fraction=args.val_fraction, seed=args.seed, pad=args.pad,
        limit=args.limit, overwrite=args.overwrite, max_bytes=int(args.max_size_mb * (1 << 20)), gzip=args.gzip,
        **latent,
    )
    for split, m in manifests.items():
        summary = {k: m[k] for k in ("count", "shape", "num_classes", "space", "moments_shape") if k in m}
        print(f"{split}: {len(m['shards'])} shard(s) {json.dumps(summary)}")
    return 0
