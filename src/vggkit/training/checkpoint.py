"""Checkpoints: one safetensors file each, written atomically, loaded without executing code.

A checkpoint holds the model weights, the optimizer's tensors and the RNG states as
tensors, and everything else (config, class names, normalisation, epoch, schedule state,
optimizer hyper-parameters) as JSON in the safetensors header. It alone is enough to
predict: the config says how to build the model and how to prepare an image.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vggkit.errors import CheckpointError, UsageError, VggkitError

FORMAT = "vggkit-checkpoint/1"
SUFFIX = ".safetensors"
MAX_CLASSES = 100_000
MAX_INPUT_SIZE = 4096


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any]  # config, classes, mean, std, image_shape, epoch, ...
    optimizer_state: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    # --ema: the trained weights, beside the average in model_state (resume reads both)
    training_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{name}"] = value.detach().cpu().contiguous().clone()
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in info.get("plain", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    training_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write atomically: a temporary file in the same folder, fsync, then rename over."""
    path = Path(path)
    tensors = {
        f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model_state.items()
    }
    header = {"format": FORMAT, **meta}
    if optimizer_state is not None:
        optim_tensors, header["optimizer"] = _flatten_optimizer(optimizer_state)
        tensors.update(optim_tensors)
    for name, value in (rng or {}).items():
        tensors[f"rng/{name}"] = value.detach().cpu().contiguous().clone()
    for name, value in (training_state or {}).items():
        tensors[f"train/{name}"] = value.detach().cpu().contiguous().clone()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = _new_file_mode(tmp)
        save_file(tensors, str(tmp), metadata={"vggkit": json.dumps(header)})
        os.chmod(tmp, mode)  # safetensors writes through its own 0600 temporary file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or exc}; the previous checkpoint "
            "is intact"
        ) from exc
    return path


def _new_file_mode(path: Path) -> int:
    """The mode a new file gets at ``path`` (0o666 less the umask, or what a default ACL says),
    learnt by creating it empty: os.umask can only be read by changing it, racing other threads."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return stat.S_IMODE(os.stat(path).st_mode)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("vggkit", "null"))
        tensors = load_file(str(path))
    # (RecursionError: JSON nested too deep for the parser)
    except (SafetensorError, OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a readable vggkit checkpoint: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vggkit checkpoint (no {FORMAT} header)")
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng/")}
    optimizer_state = None
    if "optimizer" in header:
        optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
        try:
            optimizer_state = _unflatten_optimizer(optim, header.pop("optimizer"))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: header field optimizer is malformed ({type(exc).__name__}: "
                                  f"{exc})") from exc
    training_state = {k[6:]: v for k, v in tensors.items() if k.startswith("train/")}
    return Checkpoint(model_state, header, optimizer_state, rng, path, training_state)


KERAS = "keras"  # model.name of an imported Keras network no registered one matches


def find_checkpoint(run_or_file: str | Path, which: str = "best") -> Path:
    """A checkpoint file, or a run folder's ``checkpoints/<which>`` (falling back to last)."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    if path.is_dir():
        folder = path / "checkpoints"
        for name in (which, "last"):
            candidate = folder / f"{name}{SUFFIX}"
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"run folder {path} holds no checkpoint ({folder} is empty or missing)")
    raise CheckpointError(f"{path} is neither a checkpoint file nor a run folder")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist = 2, 40, 40, 4


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_real(value: Any) -> bool:
    """A finite number a float can hold (JSON integers have no bound)."""
    return (type(value) is int and abs(value) < 1 << 63) or (type(value) is float and math.isfinite(value))


def _header_field(meta: dict[str, Any], path: Path | None, name: str, ok: Callable[[Any], bool],
                  expected: str) -> Any:
    """The dotted header field ``name``, or a CheckpointError naming the file and the field."""
    value: Any = meta
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CheckpointError(f"{path}: its header lacks the field {name}")
        value = value[part]
    if not ok(value):
        raise CheckpointError(f"{path}: header field {name} must be {expected}, got {_REPR.repr(value)}")
    return value


