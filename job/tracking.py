"""Experiment tracking, best effort and never in training's way.

MLflow when MLFLOW_TRACKING_URI is set (the variable every MLflow user already has), in the
experiment MLFLOW_EXPERIMENT_NAME (default "trainjob"), under the job's run name: the settings as
parameters (no secrets), every epoch's metrics, and at the end the results (best_val_accuracy and
best_epoch, test_accuracy and test_loss) as metrics and the summary, plots and exported model as
artifacts. A restarted pod continues the same MLflow run (found by its `trainjob.run`
tag) and logs only the epochs it has not seen. TensorBoard with JOB_TENSORBOARD=true: scalar event
files under <run>/tensorboard/, which `tensorboard --logdir s3://...` reads.

Rank 0 only. All calls run in order in one background thread: a tracker that is down, slow or
refusing costs a warning, never a failed or slower run. MLflow's own HTTP retries are bounded
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_TIMEOUT=10 unless set), the tracker is
switched off after MAX_FAILURES failed calls in a row, and the job waits at most DRAIN_SECONDS
for it at the end.
"""

import json
import logging
import os
import queue
import tempfile
import threading
import time
from typing import Any

from job import report, storage

log = logging.getLogger("job")
MAX_FAILURES = 3
DRAIN_SECONDS = 15.0
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "train_seconds", "val_seconds",
           "epoch_seconds", "train_samples_per_second")
# summary.json's results, each logged at the epoch it describes (best: the best epoch; test: the
# epoch whose weights scored the test set) so that runs sort by them
RESULTS = {"best_val_accuracy": "best_epoch", "best_epoch": "best_epoch", "test_accuracy": "test_epoch",
           "test_loss": "test_epoch"}


