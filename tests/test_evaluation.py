"""``vggkit evaluate``: metrics against scikit-learn, the confusion matrix against an
independent count, its CSV and PNG, and every artefact of a 2-epoch run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from vggkit.config import TrainConfig
from vggkit.errors import CheckpointError, UsageError, VggkitError
from vggkit.evaluation import evaluate, format_evaluation
from vggkit.evaluation import metrics as M
from vggkit.evaluation import plots
from vggkit.training.checkpoint import model_from_checkpoint, save_checkpoint
from vggkit.runfolder import read_metrics
from vggkit.workflow import train

# vgg_compact at the digits' native 8x8: two epochs take seconds.
SUBSET = 300


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluation") / "run"
    train(TrainConfig(model="vgg_compact", dataset="digits", image_size=8, epochs=2,
                      subset=SUBSET, batch_size=50, crop_padding=0, precision="fp32",
                      out=str(out)),
          progress=False)
    return out


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()  # decodes the whole image, not only the header
        return img.size


def independent_counts(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """Test-split labels and predictions computed without vggkit.evaluation: the digits
    rebuilt by hand, normalised by hand, the network run by hand."""
    from vggkit.data import load_dataset

    model, ckpt = model_from_checkpoint(run / "checkpoints" / "last.safetensors")
    data = load_dataset("digits", image_size=ckpt.meta["image_shape"][1], download=False,
                        progress=False)
    x = data.x_test.float() / 255.0
    mean = torch.tensor(ckpt.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(ckpt.meta["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model((x - mean) / std)
    return data.y_test.numpy(), logits.argmax(1).numpy()


# ----------------------------------------------------------------------------- metrics
def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    k, n = 7, 400
    labels = rng.integers(0, k, n)
    labels[labels == 6] = 5  # class 6 never occurs: zero support and zero predictions
    logits = rng.normal(size=(n, k)).astype(np.float32)
    logits[np.arange(n), labels] += 1.0
    logits[:, 6] -= 10
    classes = [f"c{i}" for i in range(k)]
    result = M.classification_metrics(logits, labels, classes)
    predicted = logits.argmax(1)
    cm = skm.confusion_matrix(labels, predicted, labels=range(k))
    assert result["confusion_matrix"] == cm.tolist()
    p, r, f, s = skm.precision_recall_fscore_support(labels, predicted, labels=range(k),
                                                     zero_division=0)
    assert [row["precision"] for row in result["per_class"]] == pytest.approx(p)
    assert [row["recall"] for row in result["per_class"]] == pytest.approx(r)
    assert [row["f1"] for row in result["per_class"]] == pytest.approx(f)
    assert [row["support"] for row in result["per_class"]] == s.tolist()
    macro = skm.precision_recall_fscore_support(labels, predicted, labels=range(k),
                                                average="macro", zero_division=0)
    assert [result["macro"][key] for key in ("precision", "recall", "f1")] == pytest.approx(macro[:3])
    assert result["top1"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert result["top5"] == pytest.approx(skm.top_k_accuracy_score(labels, logits, k=5,
                                                                    labels=range(k)))
    assert result["loss"] == pytest.approx(
        skm.log_loss(labels, M.softmax(logits), labels=range(k)), rel=1e-5)
    assert result["n"] == n
    json.dumps(result)  # JSON-able as it is


def test_most_confused_pairs_are_the_largest_off_diagonal_cells():
    cm = np.array([[5, 3, 0], [7, 2, 1], [0, 3, 9]])
    pairs = M.most_confused(cm, ["a", "b", "c"], n=3)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("b", "a", 7), ("a", "b", 3), ("c", "b", 3)]
    assert M.most_confused(np.eye(3, dtype=int), ["a", "b", "c"]) == []


def test_top5_is_omitted_with_five_classes_or_fewer():
    logits = np.eye(4, dtype=np.float32)
    assert M.classification_metrics(logits, np.arange(4), list("abcd"))["top5"] is None


# ----------------------------------------------------------------------------- plots
@pytest.mark.parametrize("k", [10, 100])
def test_confusion_matrix_png_decodes_at_its_size(tmp_path, k):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, k, 3000)
    predicted = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, k, 3000))
    cm = M.confusion_matrix(labels, predicted, k)
    classes = [f"class_{i}" for i in range(k)]
    path = tmp_path / "cm.png"
    path.write_bytes(plots.confusion_matrix_png(cm, classes, "title",
                                                M.most_confused(cm, classes, 20)))
    assert png_size(path) == plots.confusion_matrix_pixels(k)
    assert plots.confusion_matrix_pixels(10) == (900, 750)  # numbers in the cells
    assert plots.confusion_matrix_pixels(100) == (2050, 1450)  # no numbers, pairs listed


# ----------------------------------------------------------------------------- a real run
def test_training_run_holds_every_artefact(run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "predictions.npz",
                 "checkpoints/last.safetensors", "checkpoints/best.safetensors",
                 "report.html", "report.md", "report_files/curves.png",
                 "report_files/confusion_matrix.png", "report_files/misclassified.png"):
        assert (run / name).is_file(), name
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_seconds"] > 0 and summary["images_per_second"] > 0
    assert png_size(run / "report_files" / "curves.png") == plots.curves_pixels() == (1200, 450)
    assert png_size(run / "report_files" / "confusion_matrix.png") == (900, 750)
    with np.load(run / "predictions.npz") as saved:
        assert saved["logits"].shape == (summary["dataset"]["test"], 10)
        wrong = int((saved["logits"].argmax(1) != saved["labels"]).sum())
    if wrong:
        shown = min(wrong, 32)
        assert png_size(run / "report_files" / "misclassified.png") == plots.grid_pixels(shown)


def test_evaluate_counts_the_test_split_exactly(run):
    result = evaluate(run, precision="fp32", device="cpu")
    summary = json.loads((run / "summary.json").read_text())
    labels, predicted = independent_counts(run)
    assert result["n"] == len(labels) == summary["dataset"]["test"] == 359
    cm = np.array(result["confusion_matrix"])
    assert cm.sum() == len(labels)
    assert (cm == skm.confusion_matrix(labels, predicted, labels=range(10))).all()
    # the same weights, precision and data as the trainer's final test pass
    assert result["top1"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert result["split"] == "test" and result["classes"] == [str(i) for i in range(10)]
    assert result["checkpoint"].endswith("last.safetensors")
    json.dumps(result)

    csv_path, png_path = Path(result["paths"]["csv"]), Path(result["paths"]["png"])
    assert csv_path == run / "confusion_matrix.csv" and png_path == run / "confusion_matrix.png"
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == result["classes"]
    assert [r[0] for r in rows[1:]] == result["classes"]
    assert np.array([[int(v) for v in r[1:]] for r in rows[1:]]).tolist() == cm.tolist()
    assert png_size(png_path) == (900, 750)

    text = format_evaluation(result)
    assert "top-1 accuracy" in text and "macro avg" in text and "confusion matrix" in text
    assert f"{100 * result['top1']:.2f}%" in text and str(csv_path) in text


def test_evaluate_other_splits_get_their_own_files(run, tmp_path):
    result = evaluate(run / "checkpoints" / "best.safetensors", split="train", tta=True,
                      precision="fp32", out_dir=tmp_path / "eval")
    assert result["n"] == SUBSET and result["tta"] is True
    assert np.array(result["confusion_matrix"]).sum() == SUBSET
    assert result["paths"]["csv"] == str(tmp_path / "eval" / "confusion_matrix_train.csv")
    assert Path(result["paths"]["png"]).is_file()


def test_evaluate_a_lone_checkpoint_writes_beside_it(run, tmp_path):
    lone = tmp_path / "model.safetensors"
    lone.write_bytes((run / "checkpoints" / "last.safetensors").read_bytes())
    (tmp_path / "confusion_matrix.csv").write_text("the user's own file")
    result = evaluate(lone, precision="fp32")
    assert result["run"] is None
    assert Path(result["paths"]["csv"]) == tmp_path / "model.confusion_matrix.csv"
    assert (tmp_path / "confusion_matrix.csv").read_text() == "the user's own file"


def test_evaluate_errors_name_the_flag_or_file(run, tmp_path):
    val = evaluate(run, split="val", out_dir=tmp_path / "val")  # held out of train by default
    assert val["n"] == json.loads((run / "summary.json").read_text())["val_size"] > 0
    from vggkit.evaluation.runs import load_split
    from vggkit.training.checkpoint import load_checkpoint

    meta = load_checkpoint(run / "checkpoints" / "last.safetensors").meta
    meta["config"]["val_split"] = 0
    with pytest.raises(UsageError, match="--split val.*--val-split 0"):
        load_split(meta, "val")
    with pytest.raises(UsageError, match="--split"):
        evaluate(run, split="holdout")
    with pytest.raises(CheckpointError, match="nowhere"):
        evaluate(tmp_path / "nowhere")
    with pytest.raises(UsageError, match="--batch-size"):
        evaluate(run, batch_size=0)
    from vggkit.data.testing import write_npz

    write_npz(tmp_path / "other.npz", y_train=np.arange(30) % 3, y_test=np.arange(10) % 3,
              shape=(8, 8))
    with pytest.raises(UsageError, match=r"--dataset npz:.*classes"):
        evaluate(run, dataset=f"npz:{tmp_path / 'other.npz'}")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="--out"):
        evaluate(run, out_dir=tmp_path / "file")
    for error in (UsageError, CheckpointError):
        assert issubclass(error, VggkitError)


def test_the_trained_run_exports_to_onnx(run, tmp_path):
    from vggkit.evaluation.export import export_onnx

    pytest.importorskip("onnxruntime")
    result = export_onnx(run, tmp_path / "digits.onnx")
    assert Path(result["path"]).is_file() and result["max_abs_diff"] < 1e-4
    assert result["input_shape"] == ["batch", 1, 8, 8]


def test_evaluate_the_validation_split_of_a_run_that_held_one_out(run, tmp_path):
    """The split is rebuilt from the checkpoint's own config (--val-split, --seed, --subset)."""
    from vggkit.data import load_dataset
    from vggkit.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors")
    ckpt.meta["config"]["val_split"] = 0.2
    path = save_checkpoint(tmp_path / "held.safetensors", ckpt.model_state, ckpt.meta)
    result = evaluate(path, split="val", precision="fp32")
    expected = load_dataset("digits", image_size=8, subset=SUBSET, val_split=0.2,
                            progress=False).y_val
    assert result["n"] == len(expected) > 0
    assert [r["support"] for r in result["per_class"]] == np.bincount(expected, minlength=10).tolist()
    assert Path(result["paths"]["csv"]).name == "held.confusion_matrix_val.csv"  # a lone file's


