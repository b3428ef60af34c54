"""The entrypoint: parse the two flags, read settings, run, and turn every outcome into an exit code."""

import json
import logging
import os
import sys
import time

from job import __version__, storage
from job.errors import JobError, PeerLostError, Stopped
from job.report import setup_logging
from job.settings import help_text, load_settings
from job.stop import StopRequest

log = logging.getLogger("job")


def check(settings, stop: StopRequest) -> None:
    """--check: the run's start-up up to its first step without training or writing to the output
    (job.run.check): it refuses what the run refuses, with the same exit code, and says what the
    run would do (new, resumable, complete)."""
    from job import run
    from job.runtime import setup

    warn_local_output(settings)
    log.info(f"check passed: {run.check(settings, setup(settings, stop))}")


COMMANDS = {
    "predict": (
        "classify images (or IDX images) with an exported model -> predictions.jsonl",
        [
            ("model", "the model: a run's URI or its model/ folder"),
            ("inputs", "a folder or prefix of images (subfolders included), of IDX image files, or a sharded dataset"),
        ],
        "where to write predictions.jsonl (default: <run>/predictions/<inputs>-<hash of its URI>.jsonl)",
    ),
    "evaluate": (
        "score an exported model on labelled data -> evaluation.json and confusion.png",
        [
            ("model", "the model: a run's URI or its model/ folder"),
            ("data", "class folders, an image-folder dataset (its test/ or valid/ split), a sharded dataset (its test "
             "or val split), or MNIST-format IDX files"),
        ],
        "the folder to write to (default: <run>/evaluations/<data>-<hash of its URI>-<split>/)",
    ),
    "export": (
        "write a model/ folder (safetensors, config.json, verified ONNX) from any checkpoint",
        [("checkpoint", "a checkpoint's URI, e.g. <run>/checkpoints/best.pt or a step-*.pt")],
        "the folder to write to (default: <run>/model/)",
    ),
    "prepare": (
        "write a sharded dataset (WebDataset tar shards and index.json) that training streams",
        [
            ("source", "an image folder (train/ and optional valid/, test/) or MNIST IDX files, at any URI"),
            ("dest", "where the shards and index.json go (JOB_DATA_URI for training)"),
        ],
        None,
    ),
}


def command(name: str, args: list[str], stop: StopRequest) -> int:
    """`python -m job predict|evaluate|export ...`: the arguments name the model and data; the
    rest (device, batch size, cache, storage, limits) comes from the usual JOB_* variables."""
    import argparse

    description, positional, output = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"python -m job {name}", description=description)
    for arg, help_ in positional:
        parser.add_argument(arg, help=help_)
    if output:
        parser.add_argument("--output", help=output)
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0)
    setup_logging()
    try:
        settings = load_settings(data_uri=getattr(ns, positional[0 if name == "prepare" else -1][0]))
        setup_logging(settings.log_level)
        storage.configure(settings, stop)
        from job import predict
        from job.runtime import setup

        stop.check()  # a signal during the imports: exit 143 now, with this line
        runtime = setup(settings, stop)
        stop.check()
        if name == "prepare":
            from job import data

            data.prepare(settings, runtime, ns.source, ns.dest)
        elif name == "predict":
            predict.predict(settings, runtime, ns.model, ns.inputs, ns.output)
        elif name == "evaluate":
            predict.evaluate(settings, runtime, ns.model, ns.data, ns.output)
        else:
            predict.export_checkpoint(settings, ns.checkpoint, ns.output)
        return 0
    except Exception as exc:
        return report_failure(exc)