class Tracker:
    """No-op unless MLflow or TensorBoard is asked for (and on ranks other than 0)."""

    def __init__(self, settings, runtime, run_uri: str):
        self.settings, self.run_uri = settings, run_uri
        self.use_mlflow = bool(os.environ.get("MLFLOW_TRACKING_URI")) and runtime.is_main
        self.use_tensorboard = settings.tensorboard and runtime.is_main
        self.active = self.use_mlflow or self.use_tensorboard
        self.logged = 0  # epochs the trackers have
        self.failures, self.warned = 0, False
        self.mlflow: Any = None  # an MlflowClient once the run is found or made
        self.run_id: str = ""
        self.writer: Any = None
        self.calls: queue.Queue = queue.Queue()
        if self.active:
            threading.Thread(target=self._work, name="tracking", daemon=True).start()

    # --- what the run calls (returns at once) -------------------------------------------------
    def start(self, history: list[dict]) -> None:
        self._call(self._start, len(history))

    def epochs(self, history: list[dict]) -> None:
        """Log the epochs of `history` the trackers do not have yet."""
        self._call(self._epochs, list(history))

    def results(self, summary: dict) -> None:
        """The final summary's results (RESULTS) as metrics, those it has."""
        self._call(self._results, dict(summary))

    def artifacts(self, files: dict[str, bytes]) -> None:
        """{path in the run: bytes}, e.g. summary.json, plots/loss.png, model/config.json."""
        self._call(self._artifacts, dict(files))

    def end(self, status: str, seconds: float = DRAIN_SECONDS) -> None:
        """FINISHED, FAILED or KILLED; then wait for the tracker at most `seconds`. Called once
        the run's own records are written: a tracker never holds them up."""
        if not self.active:
            return
        self._call(self._end, status)
        done = threading.Event()
        self.calls.put((lambda: done.set(), ()))
        if not done.wait(seconds):
            log.warning(f"experiment tracking did not finish within {seconds:.0f} s; leaving it (the run's own "
                        "records in its output location are written)")

    # --- the background thread ----------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        if self.active:
            self.calls.put((fn, args))

    def _work(self) -> None:
        while True:
            fn, args = self.calls.get()
            if not self.active and getattr(fn, "__self__", None) is self:  # switched off: skip, but keep draining
                continue
            try:
                fn(*args)
                self.failures = 0
            except Exception as exc:  # a tracker problem is never the run's problem
                self.failures += 1
                if not self.warned:
                    log.warning(
                        f"experiment tracking failed ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                        "training goes on"
                    )
                    self.warned = True
                if self.failures >= MAX_FAILURES:
                    log.warning(f"experiment tracking switched off after {MAX_FAILURES} failed calls in a row")
                    self.active = False

    def _start(self, logged: int) -> None:
        self.logged = logged
        if self.use_tensorboard:
            from tensorboardX import SummaryWriter

            self.tb_dir = tempfile.mkdtemp(prefix="trainjob-tensorboard-")
            self.writer = SummaryWriter(logdir=self.tb_dir, flush_secs=3600)
        if self.use_mlflow:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "trainjob")
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            uri = storage.redact_uri(self.run_uri)
            found = client.search_runs([experiment_id], filter_string=f"tags.`trainjob.run` = '{uri}'", max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                steps = [m.step for m in client.get_metric_history(self.run_id, "val_accuracy")]
                self.mlflow_logged = max(steps, default=0)
                client.update_run(self.run_id, status="RUNNING")
            else:
                run = client.create_run(
                    experiment_id,
                    run_name=self.settings.run_name,
                    tags={"trainjob.run": uri, "trainjob.recipe": report.recipe(self.settings)},
                )
                self.run_id, self.mlflow_logged = run.info.run_id, 0
                from mlflow.entities import Param

                params = [
                    Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                    for k, v in self.settings.public_dict().items()
                ]
                client.log_batch(self.run_id, params=params)
            self.mlflow = client
            log.info(f"experiment tracking: MLflow run {self.run_id} in experiment {name!r}")

    def _epochs(self, history: list[dict]) -> None:
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [
                Metric(k, float(row[k]), now, row["epoch"])
                for row in history
                if row["epoch"] > self.mlflow_logged
                for k in METRICS
                if k in row
            ]
            if metrics:
                self.mlflow.log_batch(self.run_id, metrics=metrics)
                self.mlflow_logged = history[-1]["epoch"]
        if self.writer is not None:
            for row in history:
                if row["epoch"] > self.logged:
                    for k in METRICS:
                        if k in row:
                            self.writer.add_scalar(k, float(row[k]), row["epoch"])
            self.writer.flush()
            self._upload_tensorboard()
        self.logged = max([self.logged] + [row["epoch"] for row in history])

    def _upload_tensorboard(self) -> None:
        for name in os.listdir(self.tb_dir):
            with open(os.path.join(self.tb_dir, name), "rb") as f:
                storage.write_bytes(storage.join(self.run_uri, "tensorboard", name), f.read())

    def _results(self, summary: dict) -> None:
        if self.mlflow is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(summary[k]), now, int(summary.get(epoch) or 0))
            for k, epoch in RESULTS.items()
            if isinstance(summary.get(k), (int, float)) and not isinstance(summary.get(k), bool)
        ]
        if metrics:
            self.mlflow.log_batch(self.run_id, metrics=metrics)

    def _artifacts(self, files: dict[str, bytes]) -> None:
        if self.mlflow is None:
            return
        with tempfile.TemporaryDirectory(prefix="trainjob-artifacts-") as tmp:
            for path, blob in files.items():
                os.makedirs(os.path.join(tmp, os.path.dirname(path)), exist_ok=True)
                with open(os.path.join(tmp, path), "wb") as f:
                    f.write(blob)
            self.mlflow.log_artifacts(self.run_id, tmp)

    def _end(self, status: str) -> None:
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id, status=status)
        if self.writer is not None:
            self.writer.close()  # writes what its queue still held: upload the final file
            self._upload_tensorboard()
