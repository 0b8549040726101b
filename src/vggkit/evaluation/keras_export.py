"""``vggkit export CHECKPOINT --keras model.keras``: a vggkit network as a Keras 3 model, for
people who deploy with Keras. The inverse of ``vggkit import-keras``: OIHW kernels -> HWIO, the
first Dense after ``Flatten`` takes its input columns in H-W-C order, BatchNorm keeps its epsilon
and momentum (PyTorch's 0.1 -> Keras's 0.9), and the last Dense gets ``activation="softmax"``
(Keras models give probabilities; vggkit's import drops it again). Checked at once: Keras's
logits on a random batch equal vggkit's within 1e-4. Needs Keras 3 (any backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vggkit.errors import UsageError
from vggkit.evaluation.runs import load_model

TOLERANCE = 1e-4


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")  # no TensorFlow needed
    try:
        import keras
    except ImportError:
        raise UsageError("--keras needs Keras 3: pip install keras (the torch backend is "
                         "enough; TensorFlow is not needed)") from None
    if int(keras.__version__.split(".")[0]) < 3:
        raise UsageError(f"--keras needs Keras 3, found {keras.__version__}")
    return keras


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def keras_layers(model: nn.Module, side: int, keras) -> list[tuple[Any, list[np.ndarray]]]:
    """(Keras layer, its weights) for each computing module of ``model``, in order."""
    L = keras.layers
    out: list[tuple[Any, list[np.ndarray]]] = []
    shape: tuple[int, ...] = (0, side, side)  # (C, H, W) through the convolutions
    flat_from: tuple[int, int, int] | None = None
    leaves = _leaves(model)
    last_dense = max(i for i, m in enumerate(leaves) if isinstance(m, nn.Linear))
    for i, m in enumerate(leaves):
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros":
                raise UsageError(f"layer {i} ({m}): only plain zero-padded convolutions export")
            ph, pw = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            # "same" where it is the same thing (stride 1, odd kernel, half of it padded): the
            # Keras write-ups' spelling, which vggkit's import maps back onto the registry
            same = (m.stride == (1, 1) and m.dilation == (1, 1)
                    and (ph, pw) == ((m.kernel_size[0] - 1) // 2, (m.kernel_size[1] - 1) // 2)
                    and all(k % 2 for k in m.kernel_size))
            if (ph or pw) and not same:
                out.append((L.ZeroPadding2D(((ph, ph), (pw, pw))), []))
            kernel = m.weight.detach().permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
            weights = [kernel] + ([m.bias.detach().numpy()] if m.bias is not None else [])
            out.append((L.Conv2D(m.out_channels, m.kernel_size, strides=m.stride,
                                 dilation_rate=m.dilation, padding="same" if same else "valid",
                                 use_bias=m.bias is not None), weights))
            h = (shape[1] + 2 * ph - m.dilation[0] * (m.kernel_size[0] - 1) - 1) // m.stride[0] + 1
            w = (shape[2] + 2 * pw - m.dilation[1] * (m.kernel_size[1] - 1) - 1) // m.stride[1] + 1
            shape = (m.out_channels, h, w)
        elif isinstance(m, nn.ZeroPad2d):
            left, right, top, bottom = m.padding
            out.append((L.ZeroPadding2D(((top, bottom), (left, right))), []))
            shape = (shape[0], shape[1] + top + bottom, shape[2] + left + right)
        elif isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            s = m.stride if isinstance(m.stride, tuple) else (m.stride or k[0],) * 2
            if m.padding not in (0, (0, 0)) or m.ceil_mode:
                raise UsageError(f"layer {i} ({m}): a padded max-pool does not export")
            out.append((L.MaxPooling2D(k, strides=s), []))
            shape = (shape[0], (shape[1] - k[0]) // s[0] + 1, (shape[2] - k[1]) // s[1] + 1)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            weights = [m.weight.detach().numpy() if m.weight is not None else np.ones(m.num_features),
                       m.bias.detach().numpy() if m.bias is not None else np.zeros(m.num_features),
                       m.running_mean.numpy(), m.running_var.numpy()]
            out.append((L.BatchNormalization(epsilon=m.eps, momentum=1.0 - (m.momentum or 0.1)),
                        [w.astype(np.float32) for w in weights]))
        elif isinstance(m, nn.ReLU):
            out.append((L.ReLU(), []))
        elif isinstance(m, (nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.SiLU, nn.Softplus)):
            name = {"GELU": "gelu", "Tanh": "tanh", "Sigmoid": "sigmoid", "ELU": "elu",
                    "SELU": "selu", "SiLU": "silu", "Softplus": "softplus"}[type(m).__name__]
            out.append((L.Activation(name), []))
        elif isinstance(m, nn.Dropout):
            out.append((L.Dropout(m.p), []))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
            if tuple(size) == (1, 1):
                out.append((L.GlobalAveragePooling2D(), []))
                shape = (shape[0],)
            elif tuple(size) != tuple(shape[1:]):
                raise UsageError(f"layer {i} ({m}): an adaptive pool to {size} from {shape[1:]} "
                                 "does not export")
        elif isinstance(m, nn.Flatten):
            if len(shape) == 3:
                flat_from = shape
                out.append((L.Flatten(), []))
                shape = (shape[0] * shape[1] * shape[2],)
        elif isinstance(m, nn.Linear):
            kernel = m.weight.detach().t()
            if flat_from is not None:  # PyTorch flattened C-H-W; Keras flattens H-W-C
                c, h, w = flat_from
                kernel = kernel.reshape(c, h, w, -1).permute(1, 2, 0, 3).reshape(c * h * w, -1)
                flat_from = None
            weights = [kernel.numpy()] + ([m.bias.detach().numpy()] if m.bias is not None else [])
            out.append((L.Dense(m.out_features, use_bias=m.bias is not None,
                                activation="softmax" if i == last_dense else None), weights))
            shape = (m.out_features,)
        elif isinstance(m, nn.Identity):
            continue
        else:
            raise UsageError(f"layer {i} ({type(m).__name__}) has no Keras layer vggkit writes")
    return out


def export_keras(checkpoint: str | Path, path: str | Path, *, overwrite: bool = False,
                 classes_file: str | Path | None = None) -> dict[str, Any]:
    keras = _keras()
    path = Path(path)
    if path.suffix != ".keras":
        raise UsageError(f"--keras {path}: the file name must end in .keras (Keras 3's format)")
    if path.exists() and not overwrite:
        raise UsageError(f"--keras {path} exists; pass --overwrite to replace it")
    model, ckpt = load_model(checkpoint, classes_file)
    model = model.float().eval()
    c, side = int(ckpt.meta["image_shape"][0]), int(ckpt.meta["image_shape"][-1])
    if any(type(m).__name__ == "Scale" for m in model.modules()):
        raise UsageError(f"{checkpoint}: its scaled logits (vgg_airbench's head) have no Keras "
                         "layer vggkit writes")
    pairs = keras_layers(model, side, keras)
    net = keras.Sequential([keras.Input((side, side, c))] + [layer for layer, _ in pairs])
    for layer, weights in pairs:
        if weights:
            layer.set_weights(weights)
    x = np.random.default_rng(0).uniform(0, 1, (2, side, side, c)).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
    last = net.layers[-1]
    last.activation = keras.activations.linear
    theirs = np.asarray(keras.ops.convert_to_numpy(net(x, training=False)))
    last.activation = keras.activations.softmax
    diff = float(np.abs(ours - theirs).max())
    if diff > TOLERANCE * max(1.0, float(np.abs(ours).max())):
        raise UsageError(f"--keras: Keras's logits differ from vggkit's by {diff:.2e}; not written")
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save(path)
    return {"path": str(path), "layers": len(net.layers), "max_abs_diff": diff,
            "input_shape": [side, side, c], "classes": list(ckpt.meta["classes"])}
