"""Keras files read without TensorFlow or Keras: a Keras 3 ``.keras`` archive (a zip of
config.json, metadata.json and model.weights.h5) or a legacy HDF5 full-model ``.h5``, with
h5py and the JSON config. Nothing is unpickled or evaluated: a layer outside the list below
(a Lambda, a custom object) is an error naming it.

The differences that silently give wrong answers when a Keras VGG is converted by hand are each
handled here: HWIO kernels -> OIHW; the Dense after ``Flatten`` sees H-W-C in Keras and C-H-W in
PyTorch, so its input columns are reordered; BatchNormalization's epsilon (1e-3) is kept and its
momentum (0.99, the weight of the old value) becomes PyTorch's 0.01; ``padding="same"`` becomes
the (possibly asymmetric) zero padding TensorFlow computes; ``activation=`` folded into Conv2D and
Dense becomes a layer of its own; a final softmax is dropped (vggkit's networks give logits).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vggkit.errors import UsageError

LAYERS = ("InputLayer", "Conv2D", "ZeroPadding2D", "MaxPooling2D", "BatchNormalization",
          "Dropout", "Flatten", "Dense", "Activation", "ReLU", "Softmax",
          "GlobalAveragePooling2D")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "elu": nn.ELU,
               "selu": nn.SELU, "gelu": nn.GELU, "softplus": nn.Softplus, "silu": nn.SiLU,
               "swish": nn.SiLU}
KERAS_MEMBERS = {"config.json", "metadata.json", "model.weights.h5"}
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class KerasFileError(UsageError):
    pass


@dataclass
class KerasModel:
    path: Path
    layers: list[dict[str, Any]]  # {"class_name", "config"} in order, InputLayer dropped
    weights: dict[str, list[np.ndarray]]  # layer name -> its variables in Keras's order
    input_shape: tuple[int, int, int]  # H, W, C
    name: str = "model"


@dataclass
class Converted:
    """The PyTorch network (``layers`` describes it, for checkpoints) and what it came from."""

    module: nn.Sequential
    layers: list[dict[str, Any]]
    num_classes: int
    input_shape: tuple[int, int, int]
    softmax_dropped: bool
    bn_eps: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def read_keras(path: str | Path) -> KerasModel:
    path = Path(path)
    try:
        head = path.open("rb").read(8)
    except FileNotFoundError:
        raise KerasFileError(f"{path}: no such file") from None
    if head[:2] == b"PK":
        config, weights = _read_archive(path)
    elif head == HDF5_MAGIC:
        config, weights = _read_legacy_h5(path)
    else:
        raise KerasFileError(f"{path}: neither a Keras 3 .keras archive nor an HDF5 .h5 file")
    layers, shape, name = _layer_list(path, config)
    if head[:2] == b"PK":
        weights = _by_layer_name(layers, weights)
    return KerasModel(path, layers, weights, shape, name)


def _snake(name: str) -> str:
    """Keras's to_snake_case: Conv2D -> conv2d, BatchNormalization -> batch_normalization."""
    import re

    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _by_layer_name(layers: list[dict], groups: dict[str, list[np.ndarray]]) -> dict:
    """A .keras archive names its weight groups by the layer's name in some Keras versions and,
    in others (3.15), by its class within the model (conv2d, conv2d_1, ...): map either onto
    the layers' names."""
    names = [l.get("config", {}).get("name") for l in layers]
    if all(n in groups for n in names if n is not None) and any(n in groups for n in names):
        return groups
    counts: dict[str, int] = {}
    out = {}
    for layer, name in zip(layers, names):
        base = _snake(layer["class_name"])
        key = base if base not in counts else f"{base}_{counts[base]}"
        counts[base] = counts.get(base, 0) + 1
        if key in groups:
            out[name] = groups[key]
    return out