# ----------------------------------------------------------------------------- TTA as in training
def test_evaluate_tta_translates_as_the_run_trained_with_it(tmp_path, capsys):
    from vggkit.cli import main

    out = tmp_path / "tta-run"
    summary = train(TrainConfig(model="vgg_compact", dataset="digits", image_size=8, epochs=1,
                                batch_size=50, crop_padding=0, precision="fp32", tta=True,
                                tta_translate=1, report=False, out=str(out)), progress=False)
    assert summary["tta_translate"] == 1
    assert main(["evaluate", str(out), "--tta", "--precision", "fp32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta_translate"] == 1  # the run's own value
    saved = json.loads((out / "summary.json").read_text())
    # The same count of correct images (the summary holds a float32 mean).
    assert round(result["top1"] * result["n"]) == round(saved["test_acc"] * result["n"])
    flip_only = evaluate(out, tta=True, tta_translate=0, precision="fp32")
    assert flip_only["tta_translate"] == 0
    assert flip_only["top1"] != result["top1"]  # so the default's choice is what matched
    with pytest.raises(UsageError, match="--tta-translate: only with --tta"):
        evaluate(out, tta_translate=1)
    with pytest.raises(UsageError, match="--tta-translate must be a non-negative integer"):
        evaluate(out, tta=True, tta_translate=-1)
