"""`vggkit import-keras` (issue 30): the write-ups' Keras networks, built by Keras 3 itself (the
torch backend: no TensorFlow) with random weights and non-trivial BatchNorm statistics, saved as
.keras and as legacy .h5, imported without Keras, and compared: logits within 1e-4, the
write-ups' parameter counts, the registered network each maps onto; a trained Keras model's
accuracy as Keras's own evaluate gives it; malformed files as one clean line."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

from vggkit.cli import main  # noqa: E402
from vggkit.errors import UsageError  # noqa: E402
from vggkit.keras_import import import_keras  # noqa: E402
from vggkit.models.keras import read_keras  # noqa: E402
from vggkit.training.checkpoint import model_from_checkpoint  # noqa: E402


def conv_stack(widths: list, bn: bool = False, pool_dropout: tuple = ()) -> list:
    out, pools = [], 0
    for w in widths:
        if w == "M":
            out.append(layers.MaxPooling2D((2, 2), strides=(2, 2)))
            if pool_dropout:
                out.append(layers.Dropout(pool_dropout[pools]))
            pools += 1
        else:
            out.append(layers.Conv2D(w, (3, 3), padding="same", activation="relu"))
            if bn:
                out.append(layers.BatchNormalization())
    return out


E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
     512, 512, 512, 512, "M"]
D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg19_bn_head() -> keras.Model:
    """The first write-up's network: VGG-19's convolutions, then BatchNorm between dense layers."""
    return keras.Sequential([
        keras.Input((32, 32, 3)), *conv_stack(E), layers.Flatten(),
        layers.BatchNormalization(), layers.Dense(4096, activation="relu"), layers.Dropout(0.5),
        layers.BatchNormalization(), layers.Dense(4096, activation="relu"), layers.Dropout(0.5),
        layers.BatchNormalization(), layers.Dense(1000, activation="relu"),
        layers.BatchNormalization(), layers.Dense(10, activation="softmax")])


def classic_vgg16() -> keras.Model:
    return keras.Sequential([
        keras.Input((32, 32, 3)), *conv_stack(D), layers.Flatten(),
        layers.Dense(4096, activation="relu"), layers.Dropout(0.5),
        layers.Dense(4096, activation="relu"), layers.Dropout(0.5),
        layers.Dense(10, activation="softmax")])


def compact() -> keras.Model:
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        *conv_stack([32, 32, "M", 64, 64, "M", 128, 128, "M"], bn=True,
                    pool_dropout=(0.2, 0.3, 0.4)),
        layers.Flatten(), layers.Dense(1024, activation="relu"), layers.BatchNormalization(),
        layers.Dropout(0.5), layers.Dense(100, activation="relu"), layers.BatchNormalization(),
        layers.Dense(10, activation="softmax")])


def odd_net() -> keras.Model:
    """No registered network: strides, valid padding, explicit padding, an Activation layer,
    a BatchNorm without scale, global pooling, an uneven 'same' stride."""
    return keras.Sequential([
        keras.Input((15, 15, 1)), layers.ZeroPadding2D(((1, 0), (2, 1))),
        layers.Conv2D(8, (3, 3), strides=(2, 2), padding="same"), layers.Activation("tanh"),
        layers.BatchNormalization(scale=False, epsilon=1e-2),
        layers.Conv2D(6, (2, 2), padding="valid", activation="elu"),
        layers.MaxPooling2D((2, 2), padding="same"), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(4), layers.Softmax()])


NETS = {"vgg19-bn-head": (vgg19_bn_head, 43_052_770, ("vgg19", "bn")),
        "classic-vgg16": (classic_vgg16, 33_638_218, ("vgg16", "classic")),
        "compact": (compact, 2_494_982, ("vgg_compact", "compact"))}


def randomise_batchnorm(model: keras.Model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            values = layer.get_weights()
            n = len(values[0])
            new = [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n)][: len(values) - 2]
            new += [rng.normal(0, 0.3, n), rng.uniform(0.5, 2.0, n)]
            layer.set_weights([v.astype(np.float32) for v in new])


def keras_logits(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """The model's pre-softmax output (vggkit gives logits)."""
    last = model.layers[-1]
    if isinstance(last, layers.Softmax):
        return numpy(keras.Model(model.inputs, model.layers[-2].output)(x, training=False))
    if getattr(last, "activation", None) is keras.activations.softmax:
        last.activation = keras.activations.linear
        try:
            return numpy(model(x, training=False))
        finally:
            last.activation = keras.activations.softmax
    return numpy(model(x, training=False))


def numpy(value) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(value))


