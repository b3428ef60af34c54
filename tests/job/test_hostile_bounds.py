"""Bounds before allocation and log masking (issue 22), through the real job: a model config naming
a huge architecture, IDX dimensions that overflow, hidden sizes without a total bound, a password
holding '@', C1 and bidi controls in names. Attacks on shards: tests/job/test_hostile_shards.py."""

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from conftest import DIGITS, ROOT, SECRET, job_env, run_job
from PIL import Image

from job import export

C1_AND_BIDI = {*map(chr, range(0x80, 0xA0)), *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def run_measured(*args, timeout: float = 600, **settings) -> tuple[int, str, int]:
    """The job as a subprocess: (exit code, output, its peak resident memory in MB, as the kernel
    counted it: wait4). `timeout` is a hang guard."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "job", *args], env=job_env(**settings), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the job did not end within {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        return proc.returncode, out.read(), usage.ru_maxrss // 1024


def test_a_model_config_naming_a_huge_architecture_is_refused_before_it_is_built(tmp_path):
    """vit_h_14 takes 2.5 GB built; beside it, weights of a few KB. The weights' tensors are checked
    against the architecture's shapes (a model without storage) first: the job never holds it."""
    import torch
    from safetensors.torch import save as save_safetensors

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(save_safetensors({"heads.head.weight": torch.zeros(2, 1280)}))
    config = {"format": "trainjob-model", "format_version": 1, "weights": "model.safetensors",
              "architecture": "vit_h_14", "num_classes": 2, "class_names": ["rose", "tulip"],
              "input_shape": [3, 224, 224], "preprocessing": export.preprocessing("vit_h_14", (3, 224, 224), 224, True)}
    (model / "config.json").write_text(json.dumps(config))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(inputs / "a.png")
    code, out, peak_mb = run_measured("predict", str(model), str(inputs))
    assert code == 3 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert "do not fit its config.json" in last and "vit_h_14 has 630,767,362 parameters" in last, out
    assert peak_mb < 2000, peak_mb  # torch and the job: ~1 GB; vit_h_14 built would add 2.5 GB


def test_idx_dimensions_whose_product_overflows_are_one_line(digits_dir, tmp_path):
    # 2^31 x 2^31 x 4 is 2^64: numpy's int64 product wraps to 0, which an empty payload matched
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (1 << 31, 1 << 31, 4))
    (digits_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header))
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), epochs=1, **DIGITS)
    assert result.returncode == 3 and "Traceback" not in result.stdout, result.stdout
    assert "train-images-idx3-ubyte.gz: header says" in result.stdout.strip().splitlines()[-1], result.stdout


def test_hidden_sizes_are_bounded_in_total_before_training(digits_dir, tmp_path):
    # each width is allowed (<= 65536); together 65536 x 65536 weights are 4.3 billion parameters (17 GB)
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path / "out"), epochs=1, hidden_sizes="65536,65536",
                     **DIGITS)
    assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert "JOB_HIDDEN_SIZES=65536,65536" in last and "over the bound of 2,000,000,000" in last, result.stdout


def test_a_password_holding_an_at_sign_never_reaches_the_log(tmp_path):
    # credentials in a URI are refused (exit 2), and the refusal names the URI: masked in full
    result = run_job(data_uri=f"memory://reader:p@{SECRET}@bucket/data", output_uri=str(tmp_path / "out"), epochs=1)
    assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout
    assert "memory://***@bucket/data" in result.stdout and SECRET not in result.stdout, result.stdout


def test_c1_and_bidi_controls_in_a_file_name_are_escaped_in_the_log(tmp_path):
    root = tmp_path / "data"
    for name, color in (("rose", (220, 40, 40)), ("tulip", (40, 40, 220))):
        os.makedirs(root / "train" / name)
        rng = np.random.default_rng(len(name))
        for i in range(10):
            pixels = np.clip(np.array(color) + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i:03d}.png")
    # a terminal's CSI (clear the screen) and a right-to-left override that shows "exe.png" as "gnp.exe"
    (root / "train" / "rose" / "x\x9b2J\u202egnp.exe").write_bytes(b"not an image")
    result = run_job(data_uri=str(root), output_uri=str(tmp_path / "out"), run_name="r", model="mlp", image_size=16,
                     epochs=1, batch_size=8, num_workers=0, max_bad_fraction=0.2, **DIGITS)
    assert result.returncode == 0, result.stdout
    assert f"skipping {root}/train/rose/x\\x9b2J\\u202egnp.exe: not an image" in result.stdout, result.stdout
    assert not C1_AND_BIDI & set(result.stdout), result.stdout
