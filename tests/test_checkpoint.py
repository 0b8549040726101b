"""Checkpoint files as untrusted input: the header a network is rebuilt from is checked field by
field (a damaged or hostile one is a CheckpointError naming the file and field, never another
exception or an absurd allocation), and checkpoints are written with the umask's mode."""

from __future__ import annotations

import copy
import os
import resource
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vggkit.config import TrainConfig
from vggkit.errors import CheckpointError
from vggkit.models import create_model
from vggkit.models.registry import ARCHITECTURES, list_heads
from vggkit.training.checkpoint import MAX_CLASSES, MAX_INPUT_SIZE, model_from_checkpoint, save_checkpoint

NAME, CHANNELS, SIZE, CLASSES = "vgg_compact", 1, 8, 10


@pytest.fixture(autouse=True)
def bounded_address_space():
    """Should the shape check before building fail, a header describing a network of terabytes
    must end in a MemoryError here, not in the machine swapping."""
    with open("/proc/self/status") as f:
        vm = int(next(line for line in f if line.startswith("VmSize")).split()[1]) << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _valid() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    model = create_model(NAME, num_classes=CLASSES, in_channels=CHANNELS, input_size=SIZE)
    meta = {"config": TrainConfig(model=NAME, dataset="digits").to_dict(),
            "classes": [f"class {i}" for i in range(CLASSES)],
            "mean": [0.3] * CHANNELS, "std": [0.25] * CHANNELS,
            "image_shape": [CHANNELS, SIZE, SIZE],
            "model": {"name": NAME, "head": model.head, "num_classes": CLASSES,
                      "in_channels": CHANNELS, "input_size": SIZE, "dropout": 0.5}}
    return model.state_dict(), meta


STATE, META = _valid()


def _edit(meta: dict[str, Any], field: str, value: Any = ...) -> dict[str, Any]:
    """A copy of ``meta`` with the dotted ``field`` set to ``value`` (deleted when omitted)."""
    meta = copy.deepcopy(meta)
    *parents, last = field.split(".")
    target = meta
    for part in parents:
        target = target[part]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return meta


def test_a_valid_checkpoint_rebuilds_its_network(tmp_path: Path) -> None:
    model, ckpt = model_from_checkpoint(save_checkpoint(tmp_path / "c.safetensors", STATE, META))
    assert not model.training and ckpt.classes == META["classes"]
    assert model(torch.zeros(2, CHANNELS, SIZE, SIZE)).shape == (2, CLASSES)
    assert all(torch.equal(v, STATE[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field,value,message", [
    ("model.num_classes", ..., "its header lacks the field model.num_classes"),
    ("model", ..., "its header lacks the field model"),
    ("config", ..., "its header lacks the field config"),
    ("model", [1, 2], "header field model must be a mapping, got [1, 2]"),
    ("model.name", "vgg99", "header field model.name must be one of vgg11, "),
    ("model.head", "huge", "header field model.head must be one of "),
    ("model.num_classes", 0, f"model.num_classes must be an integer from 2 to {MAX_CLASSES}, got 0"),
    ("model.num_classes", 10**9, f"model.num_classes must be an integer from 2 to {MAX_CLASSES}, got 1000000000"),
    ("model.num_classes", 10.0, "model.num_classes must be an integer from 2 to"),
    ("model.in_channels", 2, "header field model.in_channels must be 1 or 3, got 2"),
    ("model.in_channels", True, "header field model.in_channels must be 1 or 3, got True"),
    ("model.input_size", 10**6, f"model.input_size must be an integer from 1 to {MAX_INPUT_SIZE}, got 1000000"),
    ("model.input_size", "8", f"model.input_size must be an integer from 1 to {MAX_INPUT_SIZE}, got '8'"),
    ("model.dropout", 1.5, "header field model.dropout must be a number in [0, 1), got 1.5"),
    ("image_shape", [3, 8, 8], "header field image_shape must be [1, 8, 8] (model.in_channels"),
    ("classes", ["a", "b"], "header field classes must be a list of 10 names (model.num_classes), got ['a', 'b']"),
    ("classes", list(range(10)), "header field classes must be a list of 10 names"),
    ("mean", [float("nan")], "header field mean must be a list of 1 finite numbers, got [nan]"),
    ("std", [0.0], "header field std must be a list of 1 finite numbers, all positive, got [0.0]"),
    ("config.dataset", None, "header field config.dataset must be a dataset name, got None"),
    ("optimizer", {"plain": {}}, "header field optimizer is malformed (KeyError: 'param_groups')"),
])
def test_a_bad_header_field_is_named(tmp_path: Path, field: str, value: Any, message: str) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", STATE, _edit(META, field, value))
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(path)
    assert str(info.value).startswith(f"{path}: "), info.value
    assert message in str(info.value)


@pytest.mark.parametrize("changes,message", [
    # A header describing terabytes of weights: refused from the shapes, before building.
    ({"name": "vgg11", "head": "linear", "num_classes": MAX_CLASSES, "input_size": MAX_INPUT_SIZE},
     "weights do not fit the vgg11 its header describes: features.6.bias is missing (and 59 more)"),
    ({"num_classes": 11}, "classifier.7.bias is (10,), the network's is (11,) (and 1 more)"),
    ({"input_size": 16}, "classifier.0.weight is (1024, 128), the network's is (1024, 512)"),
    ({"input_size": 9}, "header field model.input_size: image size 9: vgg_compact has"),
])
def test_a_header_that_does_not_fit_its_weights_is_named(tmp_path: Path, changes: dict, message: str) -> None:
    meta = copy.deepcopy(META)
    meta["model"].update(changes)
    meta["classes"] = [str(i) for i in range(meta["model"]["num_classes"])]
    meta["image_shape"] = [CHANNELS] + [meta["model"]["input_size"]] * 2
    path = save_checkpoint(tmp_path / "c.safetensors", STATE, meta)
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), info.value


