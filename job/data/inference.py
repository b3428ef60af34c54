"""Data for a trained model, read with the evaluation preprocessing its config.json records:
`evaluate`'s labelled sets and `predict`'s unlabelled inputs. The layouts are job.data.layout's;
a sharded dataset is streamed through the bounded shard cache, as training streams it.
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from job import storage
from job.data import idx, images, layout, mirror
from job.data.dataset import shard_sources
from job.data.index import SPLITS, find_index, split_shards
from job.data.sources import FileSource, Source, TensorSource
from job.errors import DataError

log = logging.getLogger("job")


@dataclass
class Labelled:
    """A labelled set to evaluate on: the samples `indices` of `source`."""

    source: Source
    indices: torch.Tensor
    class_names: list[str]  # the classes the data holds
    bad_files: list
    split: str  # which part of the dataset was scored: "test", "val", "train" (IDX files with no t10k pair) or "all"


@dataclass
class Inputs:
    """Unlabelled inputs to predict: every sample of `source`, in order, named by `names`."""

    source: Source
    names: list[str]
    bad_files: list


def labelled(settings, runtime, uri: str, config: dict) -> Labelled:
    """A sharded dataset's test split (else its validation split), an image folder's test/ (else
    its validation folder), class folders, or MNIST-format IDX files (the t10k pair when there is
    one), checked against the classes and input of the model."""
    with storage.errors(uri, DataError, "read the labelled data"):
        layout.refuse_file(uri)
        index = find_index(uri)
        if index is None:
            root = mirror.pull(uri, settings.cache_dir)
    if index is not None:
        return _sharded(settings, runtime, uri, index, config)
    names = [n for n in sorted(os.listdir(root)) if not n.startswith(".")]
    if layout.kind_of(names) == "mnist":
        role = "test" if any(n.startswith(layout.MNIST_FILES["test_images"]) for n in names) else "train"
        pair = idx.read_split(root, role, True, settings.max_file_bytes)
        assert pair is not None  # required: read_split raised otherwise
        labels = torch.from_numpy(pair[1].astype(np.int64)).to(runtime.device)
        tensors = TensorSource(_idx_tensor(pair[0], runtime.device), labels)
        return Labelled(tensors, torch.arange(len(tensors)), [str(i) for i in range(int(pair[1].max()) + 1)], [], role)
    split = layout.labelled_split(names)
    folder = os.path.join(root, split) if split else root
    classes = layout.class_folders(os.path.dirname(folder), os.path.basename(folder))
    if not classes:
        raise DataError(
            f"{storage.redact_uri(uri)} holds no class folders to evaluate on (expected <class>/<image> "
            "folders, an image-folder dataset with test/ or valid/, or MNIST-format IDX files)"
        )
    unknown = sorted(set(classes) - set(config["class_names"]))
    if unknown:
        raise DataError(
            f"{storage.redact_uri(uri)} has classes the model does not know: {', '.join(map(repr, unknown[:10]))}"
        )
    paths = [p for files in classes.values() for p in files]
    shown = storage.redact_uri(uri).rstrip("/") + (f"/{split}" if split else "")
    good, bad = _checked(settings, folder, paths, shown)
    good_set = set(good)
    label = {c: i for i, c in enumerate(config["class_names"])}
    items = [(p, label[c]) for c, files in classes.items() for p in files if p in good_set]
    source = _image_source(settings, runtime, items, config)
    return Labelled(source, torch.arange(len(source)), list(classes), bad, "test" if split == "test" else
                    "val" if split else "all")


def inputs(settings, runtime, uri: str, config: dict) -> Inputs:
    """Every sample of a sharded dataset (all its splits, named <shard>#<position>), every image
    of the IDX images file there (named <file>#<i>), else every image file under `uri`,
    subfolders included (named by their path under it)."""
    with storage.errors(uri, DataError, "read inputs"):
        layout.refuse_file(uri)
        index = find_index(uri)
        if index is None:
            root = mirror.pull(uri, settings.cache_dir)
    if index is not None:  # unlabelled here: the dataset's own classes do not matter
        shards = [s for split in SPLITS for s in split_shards(index, split)]
        source = _shard_reader(settings, runtime, uri, index, shards, config)
        if list(source.sample_shape) != config["input_shape"]:  # shards are decoded as prepared: no conversion
            raise DataError(f"{storage.redact_uri(uri)} holds samples of shape {list(source.sample_shape)}; this "
                            f"model takes {config['input_shape']}")
        names = [f"{s['name']}#{i}" for s in shards for i in range(s["samples"])]
        return Inputs(source, names, [tuple(b) for b in index["bad_files"]])
    found = [n for n in sorted(os.listdir(root)) if not n.startswith(".")]
    idx_files = [n for n in found if "-images-idx3-ubyte" in n]
    if idx_files:
        if config["preprocessing"]["kind"] != "idx":
            raise DataError(f"this model takes image files, not IDX images ({idx_files[0]})")
        array = idx.read_idx(os.path.join(root, idx_files[0]), 3, settings.max_file_bytes)
        if list(array.shape[1:]) != config["input_shape"][1:]:
            raise DataError(f"{idx_files[0]} holds {array.shape[1]}x{array.shape[2]} images; this model takes "
                            f"{config['input_shape'][1]}x{config['input_shape'][2]}")
        tensors = TensorSource(_idx_tensor(array, runtime.device), torch.zeros(len(array), dtype=torch.int64))
        return Inputs(tensors, [f"{idx_files[0]}#{i}" for i in range(len(array))], [])
    paths = []
    for here, dirs, files in os.walk(root):  # every file, subfolders included; hidden ones skipped
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(here, n) for n in sorted(files) if not n.startswith(".")]
    good, bad = _checked(settings, root, paths, storage.redact_uri(uri))
    return Inputs(_image_source(settings, runtime, [(p, 0) for p in good], config),
                  [os.path.relpath(p, root) for p in good], bad)


def _same_classes(uri: str, index: dict, config: dict) -> None:
    ours, theirs = index["class_names"], config["class_names"]
    if ours != theirs:
        pairs = enumerate(zip(ours, theirs, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(theirs)))
        found = repr(ours[at]) if at < len(ours) else "nothing"
        wanted = repr(theirs[at]) if at < len(theirs) else "nothing"
        raise DataError(f"{storage.redact_uri(uri)} has {len(ours)} classes, the model {len(theirs)}: class {at} is "
                        f"{found} there and {wanted} in the model (the same classes, in the same order, are needed)")


def _shard_reader(settings, runtime, uri: str, index: dict, shards: list[dict], config: dict) -> Source:
    """Shards read with the model's preprocessing: an image model's centre crop, normalised as it was."""
    prep = config["preprocessing"]
    size = prep["center_crop"] if prep["kind"] == "image" else settings.image_size
    settings = settings.model_copy(update={"data_uri": uri, "image_size": size, "augment": False})
    return shard_sources(settings, runtime, index, [shards], normalize=prep.get("mean") is not None)[0]


def _sharded(settings, runtime, uri: str, index: dict, config: dict) -> Labelled:
    """A sharded dataset's test split, or its validation split when it has none."""
    _same_classes(uri, index, config)
    split = "test" if split_shards(index, "test") else "val"
    source = _shard_reader(settings, runtime, uri, index, split_shards(index, split), config)
    return Labelled(source, torch.arange(len(source)), index["class_names"], [tuple(b) for b in index["bad_files"]],
                    split)


def _checked(settings, root: str, paths: list[str], shown: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode-check every file as training does (regular files, size and pixel limits); a bad
    file is named in the log under `shown` (the URI the user gave for `root`)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    good, bad = [], []
    for path in paths:
        reason, _ = images.check_file(path, settings.max_file_bytes, settings.max_image_pixels)
        if reason:
            bad.append((os.path.relpath(path, root), reason))
            log.warning(f"skipping {images.user_name(shown, os.path.relpath(path, root))}: {reason}")
        else:
            good.append(path)
    return good, bad


def _idx_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array.copy()).to(device).unsqueeze(1).float().div_(255)


def _image_source(settings, runtime, items: list[tuple[str, int]], config: dict) -> FileSource:
    """Files read with the model's evaluation preprocessing (config.json), by DataLoader workers."""
    prep = config["preprocessing"]
    transform: images.ImageTransform | GrayTransform
    if prep["kind"] == "image":  # what training's evaluation does (job.data.augment)
        transform = images.ImageTransform(prep["center_crop"], augment=False, normalize=prep["mean"] is not None)
        size = prep["center_crop"]
    else:  # a model trained on IDX images, given image files: grayscale at the IDX size, in [0, 1]
        transform = GrayTransform(prep["channels"], prep["height"], prep["width"])
        size = prep["height"]
    source = images.ImageItems(items, transform, max_pixels=settings.max_image_pixels)
    return FileSource(source, size, runtime.workers, runtime.device)


class GrayTransform:
    """PIL image -> grayscale (channels) at an IDX model's height and width, in [0, 1]. Picklable,
    for DataLoader workers."""

    def __init__(self, channels: int, height: int, width: int):
        self.channels, self.height, self.width = channels, height, width

    def __call__(self, img, train: bool, rng) -> torch.Tensor:
        from torchvision import transforms as T

        return T.Compose([T.Grayscale(self.channels), T.Resize((self.height, self.width)), T.ToTensor()])(img)
