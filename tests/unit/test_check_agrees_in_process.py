"""--check and the run refuse the same things, with the same exit code and the same words.

The issue this answers: --check passed all-empty class folders, unreadable files over
JOB_MAX_BAD_FRACTION, a changed model under the same run name and a run another job was writing,
each of which the run refused. Both now go through job.run's start-up (begin, the completed-run
records, the dataset pull and scan, the model with its weights and the checkpoint restored); the
cases below are every refusal the run makes before its first step, each given to both, in process
through the entrypoint (cli.main) with the JOB_* variables a user sets. --check must also leave
the output location as it found it."""

import logging
import os
import signal

import numpy as np
import pytest
import stage_dataset
import torch
from conftest import DIGITS
from PIL import Image

from job import cli
from job.errors import EXIT_CODES
from job.lease import Lease


def photos(root, per_class=(4, 4), bad=0, empty=False) -> str:
    """train/<class>/ folders of small PNGs (`bad` of them text files named .png); `empty`: the
    class folders exist and hold nothing."""
    rng = np.random.default_rng(0)
    for c, n in zip(("rose", "tulip", "daisy"), per_class, strict=False):
        os.makedirs(os.path.join(root, "train", c), exist_ok=True)
        for i in range(0 if empty else n):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, "train", c, f"{i}.png"))
    for i in range(bad):
        with open(os.path.join(root, "train", "rose", f"notes-{i}.png"), "w") as f:
            f.write("not an image")
    return str(root)


def entrypoint(monkeypatch, capsys, argv, **settings) -> tuple[int, str]:
    """(exit code, the ERROR line without its timestamp and run suffix) of `python -m job [argv]`
    run in process with these JOB_* settings."""
    with monkeypatch.context() as env:
        for k, v in settings.items():
            env.setenv(k if k.isupper() else f"JOB_{k.upper()}", str(v))
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        job_log = logging.getLogger("job")
        kept = job_log.handlers[:], job_log.level, job_log.propagate
        try:
            code = cli.main(argv)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            logging.disable(logging.NOTSET)  # report_failure silences logging for the way out
            # cli.main logs to this test's captured stdout, which is closed after it
            job_log.handlers[:], job_log.level, job_log.propagate = kept
    out = capsys.readouterr().out
    errors = [line.split(" ERROR ", 1)[1] for line in out.splitlines() if " ERROR " in line]
    assert "Traceback" not in out, out[-3000:]
    assert len(errors) <= 1, out[-3000:]
    return code, errors[0].split(" (exit ")[0] if errors else ""


def tree(path, but: str = "") -> dict:
    """Every file under path (relative name -> mtime), but those under the folder `but`."""
    found = {os.path.relpath(os.path.join(d, f), path): os.path.getmtime(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files}
    return {name: t for name, t in found.items() if not (but and name.startswith(but + os.sep))}


@pytest.fixture
def base(tmp_path, monkeypatch):
    # compile caches (set by JOB_COMPILE) and the job's cache, never the machine's shared ones
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "compile" / var))
    return dict(output_uri=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), run_name="r", threads=1,
                num_workers=0, epochs=1, **DIGITS)


def digits(tmp_path, digits_arrays) -> str:
    stage_dataset.stage(digits_arrays, str(tmp_path / "digits"))
    return str(tmp_path / "digits")


def completed(monkeypatch, capsys, base, data, **settings) -> None:
    assert entrypoint(monkeypatch, capsys, [], data_uri=data, **base, **settings) == (0, "")


def case_invalid_setting(tmp_path, digits_arrays, base, **_):
    return dict(data_uri=digits(tmp_path, digits_arrays), epochs=0)


def case_freeze_past_the_stages(tmp_path, base, **_):
    return dict(data_uri=photos(tmp_path / "p"), model="resnet18", image_size=16, freeze=9)


def case_cuda_on_a_machine_without_one(tmp_path, digits_arrays, base, **_):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: JOB_DEVICE=cuda is no refusal here")
    return dict(data_uri=digits(tmp_path, digits_arrays), device="cuda")


def case_compile_without_a_compiler(tmp_path, digits_arrays, base, **_):
    return dict(data_uri=digits(tmp_path, digits_arrays), compile="true", CXX=str(tmp_path / "no-such-g++"))


def case_data_missing(tmp_path, base, **_):
    return dict(data_uri=str(tmp_path / "nothing-here"))


def case_data_empty(tmp_path, base, **_):
    os.makedirs(tmp_path / "empty")
    return dict(data_uri=str(tmp_path / "empty"))


def case_data_a_file(tmp_path, base, **_):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG")
    return dict(data_uri=str(tmp_path / "photo.png"))


def case_one_class(tmp_path, base, **_):
    return dict(data_uri=photos(tmp_path / "p", per_class=(4,)), image_size=16)


def case_class_folders_all_empty(tmp_path, base, **_):
    return dict(data_uri=photos(tmp_path / "p", empty=True), image_size=16, model="mlp")


def case_unreadable_files_over_the_limit(tmp_path, base, **_):
    return dict(data_uri=photos(tmp_path / "p", per_class=(20, 20), bad=1), image_size=16, model="mlp",
                max_bad_fraction=0.01)  # 1 of 41: 2.4%, as the issue found