def check_header(meta: dict[str, Any], path: Path | None = None) -> None:
    """Check the header fields the network and its predictions are built from (model, classes,
    image_shape, mean, std, config.dataset), so that a damaged or hostile header is a
    CheckpointError naming the field rather than a KeyError or an absurd allocation."""
    from vggkit.models.registry import ARCHITECTURES, list_heads

    def field_(name: str, ok: Callable[[Any], bool], expected: str) -> Any:
        return _header_field(meta, path, name, ok, expected)

    field_("model", lambda v: isinstance(v, dict), "a mapping")
    field_("model.name", lambda v: isinstance(v, str) and (v in ARCHITECTURES or v == KERAS),
           f"one of {', '.join(ARCHITECTURES)}, or {KERAS} (an imported Keras network)")
    if meta["model"]["name"] == KERAS:
        field_("model.layers", lambda v: isinstance(v, list) and v and all(
            isinstance(x, dict) and isinstance(x.get("op"), str) for x in v),
            "a list of layer descriptions")
    if meta["model"].get("head") is not None:
        field_("model.head", lambda v: isinstance(v, str) and v in list_heads(),
               f"one of {', '.join(list_heads())}")
    if "dropout" in meta["model"]:
        field_("model.dropout", lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)")
    classes = field_("model.num_classes", lambda v: _is_int(v, 2, MAX_CLASSES),
                     f"an integer from 2 to {MAX_CLASSES}")
    channels = field_("model.in_channels", lambda v: _is_int(v, 1, 3) and v != 2, "1 or 3")
    size = field_("model.input_size", lambda v: _is_int(v, 1, MAX_INPUT_SIZE),
                  f"an integer from 1 to {MAX_INPUT_SIZE}")
    field_("image_shape", lambda v: isinstance(v, list) and [type(x) for x in v] == [int] * 3
           and v == [channels, size, size],
           f"[{channels}, {size}, {size}] (model.in_channels, model.input_size twice)")
    field_("classes", lambda v: isinstance(v, list) and len(v) == classes
           and all(isinstance(c, str) for c in v), f"a list of {classes} names (model.num_classes)")
    for name, least in (("mean", -math.inf), ("std", 0.0)):
        field_(name, lambda v, least=least: isinstance(v, list) and len(v) == channels
               and all(_is_real(x) and x > least for x in v),
               f"a list of {channels} finite numbers{', all positive' if least == 0 else ''}")
    field_("config", lambda v: isinstance(v, dict), "a mapping")
    field_("config.dataset", lambda v: isinstance(v, str), "a dataset name")


def _check_weights_fit(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Compare the checkpoint's tensors with the names and shapes of the header's network."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ckpt.model_state.items()}
    problems = [f"{k} is missing" for k in sorted(want.keys() - have.keys())]
    problems += [f"{k} is unexpected" for k in sorted(have.keys() - want.keys())]
    problems += [f"{k} is {have[k]}, the network's is {want[k]}" for k in sorted(want.keys() & have.keys())
                 if want[k] != have[k]]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: weights do not fit the {ckpt.meta['model']['name']} its header "
                              f"describes: {problems[0]}{more}")


def model_from_checkpoint(run_or_file: str | Path, which: str = "best") -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild the network a checkpoint was trained as and load its weights (eval mode)."""
    from vggkit.models import create_model

    ckpt = load_checkpoint(find_checkpoint(run_or_file, which))
    check_header(ckpt.meta, ckpt.path)
    arch = ckpt.meta["model"]
    args = dict(num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                input_size=arch["input_size"], head=arch.get("head"), dropout=arch.get("dropout", 0.5))
    def build() -> torch.nn.Module:
        if arch["name"] == KERAS:  # an imported Keras stack that no registered network matches
            from vggkit.models.keras import build_from_specs

            return build_from_specs(arch["layers"])
        return create_model(arch["name"], **args)

    try:
        # Shapes first, on the meta device: a header can describe a network of terabytes.
        with torch.device("meta"):
            _check_weights_fit(build(), ckpt)
    except (UsageError, KeyError, TypeError, ValueError) as exc:  # sizes it cannot take
        field = "input_size" if isinstance(exc, UsageError) else "layers"
        raise CheckpointError(f"{ckpt.path}: header field model.{field}: {exc}") from exc
    model = build()
    if arch.get("norm"):  # BatchNorm's eps and momentum as Keras had them
        from vggkit.models.keras import apply_norm_settings

        apply_norm_settings(model, arch["norm"])
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt.path}: weights do not fit {arch['name']}: {first}") from exc
    model.eval()
    return model, ckpt


def check_loadable(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except VggkitError:
        return False
