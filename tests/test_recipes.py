"""Named recipes: every one loads, validates, is overridable by flags, and trains for one epoch
on a small subset of generated files in its dataset's official format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vggkit.cli import main
from vggkit.config import FIELDS, resolve_config
from vggkit.data import testing as T
from vggkit.errors import UsageError
from vggkit.models.registry import create_model, get_architecture
from vggkit.recipes import list_recipes, load_recipe
from vggkit.workflow import train

RECIPES = sorted(list_recipes())
TRAIN_SUBSET = 20  # images: VGG-16 with the 4096 head is ~34M parameters


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Every official-format dataset a recipe can name, tiny, in one data folder."""
    root = tmp_path_factory.mktemp("data")
    T.write_cifar(root, "cifar10")  # cifar-10-python.tar.gz: 100 train, 20 test
    T.write_cifar(root, "cifar100")  # cifar-100-python.tar.gz: 40 train, 20 test
    T.write_mnist(root / "mnist", n_train=100, n_test=20)  # the four IDX .gz files
    T.write_mnist(root / "fashion-mnist", n_train=100, n_test=20, seed=1)
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


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_one_epoch_on_its_dataset_format(name, data_dir, tmp_path):
    base = resolve_config(recipe=name)
    side = smallest_side(base.model, base.head)
    overrides = dict(
        data_dir=str(data_dir), download=False, epochs=1,
        subset=TRAIN_SUBSET if base.dataset != "cifar100" else None,  # 40 images, 100 classes
        image_size=side,
        batch_size=10, eval_batch_size=20, threads=1, report=False,
        out=str(tmp_path / "run"),
    )
    if base.val_split:
        overrides["val_split"] = 0.2  # a held-out set the tiny data can stratify
    config = resolve_config({k: v for k, v in overrides.items() if v is not None}, recipe=name)
    if base.init_from:  # a recipe may start from weights; none is shipped with one
        config = config.replace(init_from=None)
    summary = train(config, progress=False)
    assert summary["epochs_completed"] == 1
    assert 0.0 <= summary["test_acc"] <= 1.0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["test_acc"] == summary["test_acc"]
    assert saved["model"]["name"] == base.model
    assert saved["dataset"]["name"] == base.dataset
    # the recipe's own choices reached the run
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for key in ("optimizer", "schedule", "lr", "flip", "crop_padding", "label_smoothing",
                "normalize", "head", "dropout"):
        assert written[key] == getattr(base, key), key
