"""The Keras peer: the same networks trained with Keras ``model.fit`` on TensorFlow (CPU), in
fp32 and mixed_bfloat16, against vggkit's engine and two plain PyTorch loops (fp32 NCHW, and bf16
autocast + channels_last), so the README can state vggkit's ratio to what Keras users run today.

TensorFlow is installed from pip (``tensorflow-cpu``) into a virtual environment this script
creates (default /tmp/vggkit-keras-venv); vggkit's side runs in the current interpreter. Each
measurement is a fresh subprocess, and the five contenders alternate round by round (the host's
speed swings), so compare the ratios of one run.

    python bench/keras_peer.py --quick     # vgg16_bn + compact, 2 rounds
    python bench/keras_peer.py             # all five networks, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NETS = ["vgg11_bn", "vgg16_bn", "vgg19_bn", "vgg_compact", "vgg16_bn+4096"]
CONFIGS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                 512, 512, 512, 512, "M"],
    "vgg_compact": [32, 32, "M", 64, 64, "M", 128, 128, "M"],
}
TF_PACKAGE = "tensorflow-cpu"


# ---------------------------------------------------------------------------------- Keras side
def keras_model(net: str):
    import keras
    from keras import layers

    base = net.split("+")[0]
    compact = base == "vgg_compact"
    model = keras.Sequential([keras.Input((32, 32, 3))])
    pool = 0
    for item in CONFIGS[base]:
        if item == "M":
            model.add(layers.MaxPooling2D(2))
            if compact:
                model.add(layers.Dropout((0.2, 0.3, 0.4)[pool]))
            pool += 1
            continue
        model.add(layers.Conv2D(item, 3, padding="same"))
        if compact:  # conv-ReLU-BN, as the compact Keras tutorial net
            model.add(layers.ReLU())
            model.add(layers.BatchNormalization())
        else:
            model.add(layers.BatchNormalization())
            model.add(layers.ReLU())
    model.add(layers.Flatten())
    if compact:
        for width in (1024, 100):
            model.add(layers.Dense(width, activation="relu"))
            model.add(layers.BatchNormalization())
            if width == 1024:
                model.add(layers.Dropout(0.5))
    elif net.endswith("+4096"):
        for _ in range(2):
            model.add(layers.Dense(4096, activation="relu"))
            model.add(layers.Dropout(0.5))
    model.add(layers.Dense(10, dtype="float32"))
    return model


def keras_inner(net: str, precision: str, batch: int, steps: int, epochs: int) -> dict:
    import time

    import keras
    import numpy as np

    if precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = keras_model(net)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch * steps)

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            self.batches, self.epochs, self.t = [], [], 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.e0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(time.perf_counter() - self.e0)

        def on_train_batch_begin(self, b, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, b, logs=None):
            self.batches.append(time.perf_counter() - self.t)

    timer = Timer()
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[timer])
    total = time.perf_counter() - t0
    steady = timer.batches[steps:]  # epoch 0 holds tracing and graph compilation
    return {"img_s": batch / statistics.median(steady),
            "fit_img_s": batch * steps * (epochs - 1) / sum(timer.epochs[1:]),
            "first_epoch_s": timer.epochs[0], "total_s": total}


# -------------------------------------------------------------------------------- PyTorch side
def torch_inner(net: str, which: str, batch: int, steps: int) -> dict:
    import time

    import train_step as T

    class A:
        precision, compile, threads = "auto", False, None

    fn = {"plain": lambda: T.plain_fp32_loop(net, batch),
          "plain-bf16": lambda: T.plain_bf16_loop(net, batch),
          "vggkit": lambda: T.vggkit_loop(net, batch, A)[0]}[which]()
    fn()
    fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"img_s": batch / statistics.median(ts)}


# ------------------------------------------------------------------------------------- driver
def ensure_venv(path: Path) -> Path | None:
    """The venv's python with tensorflow-cpu importable, or None (with the reason printed)."""
    py = path / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import tensorflow, keras"],
                                      capture_output=True).returncode == 0:
        return py
    print(f"creating {path} and installing {TF_PACKAGE} from pip ...", flush=True)
    if not py.exists():
        venv.create(path, with_pip=True)
    versions = subprocess.run([py, "-m", "pip", "index", "versions", TF_PACKAGE],
                              capture_output=True, text=True)
    print(versions.stdout.strip().splitlines()[0] if versions.returncode == 0 else
          f"pip index versions {TF_PACKAGE} failed: {versions.stderr.strip()[-300:]}")
    inst = subprocess.run([py, "-m", "pip", "install", "-q", TF_PACKAGE], capture_output=True, text=True)
    if inst.returncode != 0:
        print(f"CANNOT INSTALL {TF_PACKAGE} here, so there is no Keras peer on this machine:\n"
              f"{inst.stderr.strip()[-1500:]}")
        return None
    return py


