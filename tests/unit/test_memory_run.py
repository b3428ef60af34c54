"""A whole run in process, on memory:// (fsspec's in-process filesystem): the entrypoint's
return code and the run's outputs without a subprocess or a server."""

import signal

import stage_dataset
from conftest import CACHE_DIR, DIGITS
from job import cli, storage


def test_memory_uri_in_process(monkeypatch, digits_arrays, capsys):
    stage_dataset.stage(digits_arrays, "memory://staged/digits")
    for k, v in {"JOB_DATA_URI": "memory://staged/digits", "JOB_OUTPUT_URI": "memory://results",
                 "JOB_RUN_NAME": "mem", "JOB_EPOCHS": "2", "JOB_THREADS": "1",
                 "JOB_CACHE_DIR": CACHE_DIR,  # never the machine's shared /tmp/trainjob-cache
                 **{f"JOB_{k.upper()}": v for k, v in DIGITS.items()}}.items():
        monkeypatch.setenv(k, v)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli.main([]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    summary = storage.read_json("memory://results/mem/summary.json")
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert storage.exists("memory://results/mem/checkpoints/best.pt")