# --- fuzzing: any header gives a network or a CheckpointError --------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)
_PLAUSIBLE = (st.sampled_from(list(ARCHITECTURES)) | st.sampled_from(list_heads())
              | st.sampled_from([0, 1, 2, 3, 8, 9, 10, 16, 32, 64, MAX_INPUT_SIZE, MAX_CLASSES, 10**30, -1])
              | st.lists(st.sampled_from([1, 3, 8, 10]), min_size=3, max_size=3))
_FIELDS = ["model", "model.name", "model.head", "model.num_classes", "model.in_channels",
           "model.input_size", "model.dropout", "classes", "image_shape", "mean", "std", "config",
           "config.dataset", "optimizer"]


@st.composite
def _headers(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:  # now and then a header of anything at all
        return {**draw(st.dictionaries(st.text(max_size=6), _JSON, max_size=6)), "format": "vggkit-checkpoint/1"}
    meta = copy.deepcopy(META)
    if draw(st.booleans()):  # another network, described consistently: reaches the weights check
        model = {"name": draw(st.sampled_from(list(ARCHITECTURES))),
                 "head": draw(st.sampled_from([None, *list_heads()])),
                 "num_classes": draw(st.sampled_from([2, CLASSES, CLASSES + 1, 1000, MAX_CLASSES])),
                 "in_channels": draw(st.sampled_from([1, 3])),
                 "input_size": draw(st.sampled_from([1, SIZE, 9, 16, 32, 224, MAX_INPUT_SIZE]))}
        channels, side = model["in_channels"], model["input_size"]
        meta.update(model=model, classes=[str(i) for i in range(model["num_classes"])],
                    image_shape=[channels, side, side], mean=[0.5] * channels, std=[0.25] * channels)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(_FIELDS))
        try:
            meta = _edit(meta, field, draw(st.just(...) | _JSON | _PLAUSIBLE))
        except (KeyError, TypeError):
            pass  # an earlier edit removed or replaced the parent
    return meta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_headers())
def test_fuzz_checkpoint_header(tmp_path_factory: pytest.TempPathFactory, meta: dict[str, Any]) -> None:
    path = save_checkpoint(tmp_path_factory.mktemp("fuzz") / "c.safetensors", STATE, meta)
    try:
        model, _ = model_from_checkpoint(path)
    except CheckpointError as exc:
        assert str(exc).startswith(str(path)), exc
        event(f"CheckpointError: {str(exc)[len(str(path)) + 2:][:30]}")
        return
    event("a network")
    assert isinstance(model, torch.nn.Module) and not model.training


# --- file mode --------------------------------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_mode_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """safetensors writes through a 0600 temporary file; a checkpoint gets the mode every other
    file of the run gets."""
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "c.safetensors", STATE, META)
        other = tmp_path / "other.json"
        other.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(other.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
