"""Issue 33's everyday features: --time-budget (with a mocked clock), unbalanced classes
(--class-weights, --balanced-sampling, the report's counts and recall, the health warning),
--grad-accum, the notebook result (history, plot, inline report, tqdm.auto) and --mlflow
against a file store in a temporary folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from interrupt import interrupted_run
from vggkit.cli import main
from vggkit.config import TrainConfig, parse_duration, resolve_config
from vggkit.data import testing as T
from vggkit.data.loader import Loader, balanced_order
from vggkit.errors import UsageError
from vggkit.models import create_model
from vggkit.runfolder import read_metrics
from vggkit.training import budget as B
from vggkit.training import engine as E
from vggkit.training.balance import class_weights, mean_recall
from vggkit.training.trainer import Trainer
from vggkit.workflow import train

TINY = dict(model="vgg_compact", dataset="digits", image_size=8, batch_size=32, lr=0.05,
            report=False, precision="fp32", threads=1)
COUNTS = (120, 20, 20, 20)  # 6x: above the health check's 5x


def tiny(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **kw})


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory) -> Path:
    """Four corner classes, 120/20/20/20 training images, 10 test images each."""
    path = tmp_path_factory.mktemp("unbalanced") / "corners.npz"
    y_train = np.concatenate([np.full(n, c) for c, n in enumerate(COUNTS)]).astype(np.int64)
    y_test = np.repeat(np.arange(4), 10).astype(np.int64)
    np.savez(path, x_train=T.corner_images(y_train, size=16), y_train=y_train,
             x_test=T.corner_images(y_test, size=16, seed=1), y_test=y_test,
             classes=np.array(T.CORNER_CLASSES))
    return path


# ----------------------------------------------------------------------------- time budget
class FakeClock:
    """Every reading is ``tick`` seconds after the one before."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_durations_parse_and_bad_ones_name_the_flag():
    assert parse_duration("90m") == parse_duration("1.5h") == parse_duration("1h30m") == 5400
    assert parse_duration("600s") == 600
    for bad in ("5400", "90 minutes please", "0m", ""):
        with pytest.raises(UsageError, match="--time-budget"):
            parse_duration(bad)
    assert main(["train", "--time-budget", "5400", "--out", "/nonexistent/x"]) == 2


def test_the_budget_sizes_the_run_and_its_schedule(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="vggkit")
    tick = 0.4  # every timed step, evaluation batch or checkpoint write
    monkeypatch.setattr(B, "clock", FakeClock(tick))
    config = tiny(tmp_path, time_budget="5m", schedule="onecycle", report=True)
    summary = train(config, progress=False)
    plan = summary["time_budget"]
    # 32 images a step; one evaluation batch of 512 holds all the validation images
    assert plan["images_per_second"] == pytest.approx(32 / tick)
    n_train, n_val = summary["dataset"]["train"], summary["dataset"]["val"]
    epoch = n_train * tick / 32 + tick + 1.5 * tick
    assert plan["epoch_seconds"] == pytest.approx(epoch)
    assert plan["final_seconds"] == pytest.approx(summary["dataset"]["test"] * tick / n_val
                                                  + B.REPORT_SECONDS)
    # whole epochs, then the steps of one more that fit beside its validation and checkpoints
    room = B.SAFETY * 300 - plan["setup_seconds"] - plan["final_seconds"]
    whole = math.floor(room / epoch)
    steps, fixed = plan["epoch_steps"], tick + 1.5 * tick
    cut = math.floor((room - whole * epoch - fixed) / ((epoch - fixed) / steps))
    assert 1 <= cut < steps  # this budget leaves room for part of an epoch
    assert (plan["epochs"], plan["last_epoch_steps"]) == (whole + 1, cut)
    assert summary["epochs_completed"] == whole + 1 > 5
    assert plan["planned_seconds"] == pytest.approx(
        plan["setup_seconds"] + whole * epoch + fixed + cut * (epoch - fixed) / steps
        + plan["final_seconds"]) and plan["planned_seconds"] <= B.SAFETY * 300
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (written["epochs"], written["time_budget"]) == (whole + 1, "5m")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["train_samples"] for r in rows] == [n_train] * whole + [cut * 32]
    assert rows[-1]["lr"] < 0.02 * config.lr  # the one-cycle ran to its end, in the cut epoch
    assert f"{whole} epochs and {cut} of the {steps} steps of one more" in caplog.text
    assert "time budget" in (tmp_path / "run" / "report.md").read_text()


