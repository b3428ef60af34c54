"""Each output of a run says which epoch and split it describes (issue 24), through the real job:
summary.json's best_epoch and final_epoch/test_epoch, the confusion matrices' plot and JSON, and
best.pt and model/ as the best epoch's."""

import io
import json

import torch
from conftest import DIGITS, read_history, run_job
from PIL import Image


def test_every_output_names_the_epoch_and_split_it_describes(tmp_path, digits_dir, digits_arrays):
    result = run_job(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=3, **DIGITS)
    assert result.returncode == 0, result.stdout
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    history = read_history(run)
    best = max(history, key=lambda row: row["val_accuracy"])  # the first of equals: a later tie is not better
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_accuracy"] == best["val_accuracy"]
    assert summary["final_epoch"] == summary["test_epoch"] == history[-1]["epoch"] == 3
    assert summary["final_val_accuracy"] == history[-1]["val_accuracy"]
    assert f"(weights after epoch 3; the best epoch, in best.pt and model/, is {best['epoch']})" in result.stdout
    for split, samples in (("val", summary["val_samples"]), ("test", len(digits_arrays["test_labels"]))):
        record = json.loads((run / "plots" / f"confusion_{split}.json").read_text())
        assert record["split"] == split and record["epoch"] == 3 and record["best_epoch"] == best["epoch"]
        assert sum(map(sum, record["confusion_matrix"])) == samples
        title = Image.open(io.BytesIO((run / "plots" / f"confusion_{split}.png").read_bytes())).text["Title"]
        assert title == record["title"] and f"{split} confusion matrix, weights after epoch 3" in title
    val = json.loads((run / "plots" / "confusion_val.json").read_text())["confusion_matrix"]
    hits = sum(val[i][i] for i in range(len(val)))
    assert hits / summary["val_samples"] == summary["final_val_accuracy"]  # the last epoch's, as it says
    state = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert state["best_epoch"] == summary["best_epoch"]
    assert json.loads((run / "model" / "config.json").read_text())["source"]["epoch"] == summary["best_epoch"]