def _read_archive(path: Path) -> tuple[dict, dict[str, list[np.ndarray]]]:
    import h5py

    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if names != KERAS_MEMBERS:
                extra = sorted(names - KERAS_MEMBERS) or sorted(KERAS_MEMBERS - names)
                raise KerasFileError(f"{path}: a .keras archive holds exactly "
                                     f"{', '.join(sorted(KERAS_MEMBERS))}; this one "
                                     f"{'also has' if names - KERAS_MEMBERS else 'lacks'} "
                                     f"{extra[0]}")
            config = json.loads(z.read("config.json"))
            blob = z.read("model.weights.h5")
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise KerasFileError(f"{path}: not a readable .keras archive ({exc})") from None
    try:
        with h5py.File(io.BytesIO(blob), "r") as f:
            group = f.get("layers")
            weights = {} if group is None else {
                name: [np.asarray(g["vars"][k]) for k in sorted(g["vars"], key=int)]
                for name, g in group.items() if "vars" in g}
    except (OSError, KeyError, ValueError) as exc:
        raise KerasFileError(f"{path}: its model.weights.h5 is unreadable ({exc})") from None
    return config, weights


def _read_legacy_h5(path: Path) -> tuple[dict, dict[str, list[np.ndarray]]]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise KerasFileError(f"{path}: an HDF5 file without a model_config: a weights-only "
                                     "file (save the whole model: model.save('model.h5'))")
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            group = f["model_weights"] if "model_weights" in f else f
            weights = {}
            for name in _names(group.attrs.get("layer_names", [])):
                layer = group[name]
                weights[name] = [np.asarray(layer[w]) for w in
                                 _names(layer.attrs.get("weight_names", []))]
    except KerasFileError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise KerasFileError(f"{path}: not a readable Keras HDF5 file ({exc})") from None
    return config, weights


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _layer_list(path: Path, config: dict) -> tuple[list[dict], tuple[int, int, int], str]:
    """The layers of a Sequential, or of a Functional model that is one chain."""
    kind, inner = config.get("class_name"), config.get("config", {})
    if kind not in ("Sequential", "Functional", "Model"):
        raise KerasFileError(f"{path}: a {kind} model; vggkit imports Sequential and "
                             "single-chain Functional models")
    layers = list(inner.get("layers", []))
    if kind != "Sequential":
        _check_chain(path, layers)
    shape = None
    for layer in layers:
        cfg = layer.get("config", {})
        batch = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if batch and shape is None:
            shape = batch
    if shape is None and inner.get("build_input_shape"):
        shape = inner["build_input_shape"]
    if shape is None or len(shape) != 4 or any(s is None for s in shape[1:]):
        raise KerasFileError(f"{path}: no fixed input shape (H, W, C) in its config")
    body = [l for l in layers if l.get("class_name") != "InputLayer"]
    for i, layer in enumerate(body):
        if layer.get("class_name") not in LAYERS:
            raise KerasFileError(
                f"{path}: layer {i} ({layer.get('class_name')} "
                f"'{layer.get('config', {}).get('name', '?')}') is not supported; vggkit imports "
                f"{', '.join(LAYERS[1:])}")
    return body, (int(shape[1]), int(shape[2]), int(shape[3])), inner.get("name", "model")


def _check_chain(path: Path, layers: list[dict]) -> None:
    previous = None
    for i, layer in enumerate(layers):
        nodes = layer.get("inbound_nodes") or []
        inputs = json.dumps(nodes)
        if previous is not None and (len(nodes) != 1 or inputs.count('"keras_history"') != 1
                                     or f'"{previous}"' not in inputs):
            raise KerasFileError(f"{path}: layer {i} ('{layer['config'].get('name')}') is not fed "
                                 "by the one before it; vggkit imports single chains of layers")
        previous = layer["config"].get("name")


