"""The launcher's last line, what `kubectl logs` ends with: it names the worker that failed first,
not a rank that only relayed its failure, and repeats that worker's one-line message (torchrun's
table of failures sits 20 lines above it). Real torchrun agents and workers, gloo on CPU."""

import hashlib
import json
import logging

from conftest import run_job
from test_launch import run_launcher

from job import cli
from job.errors import EXIT_CODES, DataError, JobError, PeerLostError, Stopped
from job.launch import first_failure, worker_line


def test_the_launchers_last_line_names_the_rank_that_failed_and_repeats_its_message(tmp_path, digits_dir):
    """Rank 1 alone cannot use its shard cache folder (each local rank has its own); rank 0, told
    of it while it waits for the other ranks, fails too, with the same exit code."""
    shards, cache = tmp_path / "shards", tmp_path / "cache"
    prepared = run_job("prepare", str(digits_dir), str(shards), cache_dir=str(cache))
    assert prepared.returncode == 0, prepared.stdout
    ours = cache / "shards" / hashlib.sha256(str(shards).encode()).hexdigest()[:16]
    ours.mkdir(parents=True)
    (ours / "process-1").write_text("a file where local rank 1's shard cache folder goes")
    result = run_launcher("--standalone", "--nproc-per-node=2", data_uri=str(shards), output_uri=str(tmp_path / "out"),
                          cache_dir=str(cache), epochs=1)
    assert result.returncode == DataError.exit_code, result.stdout[-3000:]
    worker = next(line for line in result.stdout.splitlines() if " ERROR rank 1 " in line)
    said = worker.split(" ERROR rank 1 ", 1)[1]
    assert str(shards) in said and "File exists" in said, worker
    last = result.stdout.strip().splitlines()[-1]
    assert " ERROR launcher: worker rank 1 (local rank 1) exited 3, the first to fail; " in last, result.stdout[-3000:]
    assert f"exit 3: {EXIT_CODES[3][0]}; rank 1 said: {said}" in last, last


class _Failure:
    """What torchrun hands the launcher for a failed worker (ProcessFailure's fields it reads)."""

    def __init__(self, path, exitcode: int, timestamp: int, local_rank: int):
        self.exitcode, self.timestamp, self.local_rank = exitcode, timestamp, local_rank
        self.error_file_data = json.loads(open(path).read()) if path else {"message": "<NONE>"}


def test_a_relay_in_the_same_second_is_never_named_first(tmp_path, monkeypatch):
    """torchrun compares whole seconds and breaks a tie by rank: rank 0, which failed only
    because rank 1 did, was named. The error files the job writes as it reports its failure
    (job.cli, to torchrun's TORCHELASTIC_ERROR_FILE) decide: the rank that failed on its own; a
    SIGKILLed rank (no file) before the peers that lost it or were stopped after it."""
    files = {}
    for rank, exc in ((1, DataError("no dataset found at s3://data/photos")),
                      (0, PeerLostError("rank 1 has not answered for 300 s")),
                      (2, Stopped(15))):
        files[rank] = tmp_path / f"{rank}.json"
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[rank]))
        try:
            raise exc
        except JobError as raised:
            cli.report_failure(raised)
        finally:
            logging.disable(logging.NOTSET)  # report_failure silences the log on its way out
    second = int(json.loads(files[1].read_text())["message"]["extraInfo"]["timestamp"])
    failures = {0: _Failure(files[0], 75, second, 0), 1: _Failure(files[1], 3, second, 1),
                2: _Failure(files[2], 143, second, 2)}
    assert first_failure(failures) == 1
    assert worker_line(failures[1]) == "no dataset found at s3://data/photos (exit 3)"
    killed = {0: _Failure(files[0], 75, second, 0), 2: _Failure(files[2], 143, second, 2),
              3: _Failure(None, -9, second, 3)}
    assert first_failure(killed) == 3 and worker_line(killed[3]) == ""
