"""Each output says which epoch and split it describes (issue 24): the confusion matrices are the
last epoch's while checkpoints/best.pt and model/ are the best epoch's, and their plot and JSON
say so. In process: report.publish as a checkpoint or the run's end calls it. The same through
the real job is tests/job/test_outputs_epochs.py."""

import io
import json

import torch
from PIL import Image

from job import report

HISTORY = [{"epoch": e, "train_loss": 1.0, "train_accuracy": a, "val_loss": 1.0, "val_accuracy": a, "lr": 0.1}
           for e, a in ((1, 0.5), (2, 0.9), (3, 0.8))]


def published(tmp_path, best_epoch: int) -> dict:
    summary = {"run_name": "r", "class_names": ["cat", "dog"], "best_epoch": best_epoch, "final_epoch": 3,
               "test_epoch": 3}
    confusions = {"val": torch.tensor([[3, 1], [0, 4]]), "test": torch.tensor([[5, 0], [2, 3]])}
    report.publish(str(tmp_path), HISTORY, summary, confusions)
    return {split: json.loads((tmp_path / "plots" / f"confusion_{split}.json").read_text()) for split in confusions}


def png_title(path) -> str:
    return Image.open(io.BytesIO(path.read_bytes())).text["Title"]


def test_the_confusion_matrices_name_their_split_and_epoch_and_the_best_one_when_it_differs(tmp_path):
    records = published(tmp_path, best_epoch=2)
    for split, total in (("val", 8), ("test", 10)):
        record = records[split]
        assert record["split"] == split and record["epoch"] == 3 and record["best_epoch"] == 2
        assert sum(map(sum, record["confusion_matrix"])) == total and record["class_names"] == ["cat", "dog"]
        title = png_title(tmp_path / "plots" / f"confusion_{split}.png")
        assert title == record["title"]
        assert f"{split} confusion matrix, weights after epoch 3" in title
        assert "checkpoints/best.pt and model/ are epoch 2's" in title


def test_a_last_epoch_that_is_the_best_says_nothing_more(tmp_path):
    records = published(tmp_path, best_epoch=3)
    assert records["val"]["title"] == "r: val confusion matrix, weights after epoch 3"
    assert png_title(tmp_path / "plots" / "confusion_val.png") == records["val"]["title"]