# ----------------------------------------------------------------------------- converting
def convert(km: KerasModel) -> Converted:
    """The exact PyTorch equivalent, NCHW, with the weights loaded."""
    h, w, c = km.input_shape
    shape: tuple[int, ...] = (c, h, w)
    modules: list[nn.Module] = []
    specs: list[dict[str, Any]] = []
    flat_from: tuple[int, int, int] | None = None  # (C, H, W) at a Flatten: the next Dense's order
    softmax_dropped = False
    for i, layer in enumerate(km.layers):
        kind, cfg = layer["class_name"], layer.get("config", {})
        name = cfg.get("name", f"layer{i}")
        where = f"{km.path}: layer {i} ({kind} '{name}')"
        last = i == len(km.layers) - 1
        _check_channels_last(cfg, where)
        if kind == "Conv2D":
            shape = _conv(modules, specs, cfg, shape, km.weights.get(name, []), where)
            softmax_dropped |= _activation(modules, specs, cfg.get("activation"), where, last)
        elif kind == "Dense":
            shape = _dense(modules, specs, cfg, shape, km.weights.get(name, []), where, flat_from)
            flat_from = None
            softmax_dropped |= _activation(modules, specs, cfg.get("activation"), where, last)
        elif kind == "ZeroPadding2D":
            (top, bottom), (left, right) = _pairs(cfg.get("padding", 1))
            modules.append(nn.ZeroPad2d((left, right, top, bottom)))
            specs.append({"op": "pad", "pad": [left, right, top, bottom]})
            shape = (shape[0], shape[1] + top + bottom, shape[2] + left + right)
        elif kind == "MaxPooling2D":
            shape = _pool(modules, specs, cfg, shape, where)
        elif kind == "BatchNormalization":
            _batch_norm(modules, specs, cfg, shape, km.weights.get(name, []), where)
        elif kind == "Dropout":
            modules.append(nn.Dropout(float(cfg.get("rate", 0.5))))
            specs.append({"op": "dropout", "rate": float(cfg.get("rate", 0.5))})
        elif kind == "Flatten":
            flat_from = shape if len(shape) == 3 else None
            modules.append(nn.Flatten())
            specs.append({"op": "flatten"})
            shape = (math.prod(shape),)
        elif kind == "GlobalAveragePooling2D":
            if cfg.get("keepdims"):
                raise KerasFileError(f"{where}: keepdims=True is not supported")
            modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            specs.append({"op": "gap"})
            shape = (shape[0],)
        elif kind == "Activation":
            softmax_dropped |= _activation(modules, specs, cfg.get("activation"), where, last)
        elif kind == "ReLU":
            if cfg.get("max_value") is not None or cfg.get("negative_slope") or cfg.get("threshold"):
                raise KerasFileError(f"{where}: only the plain ReLU is supported")
            _activation(modules, specs, "relu", where, last)
        elif kind == "Softmax":
            softmax_dropped |= _activation(modules, specs, "softmax", where, last)
    if len(shape) != 1:
        raise KerasFileError(f"{km.path}: the network ends in a {len(shape)}-d map, not class "
                             "scores (end it with Dense or GlobalAveragePooling2D)")
    eps = [m.eps for m in modules if isinstance(m, nn.modules.batchnorm._NormBase)]
    return Converted(nn.Sequential(*modules), specs, shape[0], km.input_shape,
                     softmax_dropped, eps)


def _check_channels_last(cfg: dict, where: str) -> None:
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise KerasFileError(f"{where}: data_format {cfg['data_format']}; vggkit imports "
                             "channels_last models (Keras's default)")


def _pairs(value) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(value, int):
        return (value, value), (value, value)
    a, b = value
    a = (a, a) if isinstance(a, int) else tuple(a)
    b = (b, b) if isinstance(b, int) else tuple(b)
    return (int(a[0]), int(a[1])), (int(b[0]), int(b[1]))


