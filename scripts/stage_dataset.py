#!/usr/bin/env python
"""Turn a dataset into what the job reads (MNIST IDX, gzip) and upload it to any fsspec URI.

  python scripts/stage_dataset.py digits DEST            scikit-learn's bundled 8x8 digits, no download
  python scripts/stage_dataset.py idx SRC_DIR DEST       local MNIST IDX files (raw or .gz)
      [--t10k-as-train]  stage a t10k-only folder (like ../shared/data/mnist-t10k) as the train set

DEST is a local path or s3://, gs://, memory:// (S3-compatible endpoints via AWS_ENDPOINT_URL).
"""

import argparse
import gzip
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from job import storage  # noqa: E402
from job.data import MNIST_FILES, idx_bytes, read_idx  # noqa: E402


def digits(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0-16), upscaled to 20x20 and centred
    in 28x28 like MNIST's own layout, as uint8 arrays keyed like MNIST_FILES."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(images, (4, 4, 4, 4)).squeeze(1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    labels = bunch.target.astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return {"train_images": images[train], "train_labels": labels[train],
            "test_images": images[test], "test_labels": labels[test]}


def from_idx(src: str, t10k_as_train: bool) -> dict[str, np.ndarray]:
    arrays = {}
    for role, stem in MNIST_FILES.items():
        for name in (stem, stem + ".gz"):
            if os.path.exists(os.path.join(src, name)):
                arrays[role] = read_idx(os.path.join(src, name), 3 if role.endswith("images") else 1)
    if t10k_as_train:
        arrays = {"train_images": arrays.pop("test_images"), "train_labels": arrays.pop("test_labels")}
    if "train_images" not in arrays:
        sys.exit(f"error: {src} holds no train-images-idx3-ubyte[.gz] (use --t10k-as-train for a t10k-only folder)")
    return arrays


def stage(arrays: dict[str, np.ndarray], dest: str) -> list[str]:
    """Write the arrays as gzipped IDX files under dest; returns the URIs written."""
    written = []
    for role, array in arrays.items():
        uri = storage.join(dest, MNIST_FILES[role] + ".gz")
        storage.write_bytes(uri, gzip.compress(idx_bytes(array), mtime=0))
        written.append(uri)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["digits", "idx"])
    parser.add_argument("paths", nargs="+", help="digits: DEST; idx: SRC_DIR DEST")
    parser.add_argument("--t10k-as-train", action="store_true")
    args = parser.parse_args()
    if len(args.paths) != (1 if args.source == "digits" else 2):
        parser.error("digits takes DEST; idx takes SRC_DIR DEST")
    arrays = digits() if args.source == "digits" else from_idx(args.paths[0], args.t10k_as_train)
    for uri in stage(arrays, args.paths[-1]):
        print(uri)


if __name__ == "__main__":
    main()
