"""What a run tells people: log lines, history.jsonl, summary.json, failure.json and plots.

Metrics are data: the same names appear in the log line, the history rows and the plots.
"""

import contextlib
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Callable

from job import storage
from job.settings import redact_text

log = logging.getLogger("job")
# Control characters (C0, DEL, C1: U+009B is a terminal's CSI), line separators and bidi controls
# (U+202E shows the rest of a line reversed), as visible escapes: one record is one line that reads
# as it is, whatever a class folder or file name holds (a newline in a name must not forge a log line).
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), *range(127, 160)] if c != 9} | {
    c: f"\\u{c:04x}" for c in [0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
} | {10: "\\n", 13: "\\r"}


def printable(text: str) -> str:
    """`text` on one line, readable, and encodable: names from data may hold anything,
    undecodable bytes (surrogate escapes) included."""
    return text.translate(_ESCAPES).encode("utf-8", "backslashreplace").decode("utf-8")


class _Formatter(logging.Formatter):
    """Every record is one line with its credentials masked; a traceback (a bug) keeps its lines."""

    def formatMessage(self, record):
        record.message = printable(redact_text(record.message))
        return super().formatMessage(record)

    def formatException(self, ei):
        return redact_text(super().formatException(ei)).encode("utf-8", "backslashreplace").decode("utf-8")


_last_line = 0.0  # time.monotonic() of this process's last log line: setup_logging's handler stamps it


def _stamp(record: logging.LogRecord) -> bool:
    global _last_line
    _last_line = time.monotonic()
    return True


def quiet_since(mine: float) -> float:
    """When the log went quiet: the time of this process's last line, or `mine` (the caller's own
    last line) if later. A wait logs once JOB_LOG_EVERY_SECONDS have passed since then: no silence
    longer than that where many short waits follow one another (a timer of each wait's own never
    runs out), and no second line where another has just been logged. Without the job's logging
    set up (tests in process), `mine` alone paces it."""
    return max(_last_line, mine)


def setup_logging(level: str = "info", rank: int | None = None) -> None:
    """Plain timestamped lines on stdout for `kubectl logs`. Under torchrun only rank 0 speaks
    (other ranks: warnings and errors, and everything at debug), each line naming its rank."""
    if rank:
        level = level if level == "debug" else "warning"
    if hasattr(sys.stdout, "reconfigure"):  # a C locale's ASCII stdout must not fail on a name from the data
        sys.stdout.reconfigure(errors="backslashreplace")
    handler = logging.StreamHandler(sys.stdout)  # a stop never raises into a write (job/stop.py)
    prefix = f"rank {rank} " if rank is not None else ""
    handler.setFormatter(_Formatter(f"%(asctime)s.%(msecs)03d %(levelname)s {prefix}%(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(_stamp)
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


@contextlib.contextmanager
def phase(name: str, log_every: float, progress: Callable[[], str] | None = None):
    """Log the phase `name` as it starts and ends, and between, from a thread, how far it has come
    (`progress()`, else the seconds so far) whenever the log has been quiet for `log_every`
    seconds: a phase is often one long call (a trace, an upload, a batch through a backbone) that
    says nothing, and a wait inside it that speaks (a shard download) speaks for it."""
    start = time.monotonic()
    log.info(f"{name} ...")
    ended = threading.Event()

    def beat() -> None:
        said = start
        while not ended.wait(max(0.0, quiet_since(said) + log_every - time.monotonic())):
            if time.monotonic() - quiet_since(said) >= log_every:
                said = time.monotonic()
                log.info(f"{name}: {progress() if progress else f'{said - start:.0f} s'}")

    thread = threading.Thread(target=beat, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        ended.set()
        thread.join()
    log.info(f"{name} done in {time.monotonic() - start:.1f} s")


METRIC_FORMATS = {
    "train_loss": ".4f",
    "train_accuracy": ".4f",
    "val_loss": ".4f",
    "val_accuracy": ".4f",
    "lr": ".4g",
    "train_seconds": ".2f",
    "val_seconds": ".2f",
    "epoch_seconds": ".2f",
    "train_samples_per_second": ",.1f",
}


def format_row(row: dict) -> str:
    """An epoch's log line: the history row's names and values."""
    return " ".join(
        [f"epoch {row['epoch']}"] + [f"{k}={row[k]:{fmt}}" for k, fmt in METRIC_FORMATS.items() if k in row]
    )


def duration(seconds: float) -> str:
    """A duration a person reads at a glance: 1 h 02 min, 3 min 05 s, 12 s."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


RECIPE_SETTINGS = ("model", "optimizer", "lr", "batch_size", "lr_schedule")


def recipe(settings) -> str:
    """The settings a person compares runs by, in a few words."""
    return _recipe({k: getattr(settings, k) for k in RECIPE_SETTINGS})


def _recipe(v: dict) -> str:
    return f"{v['model']}, {v['optimizer']} lr {v['lr']:g}, batch {v['batch_size']}, {v['lr_schedule']} schedule"


def recipe_segments(settings, changes: list[dict]) -> list[dict]:
    """[{"from_epoch", "recipe"}] of a run resumed with other schedule settings, oldest first: the
    current settings, walked back through each recorded change (job.checkpoint.settings_changes)."""
    values = {k: getattr(settings, k) for k in RECIPE_SETTINGS}
    segments = []
    for change in reversed(changes):
        segments.append({"from_epoch": change["epoch"] + 1, "recipe": _recipe(values)})
        for key, step in change["changes"].items():
            if key in values:
                values[key] = step["old"]
    segments.append({"from_epoch": 1, "recipe": _recipe(values)})
    return segments[::-1]


def per_class(confusion, class_names: list[str]) -> dict[str, float | None]:
    """Accuracy of each class (None for a class with no sample) from a confusion matrix whose rows
    are true classes and columns predictions."""
    if confusion is None:
        return {}
    totals = confusion.sum(1).tolist()
    hits = confusion.diagonal().tolist()
    return {name: (hits[i] / totals[i] if totals[i] else None) for i, name in enumerate(class_names)}


def summary(settings, runtime, data, state, status: str, started: float, **extra) -> dict:
    """summary.json: how the run stands (status running, completed, failed or stopped)."""
    last = state.history[-1] if state.history else {}
    segments = recipe_segments(settings, state.settings_changes)
    best = [s for s in segments if s["from_epoch"] <= (state.best_epoch or 1)][-1]
    return {
        "status": status,
        "run_name": settings.run_name,
        "recipe": recipe(settings),  # the settings now; earlier epochs may have run under others:
        "recipe_segments": segments,  # each recipe and the epoch it began with
        "best_epoch_recipe": best["recipe"],
        "settings_changes": state.settings_changes,
        "epochs_completed": len(state.history),
        # which epoch each result describes: best_* (and checkpoints/best.pt, model/) the best
        # epoch's; final_val_accuracy, per_class_val_accuracy and the val confusion matrix the last's
        "best_epoch": state.best_epoch or None,
        "best_val_accuracy": state.best_val_accuracy if state.history else None,
        "final_epoch": last.get("epoch"),
        "final_val_accuracy": last.get("val_accuracy"),
        "test_epoch": None,  # with a test set: the epoch whose weights scored it (the last)
        "test_accuracy": None,
        "wall_seconds": round(time.monotonic() - started, 3),
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "dataset_fingerprint": data.fingerprint,
        "class_names": data.class_names,
        "class_to_idx": {name: i for i, name in enumerate(data.class_names)},
        "bad_files": len(data.bad_files),
        "train_samples": len(state.train_idx),
        "val_samples": len(state.val_idx),
        "per_class_val_accuracy": per_class(state.val_confusion, data.class_names),
        "peak_memory": runtime.peak_memory().removeprefix("peak memory "),
        **extra,
    }


def completed(run_uri: str) -> dict | None:
    """The run's summary if it says the run completed, else None."""
    try:
        summary = storage.read_json(storage.join(run_uri, "summary.json"))
    except (FileNotFoundError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


def history_bytes(history: list[dict]) -> bytes:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in history).encode()


def read_history(run_uri: str) -> list[dict]:
    uri = storage.join(run_uri, "history.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def _figure(width: float, height: float):
    """A matplotlib figure on the object API (no pyplot global state: safe in the uploader thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig, title: str = "") -> bytes:
    """The figure as PNG bytes; `title` also in the file's Title text, for a program to read."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Title": title} if title else None)
    return buffer.getvalue()


def plot_png(history: list[dict], metric: str, summary: dict) -> bytes:
    """Train and val curves of one metric per epoch, the best epoch marked, the run and its recipe
    in the title; integer epochs; a log loss axis when the loss spans more than two decades."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    epochs = [row["epoch"] for row in history]
    for split in ("train", "val"):
        ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
    best = summary.get("best_epoch")
    if best:
        ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best})")
    for segment in summary.get("recipe_segments", [])[1:]:  # a resume with other settings: where each began
        ax.axvline(segment["from_epoch"] - 0.5, color="orange", linestyle=":", linewidth=1)
        ax.annotate(segment["recipe"].split(", ", 1)[1], (segment["from_epoch"] - 0.5, 1),
                    xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7, color="orange")
    values = [row[f"{split}_{metric}"] for row in history for split in ("train", "val")]
    if metric == "loss" and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{summary.get('run_name', '')}: {metric}\n{summary.get('recipe', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def confusion_png(confusion, class_names: list[str], title: str) -> bytes:
    """A confusion matrix as a picture: rows true classes, columns predictions, each row as
    fractions of its class (so rare classes show as clearly as common ones)."""
    counts = confusion.double()
    rows = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(16, 3 + 0.35 * n)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:  # beyond that, labels are unreadable: the axes are class indices
        names = [printable(c)[:20] for c in class_names]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rows[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig, title)


def publish(
    run_uri: str, history: list[dict], summary: dict, confusions: dict | None = None, curves: bool = True
) -> None:
    """Rewrite history, plots and summary whole (object stores cannot append). `confusions`:
    {split: confusion matrix} as plots/confusion_<split>.png and .json, each naming its split and
    epoch (the summary's final_epoch for val, test_epoch for test); `curves`: redraw the accuracy
    and loss plots (skipped when they already show this history)."""
    storage.write_bytes(storage.join(run_uri, "history.jsonl"), history_bytes(history))
    if history and curves:
        for metric in ("accuracy", "loss"):
            storage.write_bytes(storage.join(run_uri, "plots", f"{metric}.png"), plot_png(history, metric, summary))
    for split, confusion in (confusions or {}).items():
        if confusion is not None:
            record = confusion_record(confusion, split, summary)
            png = confusion_png(confusion, record["class_names"], record["title"])
            storage.write_bytes(storage.join(run_uri, "plots", f"confusion_{split}.png"), png)
            storage.write_json(storage.join(run_uri, "plots", f"confusion_{split}.json"), record)
    storage.write_json(storage.join(run_uri, "summary.json"), summary)


def confusion_record(confusion, split: str, summary: dict) -> dict:
    """plots/confusion_<split>.json: the matrix, the split it scored and the epoch whose weights
    it scored. The last epoch's, where best.pt and model/ hold the best epoch's: the title says
    so when they differ."""
    epoch, best = summary.get("test_epoch" if split == "test" else "final_epoch"), summary.get("best_epoch")
    title = f"{summary.get('run_name', '')}: {split} confusion matrix, weights after epoch {epoch}"
    if best and epoch and best != epoch:
        title += f"\n(the last epoch; checkpoints/best.pt and model/ are epoch {best}'s)"
    return {
        "split": split,
        "epoch": epoch,
        "best_epoch": best,
        "title": title,
        "class_names": summary.get("class_names", []),
        "confusion_matrix": confusion.tolist(),
        "confusion_matrix_rows": "true class",
    }