def test_a_resumed_budget_run_keeps_its_plan_and_is_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "clock", FakeClock(0.5))
    straight = train(tiny(tmp_path, "straight", time_budget="130s"), progress=False)
    epochs = straight["time_budget"]["epochs"]
    assert 2 <= epochs < 12
    interrupted_run(monkeypatch, tiny(tmp_path, "split", time_budget="130s"),
                    B.WARMUP_STEPS + B.TIMED_STEPS + 7)  # the timing steps, then 7
    monkeypatch.setattr(B, "make_plan", lambda *a: pytest.fail("a resume planned again"))
    resumed = train(TrainConfig(resume=str(tmp_path / "split")), progress=False)
    assert resumed["epochs_completed"] == epochs
    assert resumed["weights_digest"] == straight["weights_digest"]
    assert resumed["time_budget"]["epochs"] == epochs and resumed["time_budget"]["resumed"]
    # the last epoch was cut short, and the resume built its schedule for the same steps
    assert resumed["time_budget"]["last_epoch_steps"] == straight["time_budget"]["last_epoch_steps"] > 0
    with pytest.raises(UsageError, match="--time-budget 5m: the run was planned once for 130s"):
        train(TrainConfig(resume=str(tmp_path / "split"), time_budget="5m"), progress=False)


def test_a_budget_too_small_for_one_epoch_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "clock", FakeClock(5.0))
    with pytest.raises(UsageError, match=r"--time-budget 30s: one epoch takes .* not one step"):
        train(tiny(tmp_path, time_budget="30s"), progress=False)


def test_the_plan_cuts_the_last_epoch_to_the_steps_that_fit():
    # an epoch of 30 s: 20 steps of 1 s, then 10 s of validation and checkpoints
    def plan(room: float) -> tuple[int, int]:
        return B.plan_epochs(room / B.SAFETY, setup=0.0, final=0.0, epoch=30.0, fixed=10.0,
                             steps=20)

    assert plan(100) == (3, 0)  # the 10 s left are the fourth epoch's evaluation alone
    assert plan(105.5) == (4, 5)  # 5.5 s beside it: 5 steps of a fourth epoch
    assert plan(119.5) == (4, 19)
    assert plan(120.5) == (4, 0)  # four whole epochs
    assert plan(25) == (1, 15)  # less than an epoch: part of the first
    assert plan(9) == (0, 0)  # not one step: make_plan refuses it


# ----------------------------------------------------------------------------- unbalanced
def test_auto_class_weights_are_sklearns_balanced_ones(tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.concatenate([np.full(n, c) for c, n in enumerate(COUNTS)])
    ours = class_weights("auto", list(COUNTS), ["a", "b", "c", "d"])
    theirs = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6)
    good = tmp_path / "w.yaml"
    good.write_text("a: 1\nb: 6\n2: 6\nd: 6.5\n")  # by name or by index, as Keras's dict
    assert class_weights(str(good), list(COUNTS), ["a", "b", "c", "d"]).tolist() == [1, 6, 6, 6.5]
    for text, message in (("a: 1\nb: 2\nc: 3\n", "class 'd' .* has no weight"),
                          ("a: 1\nb: 2\nc: 3\nd: 4\nemu: 1\n", "'emu' is not a class"),
                          ("a: 1\nb: 2\nc: 3\nd: -4\n", "positive number"),
                          ("[1, 2]", "mapping")):
        good.write_text(text)
        with pytest.raises(UsageError, match=message):
            class_weights(str(good), list(COUNTS), ["a", "b", "c", "d"])
    with pytest.raises(UsageError, match="no such file"):
        class_weights(str(tmp_path / "none.yaml"), list(COUNTS), list("abcd"))


