"""FD, KID and precision / recall between generated and real features, computed by torch-fidelity's
metric functions, plus cached reference features of the real data."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ayf.io import load_torch

log = logging.getLogger("ayf.metrics")


def fidelity_metrics(fake: torch.Tensor, real: torch.Tensor, kid_subset_size: int = 1000,
                     prc_neighborhood: int = 3, seed: int = 0) -> dict:
    """``{fd, kid, kid_std, precision, recall}`` of fake vs real features ``(N, D)``.

    FD is the Frechet distance of Gaussians fitted to the features (FID when the features are
    Inception's); KID the unbiased polynomial-kernel MMD^2 over random subsets; precision /
    recall the k-NN manifold estimates of Kynkaanniemi et al. 2019 (k = ``prc_neighborhood``)."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    fake, real = fake.double().cpu(), real.double().cpu()
    subset = min(kid_subset_size, len(fake), len(real))
    kid = kid_features_to_metric(fake, real, kid_subset_size=subset, kid_subsets=100, rng_seed=seed, verbose=False)
    # the full pairwise-distance matrix costs 4 N M bytes: stream it in blocks for large sets
    blocked = len(fake) * len(real) > 10000**2
    prc = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=prc_neighborhood,
                                 save_cpu_ram=blocked, verbose=False)
    return {
        "fd": frechet_from_features(fake, real),
        "kid": kid["kernel_inception_distance_mean"],
        "kid_std": kid["kernel_inception_distance_std"],
        "precision": prc["precision"],
        "recall": prc["recall"],
    }


def frechet_from_features(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Frechet distance of Gaussians fitted to two feature sets (torch-fidelity's FID formula)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f.double().cpu()) for f in (fake, real)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def reference_features(extractor, images_fn, count: int, cache_dir: Optional[Path] = None, device="cpu") -> torch.Tensor:
    """Features of the real data, computed once and cached as
    ``<cache_dir>/reference-<extractor name>-<count>.pt`` (beside the shards).

    ``images_fn()`` returns the uint8 images; it is called only on a cache miss."""
    path = Path(cache_dir) / f"reference-{extractor.name}-{count}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load_torch(str(path), "reference feature cache (delete it to recompute)")
    feats = extractor.extract(images_fn(), device=device)
    if path is not None:
        try:
            tmp = path.with_name(path.name + ".tmp")
            torch.save(feats, tmp)
            os.replace(tmp, path)
        except OSError as err:  # a read-only data folder only costs the recomputation
            log.warning("could not cache reference features at %s: %s", path, err)
    return feats