class Saved(dict):
    """name -> (folder, inputs, Keras's logits); each network built and saved on first use."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str):
        build = odd_net if name == "odd" else NETS[name][0]
        keras.utils.set_random_seed(0)
        model = build()
        randomise_batchnorm(model)
        shape = model.inputs[0].shape[1:]
        x = np.random.default_rng(1).uniform(0, 1, (3, *shape)).astype(np.float32)
        model.save(self.root / f"{name}.keras")
        model.save(self.root / f"{name}.h5")
        self[name] = (self.root, x, keras_logits(model, x))
        return self[name]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    return Saved(tmp_path_factory.mktemp("keras"))


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_the_write_ups_networks_import_exactly_onto_their_registered_twins(saved, tmp_path,
                                                                            name, fmt):
    root, x, expected = saved[name]
    _, params, (model_name, head) = NETS[name]
    r = import_keras(root / f"{name}.{fmt}", tmp_path / "run", dataset="cifar10")
    assert (r["model"], r["head"], r["matched"]) == (model_name, head, True)
    assert r["params"] == params
    model, ckpt = model_from_checkpoint(tmp_path / "run")
    assert type(model).__name__ == "VGG"
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    np.testing.assert_allclose(torch_logits(model, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_any_other_stack_becomes_its_exact_pytorch_equivalent(saved, tmp_path, fmt):
    root, x, expected = saved["odd"]
    (tmp_path / "classes.txt").write_text("n\ne\ns\nw\n")
    r = import_keras(root / f"odd.{fmt}", tmp_path / "run", dataset="folder:/somewhere",
                     classes=str(tmp_path / "classes.txt"))
    assert not r["matched"] and r["model"] == "keras"
    model, _ = model_from_checkpoint(tmp_path / "run")  # rebuilt from the checkpoint's header
    np.testing.assert_allclose(torch_logits(model, x), expected, atol=1e-4, rtol=1e-4)


def test_cli_says_which_network_it_matched_and_keeps_an_existing_run(saved, tmp_path, capsys):
    root, _, _ = saved["compact"]
    assert main(["import-keras", str(root / "compact.keras"), "--dataset", "cifar10",
                 "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "vgg_compact with the compact head" in printed and "2,494,982 parameters" in printed
    assert main(["import-keras", str(root / "compact.keras"), "--dataset", "cifar10",
                 "--out", str(tmp_path / "run")]) == 2  # an existing run is not replaced


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_malformed_files_are_one_clean_line(saved, tmp_path, capsys):
    root, _, _ = saved["compact"]
    good = (root / "compact.keras").read_bytes()
    members = {n: zipfile.ZipFile(root / "compact.keras").read(n)
               for n in ("config.json", "metadata.json", "model.weights.h5")}
    cases = {
        "truncated.h5": ((root / "compact.h5").read_bytes()[:5000], "not a readable Keras HDF5"),
        "extra.keras": (None, "also has evil.py"),
        "lambda.keras": (None, "layer 1 \\(Lambda 'lam'\\) is not supported"),
        "shapes.keras": (None, "the config does not match its weights"),
        "text.keras": (b"hello", "neither a Keras 3 .keras archive nor an HDF5"),
    }
    write_zip(tmp_path / "extra.keras", {**members, "evil.py": b"import os"})
    config = json.loads(members["config.json"])
    lam = {"module": "keras.layers", "class_name": "Lambda",
           "config": {"name": "lam", "function": "gASV... (never run)"}}
    config["config"]["layers"].insert(2, lam)
    write_zip(tmp_path / "lambda.keras", {**members, "config.json": json.dumps(config).encode()})
    config = json.loads(members["config.json"])
    config["config"]["layers"][1]["config"]["filters"] = 48
    write_zip(tmp_path / "shapes.keras", {**members, "config.json": json.dumps(config).encode()})
    for name, (data, message) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(UsageError, match=message):
            import_keras(tmp_path / name, tmp_path / f"run-{name}", dataset="cifar10")
        assert main(["import-keras", str(tmp_path / name), "--dataset", "cifar10", "--out",
                     str(tmp_path / f"cli-{name}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vggkit: error: "), err
    assert good  # the untouched archive still reads
    assert read_keras(root / "compact.keras").input_shape == (32, 32, 3)


def test_a_trained_keras_model_scores_in_vggkit_as_in_keras(tmp_path):
    """Keras fits a small net on the two-class stripes (its own `fit`), then its `evaluate` and
    vggkit's evaluate of the imported run agree on the same test images."""
    from vggkit.data import testing as T
    from vggkit.evaluation import evaluate

    T.write_cifar(tmp_path / "data", "cifar10", stripes=True, n_per_batch=40, n_test=60)
    from vggkit.data import load_dataset

    data = load_dataset("cifar10", data_dir=str(tmp_path / "data"), download=False, val_split=0)
    x_train = data.x_train.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    x_test = data.x_test.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)), layers.Conv2D(8, 3, padding="same", activation="relu"),
        layers.BatchNormalization(), layers.MaxPooling2D(), layers.Flatten(),
        layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, data.y_train.numpy(), epochs=4, batch_size=20, verbose=0)
    _, keras_acc = model.evaluate(x_test, data.y_test.numpy(), verbose=0)
    model.save(tmp_path / "trained.keras")
    import_keras(tmp_path / "trained.keras", tmp_path / "run", dataset="cifar10")
    ours = evaluate(tmp_path / "run", data_dir=str(tmp_path / "data"))
    assert keras_acc > 0.7  # it learned the stripes
    assert ours["top1"] == pytest.approx(keras_acc, abs=1e-6)  # Keras reports a float32