def sub(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(cmd[:4])}... failed:\n{out.stderr[-2000:]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nets", nargs="*", choices=NETS)
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=0, help="batches per epoch")
    ap.add_argument("--venv", default="/tmp/vggkit-keras-venv")
    ap.add_argument("--no-record", dest="record", action="store_false")
    ap.add_argument("--inner", nargs=2, metavar=("SIDE", "NET"), help=argparse.SUPPRESS)
    ap.add_argument("--which", default="bf16", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    nets = args.nets or (["vgg16_bn", "vgg_compact"] if args.quick else NETS)

    def steps_for(net):
        return args.steps or (12 if "compact" in net else (3 if args.quick else 4))

    if args.inner:
        side, net = args.inner
        if side == "keras":
            res = keras_inner(net, args.which, args.batch, steps_for(net), epochs=2 if args.quick else 3)
        else:
            res = torch_inner(net, args.which, args.batch, steps_for(net))
        print(json.dumps(res))
        return

    rounds = args.rounds or (2 if args.quick else 3)
    py = ensure_venv(Path(args.venv))
    me = str(Path(__file__).resolve())
    if py is None:
        if args.record:
            C.record("keras_peer", f"Command: `{C.command_line()}`\n\nMachine: {C.machine_line()}\n\n"
                     f"**{TF_PACKAGE} could not be installed from pip here; no Keras figures.**\n")
        sys.exit(1)
    tf_version = subprocess.run([py, "-c", "import tensorflow as t, keras as k; print(t.__version__, k.__version__)"],
                                capture_output=True, text=True).stdout.split()
    rows = []
    for net in nets:
        res: dict[str, list[dict]] = {k: [] for k in ("keras fp32", "keras bf16", "plain", "plain-bf16", "vggkit")}
        for r in range(rounds):
            for key in res:
                if key.startswith("keras"):
                    cmd = [str(py), me, "--inner", "keras", net, "--which", key.split()[1]]
                else:
                    cmd = [sys.executable, me, "--inner", "torch", net, "--which", key]
                cmd += ["--batch", str(args.batch)] + (["--steps", str(args.steps)] if args.steps else [])
                cmd += ["--quick"] if args.quick else []
                res[key].append(sub(cmd))
                print(net, r, key, {k: round(v, 1) for k, v in res[key][-1].items()}, flush=True)
        med = {k: statistics.median(d["img_s"] for d in v) for k, v in res.items()}
        fit = {k: statistics.median(d["fit_img_s"] for d in v) for k, v in res.items() if k.startswith("keras")}
        ratios = [v["img_s"] / kb["img_s"] for v, kb in zip(res["vggkit"], res["keras bf16"])]
        rows.append([net, f"{med['keras fp32']:,.0f} ({fit['keras fp32']:,.0f})",
                     f"{med['keras bf16']:,.0f} ({fit['keras bf16']:,.0f})",
                     f"{med['plain']:,.0f}", f"{med['plain-bf16']:,.0f}", f"{med['vggkit']:,.0f}",
                     f"{med['vggkit'] / med['keras fp32']:.2f}x",
                     f"{statistics.median(ratios):.2f}x",
                     f"{med['vggkit'] / med['plain']:.2f}x", f"{med['vggkit'] / med['plain-bf16']:.2f}x"])
    header = ["network", "Keras fp32 img/s (fit incl. epoch ends)", "Keras mixed_bfloat16",
              "PyTorch plain fp32", "PyTorch bf16 autocast + channels_last", "vggkit",
              "vggkit / Keras fp32", "vggkit / Keras bf16 (per round)", "vggkit / PyTorch fp32",
              "vggkit / PyTorch bf16"]
    table = C.markdown_table(header, rows)
    print(table)
    if args.record:
        C.record("keras_peer" + ("_quick" if args.quick else ""),
                 f"Command: `{C.command_line()}`\n\nMachine: {C.machine_line()}; "
                 f"TensorFlow {tf_version[0]}, Keras {tf_version[1]} ({TF_PACKAGE} from pip in {args.venv})\n\n"
                 f"Batch {args.batch}, random 3x32x32 data, SGD-Nesterov, 10 classes. images/s is the "
                 f"median batch time after the first (compiling) epoch; in brackets Keras's whole-epoch "
                 f"throughput, which includes the end-of-epoch stalls. Each figure is the median of "
                 f"{rounds} rounds, each contender a fresh process, alternating.\n\n{table}\n")


if __name__ == "__main__":
    main()
