"""Inference speed: PyTorch (vggkit's engine, and plain fp32 eager) against the exported ONNX
model in onnxruntime. Images/s at batch 256 and latency at batch 1, alternating in one process.

    python bench/inference.py --quick     # vgg16_bn + compact
    python bench/inference.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402
from train_step import NETS, build  # noqa: E402
from vggkit.training.engine import make_engine, predict_logits  # noqa: E402


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nets", nargs="*", choices=list(NETS))
    ap.add_argument("--windows", type=int, default=0)
    ap.add_argument("--no-record", dest="record", action="store_false")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    names = args.nets or (["vgg16_bn", "vgg_compact"] if args.quick else list(NETS))
    windows = args.windows or (3 if args.quick else 5)
    engine = make_engine("cpu", "auto", channels_last=True, compile=False)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="vggkit-onnx-"))
    for name in names:
        plain = build(name).eval()
        fast = engine.prepare(build(name)).eval()
        path = tmp / f"{name}.onnx"
        export_onnx(plain, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        g = torch.Generator().manual_seed(0)
        big, one = torch.randn(256, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)
        bigf, onef = engine.to_input(big), engine.to_input(one)
        bign, onen = big.numpy(), one.numpy()
        # agreement of the three on the same batch
        with torch.no_grad():
            ref = plain(big)
        err_onnx = float(np.abs(sess.run(None, {"images": bign})[0] - ref.numpy()).max())
        agree = float((predict_logits(fast, bigf, engine).argmax(1) == ref.argmax(1)).float().mean())

        def torch_plain(x):
            with torch.no_grad():
                plain(x)

        variants_big = {"plain": lambda: torch_plain(big), "vggkit": lambda: predict_logits(fast, bigf, engine),
                        "onnx": lambda: sess.run(None, {"images": bign})}
        variants_one = {"plain": lambda: torch_plain(one), "vggkit": lambda: predict_logits(fast, onef, engine),
                        "onnx": lambda: sess.run(None, {"images": onen})}
        for v in (*variants_big.values(), *variants_one.values()):
            v()
        tb = C.interleave(variants_big, windows, 1 if "compact" not in name else 4)
        reps = 20 if "compact" not in name else 100
        t1 = C.interleave(variants_one, windows, reps)
        row = [name] + [f"{256 / C.median(tb[k]):,.0f}" for k in variants_big] + \
              [f"{C.median(t1[k]) * 1e3:.2f}" for k in variants_one] + \
              [f"{C.median(tb['plain']) / C.median(tb['onnx']):.2f}x", f"{err_onnx:.1e}", f"{agree:.1%}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["network", "PyTorch fp32 img/s (b256)", f"vggkit {engine.precision} img/s", "ONNX Runtime fp32 img/s",
              "PyTorch fp32 ms (b1)", f"vggkit {engine.precision} ms", "ONNX Runtime ms",
              "ORT / PyTorch fp32 (b256)", "ORT max |diff|", f"vggkit {engine.precision} top-1 agreement"]
    table = C.markdown_table(header, rows)
    print(table)
    if args.record:
        C.record("inference" + ("_quick" if args.quick else ""),
                 f"Command: `{C.command_line()}`\n\nMachine: {C.machine_line()}; onnxruntime "
                 f"{ort.__version__}\n\nEval mode, random 3x32x32 input; throughput at batch 256, "
                 f"latency at batch 1; median of {windows} alternating windows. The ONNX model is the "
                 f"fp32 export (TorchScript exporter, dynamic batch) run by the CPU execution "
                 f"provider with {torch.get_num_threads()} intra-op threads.\n\n{table}\n")


if __name__ == "__main__":
    main()
