#!/usr/bin/env python
"""Turn a dataset into what the job reads (MNIST IDX, gzip) and upload it to any fsspec URI.

  python scripts/stage_dataset.py digits DEST            scikit-learn's bundled 8x8 digits, no download
  python scripts/stage_dataset.py idx SRC_DIR DEST       local MNIST IDX files (raw or .gz)
  python scripts/stage_dataset.py digit-images DEST      the digits' test set as PNG files, DEST/<label>/<n>.png
                                                        (for predict and evaluate on a folder of images)
  python scripts/stage_dataset.py images DEST [--per-class N]
      a generated image-folder dataset (train/ and valid/ of 3 classes of coloured, noisy JPEGs)
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
from job.data.idx import idx_bytes, read_idx  # noqa: E402
from job.data.layout import MNIST_FILES  # noqa: E402


def digits(test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0-16), upscaled to 20x20 and centred
    in 28x28 like MNIST's own layout, as uint8 arrays keyed like MNIST_FILES."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    small = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(small, (4, 4, 4, 4)).squeeze(1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
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
                arrays[role] = read_idx(os.path.join(src, name), 3 if role.endswith("images") else 1, 1 << 34)
    if t10k_as_train:
        arrays = {"train_images": arrays.pop("test_images"), "train_labels": arrays.pop("test_labels")}
    if "train_images" not in arrays:
        sys.exit(f"error: {src} holds no train-images-idx3-ubyte[.gz] (use --t10k-as-train for a t10k-only folder)")
    return arrays


def synthetic_images(dest: str, per_class: int = 40, size: int = 96, seed: int = 0) -> list[str]:
    """A small image-folder dataset anyone can generate: per class a colour plus noise, as JPEG,
    in train/<class>/ and valid/<class>/ (a quarter as many)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"daisy": (230, 230, 60), "rose": (200, 30, 40), "tulip": (120, 40, 200)}
    written = []
    for split, n in (("train", per_class), ("valid", max(1, per_class // 4))):
        for name, colour in colours.items():
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG")
                uri = storage.join(dest, split, name, f"{i:04d}.jpg")
                storage.write_bytes(uri, buffer.getvalue())
                written.append(uri)
    return written


def png_folder(images: np.ndarray, labels: np.ndarray, dest: str) -> list[str]:
    """Grayscale images as PNG files in class folders: DEST/<label>/<index>.png."""
    import io

    from PIL import Image

    written = []
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        uri = storage.join(dest, str(int(label)), f"{i:04d}.png")
        storage.write_bytes(uri, buffer.getvalue())
        written.append(uri)
    return written


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
    parser.add_argument("source", choices=["digits", "digit-images", "idx", "images"])
    parser.add_argument("paths", nargs="+", help="digits, images: DEST; idx: SRC_DIR DEST")
    parser.add_argument("--t10k-as-train", action="store_true")
    parser.add_argument("--per-class", type=int, default=40, help="images: training images per class")
    args = parser.parse_args()
    if len(args.paths) != (2 if args.source == "idx" else 1):
        parser.error("digits and images take DEST; idx takes SRC_DIR DEST")
    if args.source == "images":
        print(f"{len(synthetic_images(args.paths[0], args.per_class))} images under {args.paths[0]}")
        return
    if args.source == "digit-images":
        arrays = digits()
        print(
            f"{len(png_folder(arrays['test_images'], arrays['test_labels'], args.paths[0]))} PNG files under "
            f"{args.paths[0]}"
        )
        return
    arrays = digits() if args.source == "digits" else from_idx(args.paths[0], args.t10k_as_train)
    for uri in stage(arrays, args.paths[-1]):
        print(uri)


if __name__ == "__main__":
    main()
