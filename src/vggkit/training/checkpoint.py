"""Checkpoints: one safetensors file each, written atomically, loaded without executing code.

A checkpoint holds the model weights, the optimizer's tensors and the RNG states as
tensors, and everything else (config, class names, normalisation, epoch, schedule state,
optimizer hyper-parameters) as JSON in the safetensors header. It alone is enough to
predict: the config says how to build the model and how to prepare an image.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vggkit.errors import CheckpointError, VggkitError

FORMAT = "vggkit-checkpoint/1"
SUFFIX = ".safetensors"


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any]  # config, classes, mean, std, image_shape, epoch, ...
    optimizer_state: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"vggkit": json.dumps(header)})
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


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("vggkit", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable vggkit checkpoint: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vggkit checkpoint (no {FORMAT} header)")
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng/")}
    optimizer_state = None
    if "optimizer" in header:
        optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
        optimizer_state = _unflatten_optimizer(optim, header.pop("optimizer"))
    return Checkpoint(model_state, header, optimizer_state, rng, path)


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


def model_from_checkpoint(run_or_file: str | Path, which: str = "best") -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild the network a checkpoint was trained as and load its weights (eval mode)."""
    from vggkit.models import create_model

    ckpt = load_checkpoint(find_checkpoint(run_or_file, which))
    arch = ckpt.meta["model"]
    model = create_model(
        arch["name"],
        num_classes=arch["num_classes"],
        in_channels=arch["in_channels"],
        input_size=arch["input_size"],
        head=arch["head"],
        dropout=arch.get("dropout", 0.5),
    )
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