def test_balanced_sampling_draws_every_class_equally_and_shards(unbalanced):
    labels = torch.tensor(np.load(unbalanced)["y_train"])
    images = torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8)
    kw = dict(shuffle=True, seed=3, mean=[0.0], std=[1.0], balanced=True)
    loader = Loader(images, labels, 16, **kw)
    order = loader.indices(0)
    assert len(order) == len(labels)  # an epoch keeps its number of images
    assert torch.bincount(labels[order]).tolist() == [45, 45, 45, 45]
    small = torch.bincount(order[labels[order] == 1], minlength=len(labels))[labels == 1]
    assert small.min() >= 2 and small.max() <= 3  # 45 draws of 20 images: each 2 or 3 times
    assert len(set(order[labels[order] == 0].tolist())) == 45  # the large class: no repeats
    assert torch.equal(order, Loader(images, labels, 16, **kw).indices(0))  # seeded
    assert not torch.equal(order, loader.indices(1))
    shards = [Loader(images, labels, 8, rank=r, world_size=2, **kw).indices(0) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == sorted(order.tolist())
    gen = torch.Generator().manual_seed(0)
    two = balanced_order([torch.arange(3), torch.arange(3, 10)], 7, gen)  # 7 = 3 + 4
    assert sorted(torch.bincount((two >= 3).long()).tolist()) == [3, 4]


def test_unbalanced_classes_warn_and_the_report_shows_counts_and_recall(unbalanced, tmp_path):
    plain = train(tiny(tmp_path, "plain", dataset=f"npz:{unbalanced}", image_size=16,
                       epochs=1, report=True), progress=False)
    assert any("unbalanced classes" in h and "--class-weights auto" in h for h in plain["health"])
    counts = plain["class_counts"]["train"]
    assert sum(counts) == plain["dataset"]["train"] and counts[0] > 5 * counts[1]
    report = (tmp_path / "plain" / "report.md").read_text()
    assert "balanced accuracy (mean per-class recall)" in report
    assert "training images" in report
    weighted = Trainer(tiny(tmp_path, "weighted", dataset=f"npz:{unbalanced}", image_size=16,
                            class_weights="auto"), None, progress=False)
    counts = weighted.class_counts
    expected = torch.tensor([sum(counts) / (4 * c) for c in counts])
    torch.testing.assert_close(weighted.step.loss_fn.weight.cpu(), expected)
    assert not any(f.code == "unbalanced" for f in weighted.health.findings)


def test_mean_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    labels = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.zeros(10, 2)
    logits[:, 0] = 1  # always class 0: 80% accurate, 50% balanced
    assert mean_recall(logits, labels) == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(1))) == 0.5


# ----------------------------------------------------------------------------- grad-accum
def one_step(accumulate: int, weight=None, smoothing: float = 0.1):
    torch.manual_seed(0)
    model = create_model("vgg11", num_classes=10, in_channels=3, input_size=32, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)
    engine = E.make_engine("cpu", "fp32", False, False, None)
    step = E.TrainStep(model, opt, loss_fn, engine, accumulate)
    x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % 10
    loss, correct = step(x, y)
    return model, loss, correct


