"""Every setting of the job, in one typed object read from `JOB_*` environment variables.

The field names are a public contract: manifests, ConfigMaps and users' scripts set them. Each
field's description is its one-line documentation; `python -m job --help` prints them.
"""

import difflib
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re
import tempfile
import typing
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from job.errors import SettingsError

ENV_PREFIX = "JOB_"
URI_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs", "abfss", "memory")
# Settings that change what is trained; together they name the run, so a restarted pod with the
# same settings finds its own run directory. Epochs are left out on purpose (asking for more
# epochs continues the same run) except where the schedule's shape depends on them.
EXPERIMENT_FIELDS = (
    "data_uri", "data_format", "model", "hidden_sizes", "pretrained", "freeze", "backbone_lr_scale", "image_size",
    "augment", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "lr_schedule", "lr_milestones",
    "lr_gamma", "val_fraction", "seed",
)
# Schedules whose lr changes every step along a curve stretched over JOB_EPOCHS (the others
# change only between epochs).
CONTINUOUS_SCHEDULES = ("cosine", "onecycle")
# Bound of a hidden layer width or an lr milestone: 784 x 65536 floats is already 200 MB.
MAX_LIST_INT = 65536
MAX_IMAGE_SIDE = 4096  # the largest model input side (JOB_IMAGE_SIZE, IDX shapes, exported configs)
# An mlp's bound, checked before it is built (settings, the model, exported configs): 8 GB of
# float32 weights, before gradients and optimizer state; 64 layers, as an exported config allows.
MAX_MLP_PARAMETERS = 2_000_000_000
MAX_HIDDEN_LAYERS = 64
# Transfer learning from a torchvision backbone starts from these unless set: the flowers recipe
# this job exists for (Adam at 1e-3, batch 32, constant lr). The MNIST MLP's SGD at lr 0.5 with
# batch 100 leaves a pretrained head at chance on a small dataset.
TRANSFER_DEFAULTS = {"optimizer": "adam", "lr": 0.001, "batch_size": 32, "lr_schedule": "constant"}
# Names people reach for, and the setting they mean (JOB_LEARNING_RATE suggested JOB_RUN_NAME).
SYNONYMS = {
    "LEARNING_RATE": "LR", "LRATE": "LR", "BATCH": "BATCH_SIZE", "BS": "BATCH_SIZE", "NUM_EPOCHS": "EPOCHS",
    "N_EPOCHS": "EPOCHS", "MAX_EPOCHS": "EPOCHS", "EPOCH": "EPOCHS", "WORKERS": "NUM_WORKERS",
    "DATALOADER_WORKERS": "NUM_WORKERS", "DATA": "DATA_URI", "DATA_DIR": "DATA_URI", "DATA_PATH": "DATA_URI",
    "DATASET": "DATA_URI", "DATASET_URI": "DATA_URI", "INPUT_URI": "DATA_URI", "OUTPUT": "OUTPUT_URI",
    "OUTPUT_DIR": "OUTPUT_URI", "OUT_DIR": "OUTPUT_URI", "CHECKPOINT_DIR": "OUTPUT_URI", "ARCH": "MODEL",
    "ARCHITECTURE": "MODEL", "NETWORK": "MODEL", "BACKBONE": "MODEL", "WEIGHTS": "PRETRAINED",
    "PRETRAINED_WEIGHTS": "PRETRAINED", "GPU": "DEVICE", "OPTIM": "OPTIMIZER", "WD": "WEIGHT_DECAY",
    "SCHEDULER": "LR_SCHEDULE", "SCHEDULE": "LR_SCHEDULE", "IMG_SIZE": "IMAGE_SIZE", "INPUT_SIZE": "IMAGE_SIZE",
    "RESOLUTION": "IMAGE_SIZE", "NAME": "RUN_NAME", "EXPERIMENT": "RUN_NAME",
}