def main(argv: list[str] | None = None, stop: StopRequest | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop = stop or StopRequest().install()
    if argv and argv[0] in COMMANDS:
        return command(argv[0], argv[1:], stop)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    unknown = [a for a in argv if a != "--check"]
    if unknown:
        print(
            f"error: unknown argument(s) {' '.join(unknown)}; the job is configured by JOB_* variables "
            "(see python -m job --help)",
            file=sys.stderr,
        )
        return 2
    setup_logging()
    try:
        settings = load_settings()
        setup_logging(settings.log_level)
        storage.configure(settings, stop)
        stop.check()
        # the first line names the run, before the seconds PyTorch takes to load
        log.info(
            f"run {storage.redact_uri(storage.join(settings.output_uri, settings.run_name or ''))}: "
            f"{'checking' if '--check' in argv else 'starting'} trainjob "
            f"{__version__}{' in smoke mode' if settings.smoke else ''}, loading PyTorch"
        )
        from job.run import resolve_run_name
        from job.run import run as train  # imports torch: keep --help and settings errors fast
        from job.runtime import setup, teardown
        from job.smoke import main as smoke

        settings = resolve_run_name(settings)
        if "--check" in argv:
            check(settings, stop)
            return 0

        run = smoke if settings.smoke else train
        stop.check()  # a signal during the imports (PyTorch: seconds): exit 143 now, with this line
        runtime = setup(settings, stop)
        stop.check()
        if not runtime.distributed:
            warn_local_output(settings)
            run(settings, runtime)
            return 0
        setup_logging(settings.log_level, rank=runtime.rank)
        if runtime.is_main:
            warn_local_output(settings)
        try:
            run(settings, runtime)
        except BaseException as exc:
            # After a failed collective, tearing the process group down can abort the process
            # ("terminate called ..."): report, then leave without running destructors.
            code = report_failure(exc)
            logging.shutdown()
            sys.stdout.flush()
            os._exit(code)
        teardown()
        return 0
    except Exception as exc:
        return report_failure(exc)


def warn_local_output(settings) -> None:
    """JOB_OUTPUT_URI left at its default (./runs, a folder in the container) while the data comes
    from object storage: the run's checkpoints and model go where the pod's end takes them."""
    remote = "://" in settings.data_uri and not settings.data_uri.startswith("file://")
    if "output_uri" in settings.model_fields_set or not remote:
        return
    log.warning(
        f"JOB_OUTPUT_URI is not set: this run writes its checkpoints and model to {settings.output_uri} inside the "
        f"container, lost with it (the data comes from {storage.redact_uri(settings.data_uri)}); set JOB_OUTPUT_URI "
        "to an object-store URI (s3://bucket/runs) or a mounted volume"
    )


def record_for_launcher(line: str, relayed: bool = False) -> None:
    """Under torchrun, leave the failure's one line in the worker's error file
    (TORCHELASTIC_ERROR_FILE, in the format torch.distributed.elastic's `record` writes), with the
    time to the microsecond: the launcher names the first worker that failed and repeats its line,
    where torchrun's own timestamps (whole seconds) cannot tell it from a peer that failed after it;
    `relayed`: this failure only passes on another rank's (a lost peer, a failure posted by another,
    a stop)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(now)),
                                                         "failed_at": now, "relayed": relayed}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # the launcher falls back to torchrun's own report


def report_failure(exc: BaseException) -> int:
    """Log how the job failed (one line for a JobError, the traceback for a bug); the exit code.
    Call it while handling `exc`. That line is the log's last: threads abandoned on the way out (a
    storage call still retrying on a frozen store, an upload) log nothing after it."""
    run_uri = getattr(exc, "run_uri", "")
    run = f"; run {run_uri}" if run_uri else ""
    if isinstance(exc, Stopped):  # a graceful stop is not an error
        line = f"{exc} (exit {exc.exit_code}{run})"
        log.warning(line)
        code = exc.exit_code
    elif isinstance(exc, JobError):
        line = f"{exc} (exit {exc.exit_code}{run})"
        log.error(line)
        code = exc.exit_code
    else:
        what = " ".join(str(exc).split())[:300]
        line = f"unexpected error ({type(exc).__name__}: {what}): a bug in trainjob (exit 1)"
        log.exception("unexpected error: this is a bug in trainjob; please report it with this log (exit 1)")
        code = 1
    # A lost peer, a rank told of another's failure, or a stop (under torchrun, mostly torchrun
    # stopping the rest after a failure) only relays a failure: the launcher names the other rank.
    relayed = isinstance(exc, (PeerLostError, Stopped)) or getattr(exc, "relayed", False)
    record_for_launcher(line, relayed=relayed)
    logging.disable(logging.CRITICAL)
    # An exception may be kept by a thread still running (the shard prefetcher keeps its error):
    # its traceback would keep every frame, and the DataLoader workers they hold, alive past exit.
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__context__ or link.__cause__
    return code
