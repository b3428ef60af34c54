"""What a run tells people: log lines, history.jsonl, summary.json, failure.json and plots.

Metrics are data: the same names appear in the log line, the history rows and the plots.
"""

import io
import json
import logging
import sys
import time

from job import storage
from job.settings import redact_text

log = logging.getLogger("job")
# Control characters and line separators, as visible escapes: one record is one line, whatever a
# class folder or file name holds (a newline in a name must not forge a log line).
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(32), 127, 0x85] if c != 9} | {10: "\\n", 13: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


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


def setup_logging(level: str = "info", rank: int | None = None) -> None:
    """Plain timestamped lines on stdout for `kubectl logs`. Under torchrun only rank 0 speaks
    (other ranks: warnings and errors, and everything at debug), each line naming its rank."""
    if rank:
        level = level if level == "debug" else "warning"
    if hasattr(sys.stdout, "reconfigure"):  # a C locale's ASCII stdout must not fail on a name from the data
        sys.stdout.reconfigure(errors="backslashreplace")
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"rank {rank} " if rank is not None else ""
    handler.setFormatter(_Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def summary(settings, runtime, data, state, status: str, started: float, **extra) -> dict:
    """summary.json: how the run stands (status running, completed, failed or stopped)."""
    last = state.history[-1] if state.history else {}
    return {
        "status": status,
        "run_name": settings.run_name,
        "epochs_completed": len(state.history),
        "best_epoch": state.best_epoch or None,
        "best_val_accuracy": state.best_val_accuracy if state.history else None,
        "final_val_accuracy": last.get("val_accuracy"),
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
        **extra,
    }


def history_bytes(history: list[dict]) -> bytes:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in history).encode()


def read_history(run_uri: str) -> list[dict]:
    uri = storage.join(run_uri, "history.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def plot_png(history: list[dict], metric: str) -> bytes:
    """Train and val curves of one metric per epoch. Uses matplotlib's object API (no pyplot
    global state) so it is safe in the uploader thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [row["epoch"] for row in history]
    for split in ("train", "val"):
        ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def publish(run_uri: str, history: list[dict], summary: dict) -> None:
    """Rewrite history, summary and plots whole (object stores cannot append)."""
    storage.write_bytes(storage.join(run_uri, "history.jsonl"), history_bytes(history))
    if history:
        for metric in ("accuracy", "loss"):
            storage.write_bytes(storage.join(run_uri, "plots", f"{metric}.png"), plot_png(history, metric))
    storage.write_json(storage.join(run_uri, "summary.json"), summary)