def _same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "same": the output is ceil(size / stride), the extra pixel at the end."""
    span = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _weights(values: list[np.ndarray], expected: list[tuple[int, ...]], where: str) -> list[torch.Tensor]:
    if len(values) != len(expected):
        raise KerasFileError(f"{where}: {len(values)} weight arrays in the file, its config needs "
                             f"{len(expected)}")
    for value, want in zip(values, expected):
        if tuple(value.shape) != tuple(want):
            raise KerasFileError(f"{where}: a weight of shape {tuple(value.shape)} where its config "
                                 f"needs {tuple(want)}: the config does not match its weights")
    return [torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in values]


def _conv(modules, specs, cfg, shape, values, where) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise KerasFileError(f"{where}: a convolution after the network was flattened")
    c, h, w = shape
    kh, kw = cfg["kernel_size"]
    sh, sw = cfg.get("strides", (1, 1))
    dh, dw = cfg.get("dilation_rate", (1, 1))
    if cfg.get("groups", 1) != 1:
        raise KerasFileError(f"{where}: grouped convolutions are not supported")
    out, bias = int(cfg["filters"]), bool(cfg.get("use_bias", True))
    pads = [0, 0, 0, 0]
    if cfg.get("padding", "valid") == "same":
        top, bottom = _same_pads(h, kh, sh, dh)
        left, right = _same_pads(w, kw, sw, dw)
        pads = [left, right, top, bottom]
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    if not symmetric:
        modules.append(nn.ZeroPad2d(tuple(pads)))
        specs.append({"op": "pad", "pad": pads})
    conv = nn.Conv2d(c, out, (kh, kw), stride=(sh, sw), dilation=(dh, dw),
                     padding=(pads[2], pads[0]) if symmetric else 0, bias=bias)
    tensors = _weights(values, [(kh, kw, c, out)] + ([(out,)] if bias else []), where)
    with torch.no_grad():
        conv.weight.copy_(tensors[0].permute(3, 2, 0, 1))  # HWIO -> OIHW
        if bias:
            conv.bias.copy_(tensors[1])
    modules.append(conv)
    specs.append({"op": "conv", "in": c, "out": out, "kernel": [kh, kw], "stride": [sh, sw],
                  "dilation": [dh, dw], "padding": [pads[2], pads[0]] if symmetric else [0, 0],
                  "bias": bias})
    if not symmetric:
        h, w = h + pads[2] + pads[3], w + pads[0] + pads[1]
    else:
        h, w = h + 2 * pads[2], w + 2 * pads[0]
    return out, (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1


def _dense(modules, specs, cfg, shape, values, where, flat_from) -> tuple[int]:
    if len(shape) != 1:
        raise KerasFileError(f"{where}: a Dense layer on a {len(shape)}-d map (Flatten or pool "
                             "first)")
    units, bias, n_in = int(cfg["units"]), bool(cfg.get("use_bias", True)), shape[0]
    tensors = _weights(values, [(n_in, units)] + ([(units,)] if bias else []), where)
    kernel = tensors[0]
    if flat_from is not None:  # Keras flattened H-W-C; PyTorch flattens C-H-W
        c, h, w = flat_from
        kernel = kernel.view(h, w, c, units).permute(2, 0, 1, 3).reshape(n_in, units)
    linear = nn.Linear(n_in, units, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(kernel.t())
        if bias:
            linear.bias.copy_(tensors[1])
    modules.append(linear)
    specs.append({"op": "dense", "in": n_in, "out": units, "bias": bias})
    return (units,)


def _pool(modules, specs, cfg, shape, where) -> tuple[int, int, int]:
    c, h, w = shape
    kh, kw = cfg.get("pool_size", (2, 2))
    sh, sw = cfg.get("strides") or (kh, kw)
    if cfg.get("padding", "valid") == "same":
        top, bottom = _same_pads(h, kh, sh)
        left, right = _same_pads(w, kw, sw)
        if top or bottom or left or right:
            modules.append(nn.ConstantPad2d((left, right, top, bottom), float("-inf")))
            specs.append({"op": "pad", "pad": [left, right, top, bottom], "value": "-inf"})
            h, w = h + top + bottom, w + left + right
    modules.append(nn.MaxPool2d((kh, kw), (sh, sw)))
    specs.append({"op": "maxpool", "kernel": [kh, kw], "stride": [sh, sw]})
    return c, (h - kh) // sh + 1, (w - kw) // sw + 1


def _batch_norm(modules, specs, cfg, shape, values, where) -> None:
    axis = cfg.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if axis not in (-1, len(shape)):
        raise KerasFileError(f"{where}: BatchNormalization over axis {axis}; vggkit imports the "
                             "channel axis (-1)")
    width = shape[0]
    center, scale = bool(cfg.get("center", True)), bool(cfg.get("scale", True))
    eps = float(cfg.get("epsilon", 1e-3))
    momentum = 1.0 - float(cfg.get("momentum", 0.99))  # Keras keeps, PyTorch takes in
    norm = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(width, eps=eps,
                                                                   momentum=momentum)
    expected = [(width,)] * (2 + center + scale)
    tensors = _weights(values, expected, where)
    with torch.no_grad():
        i = 0
        if scale:
            norm.weight.copy_(tensors[i])
            i += 1
        if center:
            norm.bias.copy_(tensors[i])
            i += 1
        norm.running_mean.copy_(tensors[i])
        norm.running_var.copy_(tensors[i + 1])
    if not scale:
        norm.weight.requires_grad_(False)
    if not center:
        norm.bias.requires_grad_(False)
    modules.append(norm)
    specs.append({"op": "bn", "dims": len(shape), "width": width, "eps": eps,
                  "momentum": momentum, "scale": scale, "center": center})


def _activation(modules, specs, name, where, last: bool) -> bool:
    """Appends the activation; True when it is a final softmax, which is dropped."""
    name = name or "linear"
    if isinstance(name, dict):  # Keras 3 may serialise it as an object
        name = name.get("config", {}).get("name") or name.get("class_name", "?")
    name = str(name).lower()
    if name == "linear":
        return False
    if name == "softmax":
        if last:
            return True
        modules.append(nn.Softmax(dim=1))
        specs.append({"op": "act", "name": "softmax"})
        return False
    if name not in ACTIVATIONS:
        raise KerasFileError(f"{where}: activation {name!r} is not supported (supported: "
                             f"{', '.join(sorted(ACTIVATIONS))}, softmax, linear)")
    modules.append(ACTIVATIONS[name]())
    specs.append({"op": "act", "name": name})
    return False


# ----------------------------------------------------------------------------- rebuilding
def build_from_specs(specs: list[dict[str, Any]]) -> nn.Sequential:
    """The network a checkpoint's ``model.layers`` describes (fresh weights), for the runs
    whose Keras network matches none of the registered ones."""
    modules: list[nn.Module] = []
    for s in specs:
        op = s["op"]
        if op == "conv":
            modules.append(nn.Conv2d(s["in"], s["out"], tuple(s["kernel"]), stride=tuple(s["stride"]),
                                     dilation=tuple(s["dilation"]), padding=tuple(s["padding"]),
                                     bias=s["bias"]))
        elif op == "pad":
            value = float("-inf") if s.get("value") == "-inf" else 0.0
            modules.append(nn.ConstantPad2d(tuple(s["pad"]), value))
        elif op == "maxpool":
            modules.append(nn.MaxPool2d(tuple(s["kernel"]), tuple(s["stride"])))
        elif op == "bn":
            cls = nn.BatchNorm2d if s["dims"] == 3 else nn.BatchNorm1d
            modules.append(cls(s["width"], eps=s["eps"], momentum=s["momentum"]))
        elif op == "dropout":
            modules.append(nn.Dropout(s["rate"]))
        elif op == "flatten":
            modules.append(nn.Flatten())
        elif op == "gap":
            modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif op == "dense":
            modules.append(nn.Linear(s["in"], s["out"], bias=s["bias"]))
        elif op == "act":
            modules.append(nn.Softmax(dim=1) if s["name"] == "softmax" else ACTIVATIONS[s["name"]]())
        else:
            raise UsageError(f"unknown layer {op!r} in a Keras-imported checkpoint")
    return nn.Sequential(*modules)


# ----------------------------------------------------------------------------- registry match
def _describe(m: nn.Module) -> tuple | None:
    """A layer as the matcher compares it (None: no computation, e.g. Flatten)."""
    def ints(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    if isinstance(m, nn.Conv2d):
        return ("conv", m.in_channels, m.out_channels, ints(m.kernel_size), ints(m.stride),
                ints(m.padding), ints(m.dilation), m.bias is not None)
    if isinstance(m, nn.Linear):
        return ("dense", m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, nn.BatchNorm2d):
        return ("bn2", m.num_features)
    if isinstance(m, nn.BatchNorm1d):
        return ("bn1", m.num_features)
    if isinstance(m, nn.MaxPool2d):
        return ("maxpool", ints(m.kernel_size), ints(m.stride or m.kernel_size), ints(m.padding))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return ("gap",) if ints(m.output_size) == (1, 1) else ("pool", ints(m.output_size))
    if isinstance(m, nn.AdaptiveMaxPool2d):
        return ("gmp",)
    if isinstance(m, nn.Dropout):
        return ("dropout",)
    if isinstance(m, (nn.Flatten, nn.Identity)):
        return None
    return (type(m).__name__.lower(),)


def signature(module: nn.Module, skip_pool7: bool = False) -> list[tuple]:
    out = []
    for m in module.modules():
        if list(m.children()):
            continue
        d = _describe(m)
        if d is not None and not (skip_pool7 and d == ("pool", (7, 7))):
            out.append(d)
    return out


def dropout_rates(module: nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, nn.Dropout)]


def match_registered(conv: Converted) -> tuple[str, str, float] | None:
    """(model, head, dropout) of the registered network that computes what ``conv`` does,
    layer for layer, or None."""
    from vggkit.models.registry import ARCHITECTURES, create_model
    from vggkit.models.vgg import HEADS

    h, w, c = conv.input_shape
    if h != w:
        return None
    want = signature(conv.module)
    rates = dropout_rates(conv.module)
    for name, arch in ARCHITECTURES.items():
        if arch.whiten_kernel:
            continue
        for head in HEADS:
            try:
                with torch.device("meta"):
                    candidate = create_model(name, num_classes=conv.num_classes, in_channels=c,
                                             input_size=h, head=head,
                                             dropout=rates[-1] if rates else 0.5)
            except (UsageError, ValueError, RuntimeError):
                continue
            side = arch.feature_side(h)
            if signature(candidate, skip_pool7=side == 7) == want and \
                    dropout_rates(candidate) == rates:
                return name, head, rates[-1] if rates else 0.5
    return None


def load_into(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s weights into ``target``, layer by layer (their signatures match), and
    BatchNorm's epsilon and momentum with them."""
    src, dst = list(source.state_dict().items()), list(target.state_dict().items())
    if [tuple(v.shape) for _, v in src] != [tuple(v.shape) for _, v in dst]:
        raise UsageError("the Keras network and its registered match disagree on weight shapes")
    target.load_state_dict({k: v for (k, _), (_, v) in zip(dst, src)})
    norms = [m for m in source.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    for ours, theirs in zip([m for m in target.modules()
                             if isinstance(m, nn.modules.batchnorm._NormBase)], norms):
        ours.eps, ours.momentum = theirs.eps, theirs.momentum


def norm_settings(module: nn.Module) -> list[list[float]]:
    """[eps, momentum] of every BatchNorm, in order: a checkpoint keeps Keras's."""
    return [[m.eps, m.momentum] for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)]


def apply_norm_settings(module: nn.Module, settings: list[list[float]] | None) -> None:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if not settings:
        return
    if len(settings) != len(norms):
        raise UsageError(f"{len(settings)} BatchNorm settings for {len(norms)} BatchNorm layers")
    for m, (eps, momentum) in zip(norms, settings):
        m.eps, m.momentum = float(eps), float(momentum)
