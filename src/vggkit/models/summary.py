"""A Keras-style model summary: layer, output shape, parameters, and the three totals."""

from __future__ import annotations

import torch
from torch import nn

from vggkit.models.registry import count_parameters


def summary_rows(model: nn.Module, input_shape: tuple[int, int, int]) -> list[dict]:
    """One row per leaf layer in execution order: name, type, output shape, parameters
    (moving statistics of BatchNorm included, as Keras counts them)."""
    rows: list[dict] = []
    hooks = []

    def record(name: str):
        def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            params += sum(
                b.numel()
                for n, b in module.named_buffers(recurse=False)
                if n in ("running_mean", "running_var")
            )
            rows.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "output_shape": [None, *output.shape[1:]],
                    "params": params,
                }
            )

        return hook

    for name, module in model.named_modules():
        if name and not list(module.children()) and not isinstance(module, nn.Identity):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def summary_dict(model: nn.Module, input_shape: tuple[int, int, int], name: str = "") -> dict:
    return {
        "model": name,
        "input_shape": [None, *input_shape],
        "layers": summary_rows(model, input_shape),
        **{f"{k}_params": v for k, v in count_parameters(model).items()},
    }


def format_summary(info: dict) -> str:
    """Render ``summary_dict`` as Keras prints ``model.summary()``."""
    header = ("Layer (type)", "Output Shape", "Param #")
    body = [
        (
            f"{row['name']} ({row['type']})",
            "(" + ", ".join("None" if d is None else str(d) for d in row["output_shape"]) + ")",
            f"{row['params']:,}",
        )
        for row in info["layers"]
    ]
    widths = [max(len(r[i]) for r in [header, *body]) + 2 for i in range(3)]
    width = sum(widths)
    line = lambda cells: "".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w - 2) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    out = [f'Model: "{info["model"]}"', "_" * width, line(header), "=" * width]
    for i, row in enumerate(body):
        out.append(line(row))
        out.append("_" * width if i < len(body) - 1 else "=" * width)
    out += [
        f"Total params: {info['total_params']:,}",
        f"Trainable params: {info['trainable_params']:,}",
        f"Non-trainable params: {info['non_trainable_params']:,}",
    ]
    return "\n".join(out)
