"""Named recipes: every one loads, validates, is overridable by flags and learns two classes of
generated images in its dataset's official format: stripes, vertical or horizontal, for the
recipes with BatchNorm or a small network; dark or bright images for the plain VGG-11/16 ones,
which stay at chance on stripes for longer than a test can wait."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from vggkit.cli import main
from vggkit.config import FIELDS, TrainConfig, resolve_config
from vggkit.data import testing as T
from vggkit.errors import UsageError
from vggkit.models.registry import create_model, get_architecture
from vggkit.recipes import list_recipes, load_recipe
from vggkit.runfolder import read_metrics
from vggkit.workflow import train

RECIPES = sorted(list_recipes())
N_TRAIN, N_TEST = 80, 20  # striped images of two classes, in every official format
BATCH = 10
LEARNED = 0.75  # test accuracy a learning recipe passes (chance: 0.5; 15 of 20 images)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Every official-format dataset a recipe can name, tiny and learnable, in one folder."""
    root = tmp_path_factory.mktemp("data")
    T.write_cifar(root, "cifar10", stripes=True, n_per_batch=N_TRAIN // 5, n_test=N_TEST)
    T.write_cifar(root, "cifar100", stripes=True, n_train=N_TRAIN, n_test=N_TEST)
    T.write_mnist(root / "mnist", stripes=True, n_train=N_TRAIN, n_test=N_TEST)
    T.write_mnist(root / "fashion-mnist", stripes=True, n_train=N_TRAIN, n_test=N_TEST,
                  seed=1)
    return root


def smallest_side(model: str, head: str | None) -> int:
    """The side its poolings divide down to 1 (32 for VGG, 8 for the compact net) if the model
    takes it, else 32, the CIFAR size every recipe's network is built for."""
    side = 2 ** get_architecture(model).num_pools
    if side < 32:
        try:
            create_model(model, num_classes=10, in_channels=3, input_size=side, head=head)
        except UsageError:
            return 32
    return side


def test_recipes_are_listed_with_descriptions_and_valid_keys(capsys):
    assert len(RECIPES) >= 11
    for name, description in list_recipes().items():
        assert description, f"{name}: the first line must be a '# description' comment"
        values = load_recipe(name)
        assert set(values) <= set(FIELDS), f"{name}: unknown keys {set(values) - set(FIELDS)}"
        config = resolve_config(recipe=name)  # types and values validate
        assert config.dataset == values["dataset"]
    assert main(["recipes"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in RECIPES)
    with pytest.raises(UsageError, match="recipe"):
        resolve_config(recipe="no-such-recipe")


@pytest.mark.parametrize("name", RECIPES)
def test_every_value_is_overridable_by_a_flag(name):
    values = load_recipe(name)
    flags = {"epochs": "3", "batch_size": "7", "dataset": "folder:/x.zip", "lr": "0.123"}
    config = resolve_config(flags, recipe=name)
    assert (config.epochs, config.batch_size, config.dataset, config.lr) == (
        3, 7, "folder:/x.zip", 0.123)
    # keys the flags leave alone keep the recipe's values
    untouched = {k: v for k, v in values.items() if k not in flags}
    fresh = resolve_config(recipe=name)
    for key in untouched:
        assert getattr(config, key) == getattr(fresh, key), key


def test_recipes_say_what_they_do():
    """The published experiments' defining choices, pinned (regressions here change results)."""
    r = {n: resolve_config(recipe=n) for n in RECIPES}
    no_aug = [n for n, d in list_recipes().items()
              if "no augmentation" in d or "without augmentation" in d]
    assert {"vgg16-cifar10-classic", "compact-cifar10", "vgg16-mnist64-small"} <= set(no_aug)
    for n in no_aug + ["vgg19-bn-head-cifar10", "vgg16-mnist64-small-adam"]:
        c = r[n]
        assert (c.crop_padding, c.flip, c.cutout) == (0, False, 0), n
    c = r["vgg16-cifar10-classic"]
    assert (c.model, c.head, c.optimizer, c.lr, c.momentum, c.nesterov, c.schedule, c.decay,
            c.label_smoothing) == ("vgg16", "classic", "sgd", 0.01, 0.9, True, "time-decay",
                                   1e-6, 0.0)
    assert (r["vgg19-bn-head-cifar10"].head, r["vgg19-bn-head-cifar10"].normalize) == ("bn",
                                                                                     "unit")
    # the recipe that trains the same network: the architecture unchanged, the rate cut 5x
    faithful, strong = r["vgg19-bn-head-cifar10"], r["vgg19-bn-head-strong-cifar10"]
    for key in ("model", "head", "dropout", "normalize", "dataset", "optimizer", "nesterov"):
        assert getattr(strong, key) == getattr(faithful, key), key
    assert strong.lr == faithful.lr / 5 and strong.schedule == "onecycle"
    assert strong.flip and strong.crop_padding == 4 and strong.weight_decay > 0
    assert strong.precise_bn > 0 and not faithful.precise_bn
    # the rates the bn-gain finding names: the head keeps the faithful rate, the convolutions
    # behind its BatchNorm step at the strong recipe's
    split = r["vgg19-bn-head-split-cifar10"]
    for key in ("model", "head", "dropout", "normalize", "dataset", "optimizer", "nesterov"):
        assert getattr(split, key) == getattr(faithful, key), key
    assert split.lr == faithful.lr and split.lr * split.features_lr_scale == strong.lr
    assert split.precise_bn > 0 and split.schedule == "onecycle" and split.epochs > strong.epochs
    c = r["vgg16-gap-cifar100"]
    assert (c.head, c.dataset, c.epochs, c.flip) == ("gap", "cifar100", 12, True)
    assert c.crop_padding > 0 and c.weight_decay > 0
    for n in ("vgg16-mnist64-small", "vgg16-mnist64-small-adam"):
        c = r[n]
        assert (c.image_size, c.channels, c.dropout, c.subset) == (64, 1, 0.5, 1000)
    assert (r["vgg16-mnist64-small"].optimizer, r["vgg16-mnist64-small-adam"].optimizer) == (
        "sgd", "adam")
    assert r["compact-cifar10-aug"].flip and r["compact-cifar10-aug"].crop_padding > 0
    for n in ("vgg16-bn-strong-cifar10", "vgg16-bn-strong-cifar100"):
        c = r[n]
        assert c.model == "vgg16_bn" and c.flip and c.label_smoothing > 0
        assert c.schedule in ("cosine", "onecycle") and c.precision == "auto"
        assert c.warmup_epochs < c.epochs
    c = r["vgg-paper"]
    assert (c.batch_size, c.momentum, c.weight_decay, c.dropout, c.lr, c.schedule, c.gamma) == (
        256, 0.9, 5e-4, 0.5, 0.01, "plateau", 0.1)
    assert c.val_split > 0  # the plateau is on validation accuracy, not on the test set
    assert r["fashion-mnist-vgg"].dataset == "fashion-mnist"


def recipe_run(name: str, data_dir: Path, out: Path, **changes) -> tuple[TrainConfig, dict]:
    """The recipe on the tiny data: its own choices, at the smallest side its network takes,
    batch 10, every training image unless ``changes`` (applied last) say otherwise."""
    base = resolve_config(recipe=name)
    overrides = dict(
        data_dir=str(data_dir), download=False, image_size=smallest_side(base.model, base.head),
        batch_size=BATCH, eval_batch_size=N_TEST, threads=1, report=False, out=str(out),
    )
    if base.val_split:
        overrides["val_split"] = 0.2  # a held-out set the tiny data can stratify
    config = resolve_config(overrides, recipe=name)
    # every training image (the MNIST-64 recipes' 1,000-image subset is more than there is);
    # a recipe may start from weights, and none is shipped with one
    config = config.replace(**{"subset": None, "init_from": None, **changes})
    return base, train(config, progress=False)


def check_run(name: str, base: TrainConfig, summary: dict, folder: Path) -> None:
    """Every epoch saw every training image once, the losses are finite, and the recipe's own
    choices reached the run folder."""
    for epoch in read_metrics(folder / "metrics.jsonl"):
        assert epoch["train_samples"] == summary["dataset"]["train"], name
        assert math.isfinite(epoch["train_loss"]), name
    assert math.isfinite(summary["test_loss"]), name
    saved = json.loads((folder / "summary.json").read_text())
    assert saved["test_acc"] == summary["test_acc"]
    assert saved["model"]["name"] == base.model
    assert saved["dataset"]["name"] == base.dataset
    written = yaml.safe_load((folder / "config.yaml").read_text())
    for key in ("optimizer", "schedule", "flip", "crop_padding", "label_smoothing",
                "normalize", "head", "dropout"):
        assert written[key] == getattr(base, key), key


# Recipes that learn the two classes in seconds, and the epochs (of 8 steps) each is given:
# the small networks, and the VGG-BN recipes (BatchNorm lets them leave chance at once;
# measured 90-100% after 3 epochs, the GAP head 80-90% after 3-4 and 100% after 6); VGG-19 with
# the BatchNorm dense head (50% after 4 epochs, 100% after 6 and 10).
LEARN_EPOCHS = {n: 6 for n in RECIPES
                if resolve_config(recipe=n).model in ("vgg_compact", "vgg_airbench")}
LEARN_EPOCHS |= {n: 3 for n in RECIPES if resolve_config(recipe=n).model.endswith("_bn")}
LEARN_EPOCHS["vgg16-gap-cifar100"] = 6
LEARN_EPOCHS["vgg19-bn-head-cifar10"] = 10

# The plain (BatchNorm-free) VGG-11/16 recipes stay at chance on stripes for 80 steps and more,
# so they learn dark from bright images instead, at their own rate. Epochs measured on the
# Zen 5 (fp32, one thread; docs/reliability.md): vgg-paper 100% after 8 (three seeds), 50%
# after 4; classic 100% after 8 and 12 (seed 0), 50% after 4; MNIST-64 SGD 50% after 12, 100%
# after 16 and 20 (four seeds); MNIST-64 Adam 50% after 4 and 6 (seed 0), 100% after 6 (seeds
# 1, 2), 8, 10 and 12.
# Cut on 2026-12-06 to keep the suite under 10 minutes: classic 12 -> 10 and MNIST-64 SGD
# 20 -> 16, still at or above the lengths measured to reach 100%.
PLAIN_EPOCHS = {"vgg-paper": 8, "vgg16-cifar10-classic": 10, "vgg16-mnist64-small": 16,
                "vgg16-mnist64-small-adam": 10}
# VGG-19 with the BatchNorm head at its strong recipe's own rate (0.002): at the batch-scaled
# rate (0.00016) it stayed at chance on stripes for 10 epochs.
PLAIN_EPOCHS["vgg19-bn-head-strong-cifar10"] = 10
# the split recipe, its head 5x faster: it passed (>= 75%) already at 3 epochs (Zen 4, fp32)
PLAIN_EPOCHS["vgg19-bn-head-split-cifar10"] = 5


@pytest.fixture(scope="module")
def bright_dir(tmp_path_factory) -> Path:
    """The plain recipes' datasets, dark (class 0) or bright (class 1) images."""
    root = tmp_path_factory.mktemp("bright")
    T.write_cifar(root, "cifar10", stripes="brightness", n_per_batch=N_TRAIN // 5, n_test=N_TEST)
    T.write_mnist(root / "mnist", stripes="brightness", n_train=N_TRAIN, n_test=N_TEST)
    return root


def test_every_recipe_has_a_learning_test():
    assert set(LEARN_EPOCHS) | set(PLAIN_EPOCHS) == set(RECIPES)
    assert not set(LEARN_EPOCHS) & set(PLAIN_EPOCHS)


@pytest.mark.parametrize("name", sorted(PLAIN_EPOCHS))
def test_plain_recipes_learn_dark_from_bright(name, bright_dir, tmp_path):
    """Batch 10 at the recipe's own rate, fp32: the plain VGGs need their full rate to leave
    chance within a few dozen steps."""
    base = resolve_config(recipe=name)
    epochs = PLAIN_EPOCHS[name]
    _, summary = recipe_run(name, bright_dir, tmp_path / "run", epochs=epochs, precision="fp32")
    assert summary["epochs_completed"] == epochs
    check_run(name, base, summary, tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == base.lr
    assert summary["test_acc"] >= LEARNED, f"{name}: {summary['test_acc']:.0%} on two classes"


@pytest.mark.parametrize("name", sorted(LEARN_EPOCHS))
def test_recipes_learn_the_two_classes(name, data_dir, tmp_path):
    """Batch 10. SGD's rate is scaled to the smaller batch (the linear scaling rule: the
    recipe's rate per image); Adam's is not, as its steps do not grow with the batch. fp32,
    so the margin does not depend on the CPU drawn: in bf16 on an AMX Xeon the 3-epoch
    fashion-mnist-vgg run reached only 70% (the bf16 path's accuracy has its own test)."""
    base = resolve_config(recipe=name)
    lr = base.lr * BATCH / base.batch_size if base.optimizer == "sgd" else base.lr
    _, summary = recipe_run(name, data_dir, tmp_path / "run", epochs=LEARN_EPOCHS[name], lr=lr,
                            precision="fp32")
    assert summary["epochs_completed"] == LEARN_EPOCHS[name]
    check_run(name, base, summary, tmp_path / "run")
    assert summary["test_acc"] >= LEARNED, f"{name}: {summary['test_acc']:.0%} on two classes"