@pytest.mark.parametrize("weighted", [False, True])
def test_accumulated_chunks_equal_the_whole_batch(weighted):
    weight = torch.linspace(0.5, 2.0, 10) if weighted else None
    whole, loss1, correct1 = one_step(1, weight)
    chunked, loss4, correct4 = one_step(4, weight)
    torch.testing.assert_close(loss4, loss1, rtol=1e-5, atol=1e-6)
    assert correct1 == correct4
    for a, b in zip(whole.parameters(), chunked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_inner_chunks_skip_the_gradient_all_reduce(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(
            create_model("vgg_compact", num_classes=10, in_channels=3, input_size=8))
        reductions = []

        def hook(state, bucket):
            reductions.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, hook)
        engine = E.make_engine("cpu", "fp32", False, False, None)
        step = E.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           nn.CrossEntropyLoss(), engine, accumulate=4)
        counts = []
        for accumulate in (1, 4, 1):  # the first step settles DDP's buckets
            step.accumulate, before = accumulate, len(reductions)
            step(torch.randn(16, 3, 8, 8), torch.arange(16) % 10)
            counts.append(len(reductions) - before)
        assert counts[1] == counts[2] > 0  # 4 chunks, one all-reduce pass
    finally:
        dist.destroy_process_group()


def test_grad_accum_trains_and_resumes_exactly(tmp_path, monkeypatch):
    straight = train(tiny(tmp_path, "straight", epochs=2, grad_accum=4), progress=False)
    interrupted_run(monkeypatch, tiny(tmp_path, "split", epochs=2, grad_accum=4), 5)
    resumed = train(TrainConfig(resume=str(tmp_path / "split")), progress=False)
    assert resumed["weights_digest"] == straight["weights_digest"]
    assert straight["test_acc"] > 0.3  # digits: 10 classes, chance 10%
    with pytest.raises(UsageError, match="--grad-accum must be a positive integer"):
        resolve_config({"grad_accum": "0"})
    with pytest.raises(UsageError, match="--grad-accum must not exceed --batch-size 8"):
        resolve_config({"batch_size": "8", "grad_accum": "9"})


# ----------------------------------------------------------------------------- notebooks
def test_the_result_is_a_dict_with_a_history_a_plot_and_an_inline_report(tmp_path):
    result = train(tiny(tmp_path, epochs=3, report=True), progress=False)
    assert json.loads(json.dumps(result))["test_acc"] == result["test_acc"] > 0.5
    assert result.history.epoch == [1, 2, 3]
    assert len(result.history["train_loss"]) == len(result.history["val_acc"]) == 3
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    figure = result.history.plot()
    assert len(figure.axes) == 2 and figure.axes[0].get_lines()
    shown = result.report()
    html = shown._repr_html_() if hasattr(shown, "_repr_html_") else shown.data
    assert "<iframe srcdoc=" in html and "test accuracy" in html


def test_progress_in_a_notebook_is_one_tqdm_auto_bar_per_epoch(monkeypatch):
    import tqdm.auto

    from vggkit.training import progress as P

    made = []

    class Bar:
        def __init__(self, **kw):
            made.append(kw)

        update = set_postfix = close = lambda self, *a, **k: None

    monkeypatch.setattr(P, "in_notebook", lambda: True)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    bar = P.Progress(10, 0, 1, 3, 32, enabled=True, log_every=30)
    bar.show(5, 1.0, 0.5)
    bar.close()
    assert len(made) == 1 and made[0]["leave"] is True and made[0]["total"] == 10
    assert bar.log_every == 0.0  # no log lines beside the bar


# ----------------------------------------------------------------------------- mlflow
def test_mlflow_logs_params_metrics_and_the_report_and_a_resume_continues(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    train(tiny(tmp_path, epochs=2, report=True, mlflow=store, schedule="constant"),
          progress=False)
    record = json.loads((tmp_path / "run" / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "vgg_compact" and run.data.params["epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test_acc"])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.yaml", "metrics.jsonl", "report.html"} <= files
    train(TrainConfig(resume=str(tmp_path / "run"), epochs=3), progress=False)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # the same MLflow run went on
    assert len(client.search_runs([run.info.experiment_id])) == 1
