"""What a node does beside the training step, through the real job: node-local work under torchrun
(a dataset pull, a feature pass) that outlasts the collective timeout, the DataLoader worker sets
alive at once, and the export's progress lines."""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from datetime import datetime

from conftest import DIGITS, ROOT, job_env, read_history, start_job, time_unit, wait_for
from faultproxy import FaultProxy
from test_distributed import TORCHRUN, torchrun, worker_pid
from test_transfer import RECIPE, make_tree, weights_file


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:  # the process has ended
        pass
    return found


def live_workers(job_pid: int) -> set[int]:
    """The job's DataLoader workers alive now: the children of its forkserver that still hold
    memory (a worker that has exited, reaped or not, holds none)."""
    workers = set()
    for child in children(job_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"forkserver" not in f.read():
                    continue
        except OSError:
            continue
        for worker in children(child):
            try:
                with open(f"/proc/{worker}/status") as f:
                    status = f.read()
            except OSError:
                continue
            if "VmRSS:" in status and "State:\tZ" not in status:
                workers.add(worker)
    return workers


class WorkerCount(threading.Thread):
    """Samples the job's live workers until stopped: the most alive at once, and every one seen."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.most, self.seen, self.done = pid, 0, set(), threading.Event()

    def run(self):
        while not self.done.is_set():
            workers = live_workers(self.pid)
            self.most, self.seen = max(self.most, len(workers)), self.seen | workers
            time.sleep(0.01)

    def stop(self):
        self.done.set()
        self.join()


def image_tree(root) -> str:
    """Flower photos with train/, valid/ and test/ splits."""
    make_tree(str(root), per_class=8, bad=False)
    shutil.copytree(root / "valid", root / "test")
    return str(root)


def test_a_run_never_has_two_dataloader_worker_sets_alive(tmp_path):
    """Each pass (train, val, test, the export's samples) reads through its own loader; with
    persistent workers the train and val sets stayed alive all run long, and the test set joined
    them: three sets of JOB_NUM_WORKERS processes (~0.38 GB each on a GPU node). What is asserted:
    at no moment more than JOB_NUM_WORKERS workers are alive, while every pass used workers."""
    proc = start_job(data_uri=image_tree(tmp_path / "data"), output_uri=str(tmp_path / "out"), run_name="w",
                     model="cnn", image_size=16, epochs=2, batch_size=8, num_workers=2, export="onnx", **DIGITS)
    count = WorkerCount(proc.pid)
    count.start()
    out = proc.communicate(timeout=600)[0]  # a hang guard
    count.stop()
    assert proc.returncode == 0, out
    assert len(count.seen) >= 2, (count.seen, out)  # the passes did run in workers
    assert count.most <= 2, f"{count.most} DataLoader workers alive at once with JOB_NUM_WORKERS=2"


def test_the_feature_pass_leaves_no_workers_behind(tmp_path):
    """With the feature cache the head trains on tensors: the feature pass's workers must be gone
    by then. The job is paused at its first epoch line and its workers counted."""
    settings = {**RECIPE, "epochs": 4, "num_workers": 2, "export": "safetensors"}
    proc = start_job(data_uri=image_tree(tmp_path / "data"), output_uri=str(tmp_path / "out"), run_name="f",
                     pretrained=weights_file(str(tmp_path / "w.pt")), cache_dir=str(tmp_path / "cache"), **settings)
    count = WorkerCount(proc.pid)
    count.start()
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if re.search(r" epoch 1 train_loss=", line):
            break
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        running = proc.poll() is None
        alive = live_workers(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out = "".join(lines) + proc.communicate(timeout=600)[0]
    count.stop()
    assert proc.returncode == 0, out
    assert "feature cache: computing backbone features" in out
    assert running, "the run ended before its first epoch line was read"
    assert alive == set(), f"{len(alive)} DataLoader workers alive while the head trains on cached features"
    assert len(count.seen) >= 2 and count.most <= 2, (count.seen, count.most)


def test_a_node_local_pull_outlasting_the_collective_timeout_completes(s3, digits_dir, tmp_path):
    """Local rank 0 pulls the dataset while the other ranks wait. They used to wait in a collective,
    which gives up after JOB_DIST_TIMEOUT_SECONDS (NCCL's watchdog kills the rank): a pull longer
    than that failed every run on its first start. Every request for the dataset here takes
    `delay` seconds, so the pull (several requests in turn) outlasts the timeout."""
    s3.put(str(digits_dir), "data/digits", recursive=True)
    timeout, delay = 5, 3
    proxy = FaultProxy(s3.aws_env["AWS_ENDPOINT_URL"], 0.0, delay_seconds=delay, delay_paths=r"^/data\b")
    try:
        result = torchrun("--standalone", "--nproc-per-node=2", env_extra={"AWS_ENDPOINT_URL": proxy.url},
                          data_uri="s3://data/digits", output_uri=str(tmp_path / "out"), run_name="r", epochs=2,
                          dist_timeout_seconds=timeout, log_every_seconds=1, cache_dir=str(tmp_path / "cache"),
                          **DIGITS)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stdout[-5000:]
    assert [r["epoch"] for r in read_history(tmp_path / "out" / "r")] == [1, 2]
    # the node-local phase did outlast the timeout: from the first line to the dataset's summary
    stamps = [(datetime.fromisoformat(line[:23]), line) for line in result.stdout.splitlines()
              if re.match(r"\d{4}-\d\d-\d\dT[\d:.]{12} ", line)]
    first = next(t for t, line in stamps if " | trainjob " in line)  # set up, about to pull
    loaded = next(t for t, line in stamps if " dataset s3://data/digits: " in line)
    assert (loaded - first).total_seconds() > timeout, result.stdout[-5000:]
    assert "waiting for" in result.stdout  # rank 0 waited for rank 1's read, and said so


def test_a_rank_waiting_for_its_node_answers_a_stop(s3, digits_dir, tmp_path):
    """A SIGTERM to a rank waiting for local rank 0's pull ends it at once (exit 143), where it
    used to sit in a collective until the pull ended or the timeout ran out."""
    s3.put(str(digits_dir), "data/digits", recursive=True)
    proxy = FaultProxy(s3.aws_env["AWS_ENDPOINT_URL"], 0.0, delay_seconds=30, delay_paths=r"^/data\b")
    env = {**job_env(data_uri="s3://data/digits", output_uri=str(tmp_path / "out"), run_name="r", epochs=2,
                     cache_dir=str(tmp_path / "cache"), **DIGITS), "AWS_ENDPOINT_URL": proxy.url}
    agent = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "job"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: proxy.counts["delayed"] >= 1, agent, what="rank 0's pull")  # rank 1 waits by then
        os.kill(worker_pid(agent.pid, 1), signal.SIGTERM)
        out = agent.communicate(timeout=600)[0]  # a hang guard
    finally:
        proxy.close()
        if agent.poll() is None:
            agent.kill()
    assert re.search(r"rank 1 stopped by signal 15 while waiting for local rank 0 \(the dataset\).*exit 143", out), out
    assert agent.returncode != 0


def test_export_logs_each_phase_and_a_line_every_interval(s3, digits_dir, tmp_path, monkeypatch):
    """The export (weights, ONNX trace, verification, writes) used to be silent for its whole
    length (minutes for a large model). With JOB_LOG_EVERY_SECONDS=1 each phase logs its start and
    its end, a phase that lasts seconds (a slow upload of the weights here) logs while it runs, and
    no two export lines are further apart than the interval plus a slack measured here."""
    delay = 4
    proxy = FaultProxy(s3.aws_env["AWS_ENDPOINT_URL"], 0.0, delay_seconds=delay, delay_paths=r"model\.safetensors")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the job's requests go through the proxy
    try:
        unit = time_unit()
        proc = start_job(data_uri=str(digits_dir), output_uri="s3://out", run_name="e", model="cnn", epochs=1,
                         export="onnx", log_every_seconds=1, **DIGITS)
        out = proc.communicate(timeout=600)[0]
    finally:
        proxy.close()
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if " export: " in line or " exporting " in line]
    assert lines, out
    phases = [m[1] for line in lines if (m := re.search(r" export: (.+?) \.\.\.$", line))]
    assert {"writing model.safetensors", "tracing the model for ONNX"} <= set(phases), lines
    assert any(p.startswith("verifying the ONNX model") for p in phases), lines
    for phase in phases:
        assert any(f" export: {phase} done in " in line for line in lines), (phase, lines)
    assert sum(" export: writing model.safetensors: " in line for line in lines) >= 1, lines  # while it ran
    stamps = [datetime.fromisoformat(line[:23]) for line in lines]
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) <= 1 + 2 * unit, (gaps, unit, lines)