def _split_ints(value):
    """`"256,128"` -> [256, 128]; an empty string is an empty list (e.g. no hidden layers)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected comma-separated integers such as 256,128, got {value!r}") from None
    return value


IntList = Annotated[list[int], NoDecode]


class Settings(BaseSettings):
    # allow_inf_nan=False: "inf" passes a `gt=0` check and then overflows a timedelta or a sleep.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, allow_inf_nan=False)

    # --- data -------------------------------------------------------------------------------
    data_uri: str = Field(
        description="dataset location: a local path, file://, s3://, gs://, az:// (abfs://) or memory:// URI (required)"
    )
    data_format: Literal["auto", "mnist", "imagefolder"] = Field(
        "auto", description="dataset layout; auto detects MNIST IDX files or class folders"
    )
    val_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="fraction of the training set held out for validation (random, seeded, saved with the run)",
    )
    cache_dir: str = Field(
        os.path.join(tempfile.gettempdir(), "trainjob-cache"),
        description=(
            "local directory the dataset is pulled into (must be writable; works with a read-only root via TMPDIR)"
        ),
    )
    shard_cache_bytes: int = Field(
        16 << 30,
        ge=1 << 16,
        le=1 << 50,
        description=(
            "sharded datasets: the most bytes of shards kept on local disk per training process (least recently used "
            "out first); a dataset larger than this streams"
        ),
    )
    decode: Literal["auto", "workers", "device"] = Field(
        "auto",
        description=(
            "sharded datasets: where images are decoded and augmented: in DataLoader workers on the CPU, or on the "
            "training device in batches (nvjpeg on a GPU); auto: the device when it is a GPU"
        ),
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        le=256,
        description=(
            "DataLoader worker processes per training process for data read from files (default: its share of the "
            "container's CPUs, cgroup quota included, minus one for the loop; at most 12 on a GPU)"
        ),
    )
    # --- model ------------------------------------------------------------------------------
    model: str = Field(
        "mlp",
        description=(
            "architecture: mlp (flatten -> Linear/ReLU per hidden size -> Linear), cnn (small convnet for 28x28), or "
            "any torchvision classification model (resnet18 ... resnet152, efficientnet_b0, convnext_tiny, ...)"
        ),
    )
    hidden_sizes: IntList = Field([32], description="hidden layer widths for mlp, comma-separated, e.g. 32 or 256,128")
    pretrained: str = Field(
        "none",
        description=(
            "initial weights for torchvision models: none, imagenet (torchvision's weights, from TORCH_HOME or "
            "downloaded) or a state-dict URI"
        ),
    )
    freeze: str = Field(
        "none",
        description=(
            "all: train only the new classifier head; none: train everything; N: also train the last N stages of the "
            "backbone"
        ),
    )
    backbone_lr_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="lr multiplier for the unfrozen backbone layers (the head gets JOB_LR)"
    )
    image_size: int = Field(
        224, ge=16, le=MAX_IMAGE_SIDE, description="image-folder data: side of the square crop fed to the model"
    )
    augment: bool = Field(
        False,
        description=(
            "image data, folders and shards alike: a random resized crop, flip and rotation (up to 20 degrees) "
            "for training, seeded per sample (never for evaluation)"
        ),
    )
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="image-folder data: fail (exit 3) if more than this fraction of the files are not readable images",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1024,
        le=1_000_000_000,
        description=(
            "image-folder data: images with more pixels are bad files (decompression bombs); decoding holds at most "
            "about 4 bytes x this x JOB_NUM_WORKERS in memory"
        ),
    )
    max_file_bytes: int = Field(
        1 << 30,
        ge=1024,
        le=1 << 40,
        description=(
            "largest data file read (an image, or an IDX file once decompressed); larger ones are bad files (images) "
            "or refused (IDX)"
        ),
    )
    feature_cache: Literal["auto", "off"] = Field(
        "auto",
        description=(
            "auto: with JOB_FREEZE=all and no augmentation, compute backbone features once and train the head on them"
        ),
    )
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description=(
            "CUDA only: mixed precision (auto = bf16 where the GPU has it natively, compute capability 8.0+, else "
            "fp16, whose loss scaler checkpoints keep); never changes CPU results"
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile the trained model, on the CPU too (needs a C/C++ compiler and an exec-able JOB_CACHE_DIR, "
            "checked at start); skipped under the feature cache"
        ),
    )
    compile_cache: Literal["node", "run"] = Field(
        "node",
        description=(
            "where compiled kernels are kept: node (under JOB_CACHE_DIR) or run (also saved with the run, so a new "
            "pod resumes warm; the cache is code: only where the run's storage is as trusted as the image)"
        ),
    )
    # --- optimisation -----------------------------------------------------------------------
    epochs: int = Field(10, ge=1, le=1_000_000, description="number of passes over the training set")
    batch_size: int = Field(
        100, ge=1, le=1_000_000, description="samples per optimizer step (per process when distributed)"
    )
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="optimizer")
    lr: float = Field(0.5, gt=0.0, description="peak learning rate")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay (decoupled for adamw)")
    lr_schedule: Literal["constant", "step", "cosine", "onecycle"] = Field(
        "step", description="learning-rate schedule over the run"
    )
    lr_milestones: IntList = Field(
        [5], description="epochs after which the step schedule multiplies the lr by lr_gamma, comma-separated"
    )
    lr_gamma: float = Field(0.2, gt=0.0, le=1.0, description="step schedule's lr multiplier at each milestone")
    seed: int = Field(0, ge=0, lt=1 << 32, description="seed for the split, initialisation and data order")
    # --- run and outputs --------------------------------------------------------------------
    output_uri: str = Field(
        "./runs", description="where run directories are written: a local path or an object-store URI"
    )
    run_name: str | None = Field(
        None,
        description=(
            "run directory name (default: model-dataset-hash, the hash over the settings that define the experiment)"
        ),
    )
    resume: Literal["auto", "never", "require"] = Field(
        "auto",
        description=(
            "auto: continue from the run's last good checkpoint if any; never: refuse a run that has one; require: "
            "fail if none"
        ),
    )
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="recent epoch checkpoints kept besides best.pt")
    checkpoint_min_seconds: float = Field(
        30.0,
        ge=0.0,
        le=86400.0,
        description=(
            "epoch-end checkpoints (and the history, summary and plots published after them) at most once per this "
            "many seconds; the last epoch and a stop always checkpoint; 0: every epoch"
        ),
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="also checkpoint every N optimizer steps within an epoch (0: at epoch ends only)"
    )
    stop_grace_seconds: float = Field(
        25.0,
        gt=0.0,
        le=3600.0,
        description=(
            "time allowed to save and upload after SIGTERM/SIGINT (keep under the pod's "
            "terminationGracePeriodSeconds)"
        ),
    )
    shard_bytes: int = Field(
        128 << 20, ge=1024, le=1 << 34, description="python -m job prepare: about how many bytes each shard holds"
    )
    shard_short_side: int = Field(
        256,
        ge=32,
        le=8192,
        description=(
            "python -m job prepare: images are re-encoded as JPEG with their shorter side at most this, as the "
            "evaluation transform's resize (keep it at or above JOB_IMAGE_SIZE x 256/224)"
        ),
    )
    export: Literal["onnx", "safetensors", "off"] = Field(
        "onnx",
        description=(
            "at the end of a completed run, write <run>/model/: the best weights as safetensors with a config.json, "
            "and (onnx) an ONNX model verified against them"
        ),
    )
    tensorboard: bool = Field(
        False,
        description=(
            "also write TensorBoard scalar event files under <run>/tensorboard/ (needs the tensorboard extra); "
            "MLflow is used when MLFLOW_TRACKING_URI is set"
        ),
    )
    smoke: bool = Field(
        False,
        description=(
            "smoke test: the real code path on a few batches and a sample of the data, every step checked, outputs "
            "under <run>/smoke/"
        ),
    )
    limit_train_batches: int = Field(
        0, ge=0, description="train at most this many batches per epoch (0: all; smoke mode default 3)"
    )
    limit_val_batches: int = Field(
        0, ge=0, description="evaluate at most this many batches (0: all; smoke mode default 2)"
    )
    # --- runtime ----------------------------------------------------------------------------
    device: str = Field("auto", description="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=(
            "CPU threads for torch ops (default: 1 per process for the small in-memory models, else its share of "
            "the container's CPUs; at most 4 on a GPU)"
        ),
    )
    log_every_seconds: float = Field(
        10.0, gt=0.0, le=86400.0, description="at most one progress line per this many seconds within an epoch"
    )
    storage_retries: int = Field(
        10,
        ge=1,
        le=100,
        description="attempts per object-store request, with exponential backoff (S3: botocore's standard mode; "
        "Azure Blob: the job's client; GCS: gcsfs's own 6 attempts instead)",
    )
    storage_timeout_seconds: float = Field(
        300.0,
        ge=1.0,
        le=86400.0,
        description=(
            "time bound of one storage operation, retries included (plus 1 s per MB moved); when it runs out the job "
            "exits 75"
        ),
    )
    lease_seconds: float = Field(
        60.0,
        ge=1.0,
        le=3600.0,
        description=(
            "a run has one writer: its lease lasts this long without renewal; a second job on the run waits this "
            "long for it, then exits 75"
        ),
    )
    dist_timeout_seconds: float = Field(
        300.0,
        gt=0.0,
        le=86400.0,
        description=(
            "under torchrun: how long a collective waits for a lost or stuck peer before the job fails (exit 75)"
        ),
    )
    log_level: Literal["debug", "info", "warning"] = Field(
        "info", description="log detail; debug also logs each rank's data shard"
    )
    _defaults_applied: dict = PrivateAttr(default_factory=dict)
    _run_name_derived: bool = PrivateAttr(default=False)

    @field_validator("hidden_sizes", "lr_milestones", mode="before")
    @classmethod
    def _comma_ints(cls, value):
        return _split_ints(value)

    @field_validator("hidden_sizes", "lr_milestones")
    @classmethod
    def _positive_ints(cls, value: list[int]):
        if any(not 1 <= v <= MAX_LIST_INT for v in value):
            raise ValueError(f"every entry must be an integer from 1 to {MAX_LIST_INT}")
        return value

    @field_validator("hidden_sizes")
    @classmethod
    def _mlp_bound(cls, value: list[int]):
        if len(value) > MAX_HIDDEN_LAYERS:
            raise ValueError(f"at most {MAX_HIDDEN_LAYERS} hidden layers")
        between = mlp_parameters(value)  # the input and output layers come from the data: checked when built
        if between > MAX_MLP_PARAMETERS:
            raise ValueError(f"{between:,} parameters between the hidden layers alone, over the bound of "
                             f"{MAX_MLP_PARAMETERS:,}; use fewer or narrower layers")
        return value

    @field_validator("data_uri", "output_uri")
    @classmethod
    def _uri(cls, value: str):
        return check_uri(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str):
        if value in ("mlp", "cnn"):
            return value
        known = ["mlp", "cnn", *torchvision_classifiers()]
        if value not in known:
            close = difflib.get_close_matches(value, known, n=3, cutoff=0.6)
            raise ValueError(
                f"unknown model; did you mean {' or '.join(close)}?"
                if close
                else "unknown model; use mlp, cnn or a name from torchvision.models.list_models()"
            )
        return value

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, value: str):
        if value not in ("all", "none") and not (value.isdigit() and int(value) >= 1):
            raise ValueError("accepted values: all, none, or a number of stages N >= 1")
        return value

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: str):
        return value if value in ("none", "imagenet") else check_uri(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("accepted values: auto, cpu, cuda, cuda:N")
        return value

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, value: str | None):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 128 characters)")
        return value

    @model_validator(mode="after")
    def _workload_defaults(self):
        """Transfer-learning defaults for a torchvision model, for what the user left unset."""
        if self.transfer_learning:
            self._defaults_applied = {k: v for k, v in TRANSFER_DEFAULTS.items() if k not in self.model_fields_set}
            for field, value in self._defaults_applied.items():
                setattr(self, field, value)
        return self

    @model_validator(mode="after")
    def _derive_run_name(self):
        if self.run_name is None:
            self.run_name = f"{self.model}-{dataset_name(self.data_uri)}-{self.experiment_hash()[:8]}"
            self._run_name_derived = True
        return self

    @property
    def run_name_derived(self) -> bool:
        return self._run_name_derived

    @property
    def transfer_learning(self) -> bool:
        return self.model not in ("mlp", "cnn")

    @property
    def defaults_applied(self) -> dict:
        """The transfer-learning defaults this run took (for the settings the user did not set)."""
        return dict(self._defaults_applied)

    def legacy_run_name(self) -> str:
        """The derived name before readable names (trainjob <= 0.1): a run started then resumes."""
        return f"{self.model}-{self.experiment_hash()[:10]}"

    def experiment_hash(self) -> str:
        fields = EXPERIMENT_FIELDS + (("epochs",) if self.lr_schedule in CONTINUOUS_SCHEDULES else ())
        blob = json.dumps({k: getattr(self, k) for k in fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def public_dict(self) -> dict:
        """The resolved settings as stored with every artefact; URIs have any embedded password removed."""
        out = self.model_dump()
        for key in ("data_uri", "output_uri", "pretrained"):
            out[key] = redact_uri(out[key])
        return out


def mlp_parameters(widths: list[int]) -> int:
    """Weights and biases of the Linear layers between consecutive widths (Python ints: no overflow)."""
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def dataset_name(uri: str) -> str:
    """The last segment of a dataset URI, fit for a run name: s3://bucket/data/flowers -> flowers."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1]).strip(".-_")
    return name[:40] or "data"


