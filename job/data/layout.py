"""What a dataset holds, decided in one place for training, --check, prepare, evaluate and predict.

Two layouts are datasets: MNIST format (IDX files: train-images-idx3-ubyte[.gz] and its labels,
optionally t10k-*) and an image folder:

  <root>/train/<class>/**  and optionally  <root>/valid/<class>/** (or val/)  and  <root>/test/<class>/**

Class names are the sorted folder names of train/; files in subfolders of a class folder belong
to it, as in torchvision's ImageFolder; hidden files and folders are skipped. A third, a sharded
dataset, is recognised by its index.json (job.data.index) before anything is listed.
"""

import os

from job import storage
from job.errors import DataError, SettingsError

# role -> file stem; each may be stored raw or with .gz
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Classes a dataset may have: every evaluation keeps a classes x classes confusion matrix (on the
# device, in evaluation.json, drawn in confusion.png): 4,096 classes are 16.8 M counts (134 MB);
# 100,000 would be 80 GB, allocated at the first evaluation.
MAX_CLASSES = 4096
INDEX = "index.json"  # a sharded dataset's index: the folder holding it is the dataset
SPLIT_DIRS = ("train", "valid", "val", "test")
VAL_DIRS = ("valid", "val")
Folders = dict[str, dict[str, list[str]]]  # {split folder: {class: [file path or object URI]}}


def kind_of(names: list[str]) -> str | None:
    """"mnist" (IDX image files), "imagefolder" (a train/ folder) or None, from the names at the
    top of a dataset."""
    if any("-images-idx3-ubyte" in n for n in names):
        return "mnist"
    if "train" in names:
        return "imagefolder"
    return None


def refuse_file(uri: str, setting: str = "") -> None:
    """A file where the data's folder belongs is a setting to fix (exit 2), said as such: read as
    a folder, it was "not found (NotADirectoryError)", or a listing of itself. A sharded dataset's
    index.json or an IDX file names the folder to give instead. `setting`: the variable that gave
    the URI, if one did."""
    if not storage.is_file(uri):
        return
    shown = storage.redact_uri(uri).rstrip("/")
    named = f"{setting}=" if setting else ""
    folder, name = shown.rsplit("/", 1) if "/" in shown else (".", shown)
    instead = f"; here {named}{folder}" if name == INDEX or kind_of([name]) == "mnist" else ""
    raise SettingsError(
        f"{named}{shown} is a file, not a folder: give the folder that holds the data (image files in class folders, "
        f"MNIST-format IDX files, or a sharded dataset's {INDEX}){instead}"
    )


def detect(names: list[str], uri: str) -> str:
    """The layout of a dataset to train on; a clear error naming the URI (and its parent, when it
    points one level too deep into an image folder) otherwise."""
    kind = kind_of(names)
    if kind:
        return kind
    shown = storage.redact_uri(uri)
    hint = "; check JOB_DATA_URI"
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    if last in SPLIT_DIRS:
        hint = (f"; it looks like one split of an image folder: did you mean JOB_DATA_URI="
                f"{storage.redact_uri(uri.rstrip('/').rsplit('/', 1)[0])} (the folder holding train/)?")
    found = (
        f" (found {', '.join(repr(n) for n in names[:5])}{' ...' if len(names) > 5 else ''})"
        if names
        else " (it is empty)"
    )
    raise DataError(
        f"no dataset found at {shown}{found}: expected {MNIST_FILES['train_images']}[.gz] "
        f"(MNIST format) or a train/ folder of class folders{hint}"
    )


def labelled_split(names: list[str]) -> str | None:
    """The folder of a labelled set to evaluate on: an image folder's test/, else its validation
    folder; None when the names are themselves class folders."""
    if "train" not in names:
        return None
    return next((d for d in ("test", *VAL_DIRS) if d in names), None)


def class_folders(root: str, split: str) -> dict[str, list[str]]:
    """{class folder name: its files, subfolders included} of root/split on local disk. Symlinked
    folders are not followed (a link loop cannot hang the scan); symlinked files are read if they
    lead to a regular file."""
    folder = os.path.join(root, split)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    found = {}
    for c in classes:
        files = []
        for here, dirs, names in os.walk(os.path.join(folder, c)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(here, n) for n in sorted(names) if not n.startswith(".")]
        found[c] = files
    return found


def local_folders(root: str) -> Folders:
    """The split folders of an image folder on local disk."""
    return {s: class_folders(root, s) for s in SPLIT_DIRS if os.path.isdir(os.path.join(root, s))}


def remote_folders(uri: str) -> Folders:
    """The split folders of an image folder in object storage, from one listing (prepare reads
    the objects one by one: the source need not fit on local disk)."""
    fs, root = storage.filesystem(uri)
    tree: Folders = {}
    for path, info in sorted(storage.find(uri).items()):
        relative = path[len(root.rstrip("/")) + 1 :]
        parts = relative.split("/")
        if (
            info.get("type") == "directory"
            or path.endswith("/")
            or len(parts) < 3
            or any(p.startswith(".") for p in parts)
        ):
            continue
        # under the URI as given, not protocol + path: abfss://container@account... keeps its account
        tree.setdefault(parts[0], {}).setdefault(parts[1], []).append(storage.join(uri, relative))
    return tree


def image_splits(folders: Folders, where: str) -> tuple[list[str], dict[str, list[tuple[str, int]]], dict[str, str]]:
    """(class names, {"train", "val" and "test" where the layout has them: [(file, label)]}, the
    folder each came from) of an image folder, checked: at least two classes, none empty, valid
    UTF-8 names, no class in valid/ or test/ that train/ lacks."""
    train = folders.get("train", {})
    classes = list(train)
    if len(classes) < 2:
        raise DataError(f"{where}/train holds {len(classes)} class folder(s); a classifier needs at least 2")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{where}/train holds {len(classes):,} class folders; at most {MAX_CLASSES:,} are supported "
                        "(each evaluation keeps a classes x classes confusion matrix)")
    empty = [c for c, files in train.items() if not files]
    if empty:
        raise DataError(
            f"empty class folder(s) in {where}/train: {', '.join(map(repr, empty))}; add images or remove the folder"
        )
    splits, origin = {"train": train}, {"train": "train"}
    for name, key in [(d, "val") for d in VAL_DIRS] + [("test", "test")]:
        if key not in splits and name in folders:
            splits[key], origin[key] = folders[name], name
    for key, found in splits.items():
        for c in found:
            try:
                c.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(
                    f"class folder {c!r} in {origin[key]}/ is not valid UTF-8; class names become labels in every "
                    "output: rename it"
                ) from None
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"{where}/{origin[key]} has classes that train/ lacks: {', '.join(map(repr, unknown[:10]))}"
            )
    label = {c: i for i, c in enumerate(classes)}
    items = {k: [(p, label[c]) for c, files in v.items() for p in files] for k, v in splits.items()}
    return classes, items, origin