def case_format_mismatch(tmp_path, digits_arrays, base, **_):
    return dict(data_uri=digits(tmp_path, digits_arrays), data_format="imagefolder")


def case_weights_missing(tmp_path, digits_arrays, base, **_):
    return dict(data_uri=digits(tmp_path, digits_arrays), pretrained=str(tmp_path / "nope.pt"))


def case_imagenet_weights_that_cannot_be_downloaded(tmp_path, base, **_):
    # an empty TORCH_HOME and a proxy that refuses at once: no download is tried for real
    return dict(data_uri=photos(tmp_path / "p"), model="resnet18", pretrained="imagenet", image_size=16,
                TORCH_HOME=str(tmp_path / "torch-home"),
                HTTPS_PROXY="http://127.0.0.1:9")


def case_weights_that_do_not_fit(tmp_path, digits_arrays, base, **_):
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    return dict(data_uri=digits(tmp_path, digits_arrays), pretrained=str(tmp_path / "other.pt"))


def case_model_changed_under_the_run_name(tmp_path, digits_arrays, base, monkeypatch, capsys, **_):
    data = digits(tmp_path, digits_arrays)
    completed(monkeypatch, capsys, base, data)
    return dict(data_uri=data, model="cnn")


def case_every_checkpoint_corrupt(tmp_path, digits_arrays, base, monkeypatch, capsys, **_):
    data = digits(tmp_path, digits_arrays)
    completed(monkeypatch, capsys, base, data)
    for p in (tmp_path / "out" / "r" / "checkpoints").glob("step-*"):  # the files and their manifests
        p.write_bytes(b"garbage")
    return dict(data_uri=data)


def case_output_not_writable(tmp_path, digits_arrays, base, **_):
    (tmp_path / "a-file").write_text("x")
    return dict(data_uri=digits(tmp_path, digits_arrays), output_uri=str(tmp_path / "a-file" / "out"))


def case_cache_not_writable(tmp_path, digits_arrays, base, **_):
    (tmp_path / "a-file").write_text("x")
    data = f"memory://{tmp_path.name}/digits"  # remote data is pulled into the cache; local data is read in place
    stage_dataset.stage(digits_arrays, data)
    return dict(data_uri=data, cache_dir=str(tmp_path / "a-file" / "cache"))


def case_another_job_writes_the_run(tmp_path, digits_arrays, base, holders, **_):
    lease = Lease(os.path.join(base["output_uri"], "r"), 1.0)
    lease.acquire()  # held, and renewed by its heartbeat, while both ask for it
    holders.append(lease)
    return dict(data_uri=digits(tmp_path, digits_arrays), lease_seconds=1)


# name -> (the exit code, words the refusal must contain): every refusal before the first step
CASES = {
    "invalid_setting": (2, "JOB_EPOCHS"),
    "freeze_past_the_stages": (2, "JOB_FREEZE=9"),
    "cuda_on_a_machine_without_one": (2, "JOB_DEVICE=cuda"),
    "compile_without_a_compiler": (2, "JOB_COMPILE=true"),
    "data_missing": (3, "nothing-here"),
    "data_empty": (3, "empty"),
    "data_a_file": (2, "photo.png is a file, not a folder"),
    "one_class": (3, "1 class"),
    "class_folders_all_empty": (3, "train"),
    "unreadable_files_over_the_limit": (3, "JOB_MAX_BAD_FRACTION=0.01"),
    "format_mismatch": (3, "JOB_DATA_FORMAT"),
    "weights_missing": (3, "nope.pt"),
    "weights_that_do_not_fit": (3, "other.pt"),
    "imagenet_weights_that_cannot_be_downloaded": (3, "cannot get ResNet18_Weights.IMAGENET1K_V1"),
    "model_changed_under_the_run_name": (3, "JOB_MODEL was mlp, now cnn"),
    "every_checkpoint_corrupt": (3, "checkpoint"),
    "output_not_writable": (4, "a-file"),
    "cache_not_writable": (4, "JOB_CACHE_DIR"),
    "another_job_writes_the_run": (75, "another job is writing"),
}


def test_every_case_is_a_refusal_the_run_makes_and_every_exit_code_is_covered():
    assert set(CASES) == {n[len("case_"):] for n in globals() if n.startswith("case_")}
    codes = {code for code, _ in CASES.values()}
    # every exit code the job can give before training, except 75's store failures (tests/job)
    assert codes == {c for c in EXIT_CODES if c in (2, 3, 4, 75)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_refuses_what_the_run_refuses_with_its_exit_code(name, tmp_path, digits_arrays, base, monkeypatch,
                                                               capsys):
    holders: list = []
    try:
        settings = {**base, **globals()[f"case_{name}"](tmp_path=tmp_path, digits_arrays=digits_arrays, base=base,
                                                        monkeypatch=monkeypatch, capsys=capsys, holders=holders)}
        output = settings["output_uri"]
        but = os.path.join("r", "lease") if holders else ""  # the other job renews its lease meanwhile
        before = tree(output, but)
        check = entrypoint(monkeypatch, capsys, ["--check"], **settings)
        assert tree(output, but) == before, "--check changed the output location"
        run = entrypoint(monkeypatch, capsys, [], **settings)
    finally:
        for lease in holders:
            lease.release()
    code, words = CASES[name]
    assert run[0] == code and words in run[1], run
    assert check == run