@functools.cache
def torchvision_classifiers() -> list[str]:
    """torchvision's classification model names, read from its source (the @register_model
    functions of torchvision/models/*.py) instead of importing it: the import takes seconds, and a
    typo in JOB_MODEL should be reported at once. Falls back to the import if the source moved."""
    spec = importlib.util.find_spec("torchvision")
    names = []
    if spec and spec.origin:
        for path in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "models", "*.py"))):
            with open(path) as f:
                text = f.read()
            for match in re.finditer(r"@register_model\(", text):
                found = re.compile(r"^def (\w+)\(", re.M).search(text, match.end())
                if found:
                    names.append(found.group(1))
    if not names:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
    return sorted(names)


def check_uri(value: str) -> str:
    """Accept a local path or scheme://location for a scheme fsspec can reach here; refuse
    credentials written into the URI (they would reach logs and outputs, and s3fs ignores them)."""
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if _userinfo(value) is not None:
        raise ValueError(
            "credentials in a URI are refused; put them in the store's variables (AWS_*, "
            "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*), a profile or the pod's service account"
        )
    if any(ord(c) < 32 for c in value):
        raise ValueError("control characters are not allowed in a URI")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$", value)
    if match and len(match.group(1)) > 1:  # one letter is a Windows drive, not a scheme
        scheme, slashes, rest = match.group(1).lower(), match.group(2), match.group(3)
        if scheme not in URI_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme}://; accepted: a local path or {', '.join(s + '://' for s in URI_SCHEMES)}"
            )
        if slashes != "//":
            raise ValueError(f"malformed URI: expected {scheme}://...")
        if scheme in ("s3", "gs", "gcs") and not rest.split("/")[0]:
            raise ValueError(f"malformed URI: {scheme}:// needs a bucket name, e.g. {scheme}://bucket/path")
        if scheme in ("az", "abfs", "abfss") and not rest.split("/")[0]:
            raise ValueError(f"malformed URI: {scheme}:// needs a container name, e.g. {scheme}://container/path")
    return value


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A URI in free text, tried only where a run of scheme characters starts, so each run is scanned
# once (forward, then back one step per character at most): `[A-Za-z][A-Za-z0-9+.-]*://` tried at
# every letter of a 1 MB name was quadratic (133 s). Group 1 is the run's lead before its first letter.
_URI_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])([0-9+.-]*)([A-Za-z][A-Za-z0-9+.-]*://\S+)")


# Azure's own URI form names the container and the account, not credentials: adlfs reads the
# account from it (abfss://container@account.dfs.core.windows.net/path, as Spark and Databricks write it)
_AZURE_CONTAINER_AT_ACCOUNT = re.compile(r"(?:az|abfss?)://[a-z0-9-]+@[a-z0-9]+\.(?:dfs|blob)\.core\.windows\.net(?:/|$)",
                                         re.I)


def _userinfo(uri: str) -> str | None:
    """The `user:password` part of scheme://user:password@host/..., or None. A password may hold
    '/' (AWS secret keys do) and '@': in the user:password form everything up to the URI's last
    '@' is masked (a key's own '@' after credentials too: the safe side); without a ':' only an
    '@' in the first segment counts, so s3://bucket/a@b is not a credential (nor Azure's
    container@account: see _AZURE_CONTAINER_AT_ACCOUNT)."""
    if _AZURE_CONTAINER_AT_ACCOUNT.match(uri):
        return None
    match = _SCHEME.match(uri)
    rest = uri[match.end() :] if match else ""
    if "@" not in rest:
        return None
    if ":" in rest.split("@", 1)[0].split("/", 1)[0]:
        return rest[: rest.rindex("@")]
    first = rest.split("/", 1)[0]
    return first[: first.rindex("@")] if "@" in first else None


def redact_uri(uri: str) -> str:
    """Replace user:password@ in a URI with ***@ so it can be logged."""
    userinfo = _userinfo(uri)
    return uri if userinfo is None else uri.replace(userinfo + "@", "***@", 1)


def redact_text(text: str) -> str:
    """Mask what must never be shown, inside free text (a log line, an error message, a summary's
    reason): any URI's user:password@, and the values of secret-looking environment variables
    (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, *PASSWORD*, ...) should a library echo one."""
    text = _URI_IN_TEXT.sub(lambda m: m.group(1) + redact_uri(m.group(2)), text)
    for value in _secret_values():
        text = text.replace(value, "***")
    return text


# The secret parts of an Azure connection string (AZURE_STORAGE_CONNECTION_STRING), masked on their
# own too: a library that quotes only the key must not show it either.
_CONNECTION_STRING_SECRETS = re.compile(r"(?:AccountKey|SharedAccessSignature|SharedAccessKey)=([^;]{6,})", re.I)


def _secret_values() -> list[str]:
    names, not_secret = (
        ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE_KEY", "ACCOUNT_KEY", "CONNECTION_STRING"),
        ("_FILE", "_PATH", "_DIR"),
    )
    values = [
        v
        for k, v in os.environ.items()
        if len(v) >= 6 and any(n in k.upper() for n in names) and not k.upper().endswith(not_secret)
    ]
    values += [part for v in values for part in _CONNECTION_STRING_SECRETS.findall(v)]
    return sorted(values, key=len, reverse=True)  # a whole string before the key inside it


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def unknown_variables(environ) -> list[str]:
    """One message per `JOB_*` variable that is not a setting, with the closest setting suggested."""
    known = [_env_name(f) for f in Settings.model_fields]
    messages = []
    for name in sorted(k for k in environ if k.upper().startswith(ENV_PREFIX)):
        if name in known:
            continue
        if name.upper() in known:  # read case-blind by pydantic-settings: it would override JOB_* silently
            messages.append(f"{name} is not a setting: settings are upper case ({name.upper()})")
            continue
        synonym = SYNONYMS.get(name.upper().removeprefix(ENV_PREFIX))
        close = [ENV_PREFIX + synonym] if synonym else difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see python -m job --help"
        messages.append(f"{name} is not a setting{hint}")
    return messages


def load_settings(**given) -> Settings:
    """Read and validate the settings once; every problem becomes one SettingsError line.
    `given` settings (a command's arguments) take the place of their JOB_* variables."""
    environ = os.environ
    problems = unknown_variables(environ)
    settings = None
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            name = _env_name(field) if field else "settings"
            value = environ.get(name)
            shown = ""
            if value is not None:  # a value pasted by mistake (a whole file) must not become the log line
                masked = redact_text(value)  # whole, then cut: a cut first could split a secret out of its mask
                shown = "=" + (masked[:200] + f"... ({len(value):,} characters)" if len(masked) > 200 else masked)
            reason = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                reason = f"is required: {Settings.model_fields[field].description}"
            problems.append(f"{name}{shown}: {reason}")
    if problems or settings is None:
        raise SettingsError("invalid settings: " + "; ".join(problems))
    return settings


def type_name(annotation) -> str:
    """How a field's type reads in --help: `auto|mnist|imagefolder`, `int list`, `int (optional)`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return "|".join(map(str, args))
    if typing.get_origin(annotation) is list:
        return f"{type_name(args[0])} list (comma-separated)"
    if type(None) in typing.get_args(annotation):
        return f"{type_name(args[0])} (optional)"
    if typing.get_origin(annotation) is Annotated:
        return type_name(args[0])
    return getattr(annotation, "__name__", str(annotation))


def help_text() -> str:
    lines = [
        "trainjob: train an image classifier; configured only by environment variables.",
        "",
        "usage: python -m job [--check | --help]",
        "       python -m job predict MODEL INPUTS [--output URI]",
        "       python -m job evaluate MODEL DATA [--output URI]",
        "       python -m job export CHECKPOINT [--output URI]",
        "       python -m job prepare SOURCE DEST",
        "",
        "  --check   verify everything the run needs (dataset, weights, cache, output) and its state, then exit",
        "  predict   classify images with a run's exported model (python -m job predict --help)",
        "  evaluate  score an exported model on labelled data",
        "  export    write a model/ folder from any checkpoint",
        "  prepare   write a sharded dataset (tar shards + index.json) that training streams",
        "",
        "settings:",
    ]
    for field, info in Settings.model_fields.items():
        annotation = type_name(info.annotation)
        default = "required" if info.is_required() else f"default {info.default!r}"
        lines.append(f"  {_env_name(field):28} {annotation} ({default})")
        lines.append(f"  {'':28} {info.description}")
    lines += [
        "",
        "S3-compatible storage: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION",
        "(or any credential source botocore supports, e.g. IRSA web identity).",
        "Azure Blob (az://, abfs://): AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with",
        "AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or the pod's AKS Workload Identity.",
    ]
    return "\n".join(lines)