@pytest.mark.parametrize("name", ["compact", "vgg19-bn-head"])
def test_a_round_trip_vggkit_keras_vggkit_is_exact(saved, tmp_path, name):
    """Imported -> exported with `vggkit export --keras` -> imported again: the same registered
    network and the same weights, bit for bit; Keras's logits on the exported file equal ours."""
    root, x, expected = saved[name]
    import_keras(root / f"{name}.keras", tmp_path / "first", dataset="cifar10")
    assert main(["export", str(tmp_path / "first"), "--keras", str(tmp_path / "back.keras")]) == 0
    back = keras.saving.load_model(tmp_path / "back.keras")
    np.testing.assert_allclose(keras_logits(back, x), expected, atol=1e-4, rtol=1e-4)
    r = import_keras(tmp_path / "back.keras", tmp_path / "second", dataset="cifar10")
    assert r["matched"] and (r["model"], r["head"]) == NETS[name][2]
    a, _ = model_from_checkpoint(tmp_path / "first")
    b, _ = model_from_checkpoint(tmp_path / "second")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert [(m.eps, m.momentum) for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)] == \
        [(m.eps, m.momentum) for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_a_trained_vggkit_run_exports_to_keras_and_predicts_the_same(tmp_path):
    from vggkit.config import TrainConfig
    from vggkit.workflow import train

    train(TrainConfig(model="vgg11_bn", dataset="digits", epochs=1, batch_size=64,
                      precision="fp32", report=False, out=str(tmp_path / "run"), threads=1),
          progress=False)
    assert main(["export", str(tmp_path / "run"), "--keras", str(tmp_path / "m.keras")]) == 0
    assert main(["export", str(tmp_path / "run"), "--keras", str(tmp_path / "m.keras")]) == 2
    assert main(["export", str(tmp_path / "run")]) == 2  # neither --onnx nor --keras
    back = keras.saving.load_model(tmp_path / "m.keras")
    probs = numpy(back(np.zeros((1, 32, 32, 1), np.float32), training=False))
    assert probs.shape == (1, 10) and abs(probs.sum() - 1) < 1e-5  # a softmax at the end


def test_an_imported_run_trains_on_with_init_from(saved, tmp_path):
    from vggkit.config import TrainConfig
    from vggkit.data import testing as T
    from vggkit.workflow import train

    root, _, _ = saved["compact"]
    import_keras(root / "compact.keras", tmp_path / "imported", dataset="cifar10")
    T.write_cifar(tmp_path / "data", "cifar10", n_per_batch=8, n_test=10)
    s = train(TrainConfig(model="vgg_compact", dataset="cifar10", data_dir=str(tmp_path / "data"),
                          download=False, init_from=str(tmp_path / "imported"), epochs=1,
                          batch_size=16, normalize="unit", precision="fp32", report=False,
                          out=str(tmp_path / "run"), threads=1, lr=1e-9, schedule="constant"),
              progress=False)
    assert s["epochs_completed"] == 1
    start, _ = model_from_checkpoint(tmp_path / "imported")
    after, _ = model_from_checkpoint(tmp_path / "run")
    # at a rate of 1e-9 one epoch leaves the imported convolutions where they were
    torch.testing.assert_close(after.features[0].weight, start.features[0].weight, atol=1e-6,
                               rtol=0)


def test_a_functional_chain_imports_and_a_branching_model_is_refused(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = layers.Flatten()(layers.MaxPooling2D()(x))
    chain = keras.Model(inputs, layers.Dense(3, activation="softmax")(x))
    chain.save(tmp_path / "chain.keras")
    (tmp_path / "c.txt").write_text("a\nb\nc\n")
    r = import_keras(tmp_path / "chain.keras", tmp_path / "run", dataset="folder:x",
                     classes=str(tmp_path / "c.txt"))
    sample = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    model, _ = model_from_checkpoint(tmp_path / "run")
    np.testing.assert_allclose(torch_logits(model, sample), keras_logits(chain, sample),
                               atol=1e-5)
    assert r["model"] == "keras"
    a = layers.Conv2D(4, 3, padding="same")(inputs)
    b = layers.Conv2D(4, 3, padding="same")(inputs)
    branching = keras.Model(inputs, layers.Dense(3)(layers.Flatten()(layers.Add()([a, b]))))
    branching.save(tmp_path / "branch.keras")
    with pytest.raises(UsageError, match="single chains of layers|not supported"):
        import_keras(tmp_path / "branch.keras", tmp_path / "run2", dataset="folder:x",
                     classes=str(tmp_path / "c.txt"))
