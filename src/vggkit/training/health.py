"""Training health checks: one-line findings about a run that is not learning, never fatal.

Pure functions of plain data (the metrics.jsonl records so far and a few facts about the
run), plus two cheap probes for the loop: :func:`grad_norm` and :func:`dead_relu_probe`.
Each finding says what it means for this model and what to try.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CHANCE_MARGIN = 0.02  # train accuracy this close to 1/classes counts as chance
PLATEAU_EPOCHS = 3  # epochs in a row without a lower train loss
SETTLED_LOSS = 0.01  # below this a flat loss or tiny gradient just means it has fit
GRAD_EXPLODE = 1e3
GRAD_GROWTH = 100.0  # times the first measured norm
GRAD_VANISH = 1e-7
ADAM_HIGH_LR = 3e-3  # above this Adam/AdamW often wrecks a VGG without BatchNorm
LOW_LR = {"sgd": 1e-4, "adam": 1e-6, "adamw": 1e-6}  # at or below: too low to move
# A BatchNorm that divides its input by more than BN_GAIN, after PLAIN_RUN or more weight
# layers without one, multiplies their gradients by as much; under SGD the step then moves
# them by more than LARGE_STEP of their norm (lr * |grad| / |weight| / (1 - momentum)).
BN_GAIN = 20.0
PLAIN_RUN = 4
LARGE_STEP = 0.01
# The rate the advice names makes the median step about this: on the CIFAR-10 zip the faithful
# VGG-19 BN-head recipe steps 2.1% (gain 103x) and stalls; --lr 0.002 (0.4%), one-cycle, learned
# best in 2-epoch probes (0.001 and 0.004 less well) and is its strong recipe's rate.
TARGET_STEP = 0.004
# bn-stats: after the first epoch, validation with every BatchNorm's statistics computed again
# on BN_PROBE_IMAGES clean training images beats the running averages by at least this. VGG-19
# with the BatchNorm head, 4 epochs into its strong recipe on the CIFAR-10 zip: 4% -> 52%.
STALE_BN_GAIN = 0.05
BN_PROBE_IMAGES = 5120
# ... measured only after a first epoch of at least this many steps: before that, running
# averages (momentum 0.1) still carry their start, and any short run would be told.
BN_PROBE_MIN_STEPS = 100


@dataclass(frozen=True)
class Finding:
    code: str  # chance | plateau | nonfinite | grad-explode | grad-vanish | dead-relu | bn-gain
    #          | bn-stats | unbalanced
    message: str
    epoch: int

    def __str__(self) -> str:
        return f"health (epoch {self.epoch}): {self.message}"


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def bn_variant(model_name: str) -> str | None:
    """The registered BatchNorm twin of a plain VGG (vgg16 -> vgg16_bn), if any."""
    from vggkit.models.registry import ARCHITECTURES

    twin = f"{model_name}_bn"
    return twin if twin in ARCHITECTURES else None


def lr_advice(*, model_name: str, has_batchnorm: bool, optimizer: str, lr: float) -> str:
    """What to try when the run does not learn, for this model, optimizer and rate."""
    if lr <= LOW_LR.get(optimizer, 0.0):
        return f"--lr {lr:g} may be too low to move the weights: try 10x more"
    if optimizer in ("adam", "adamw") and lr > ADAM_HIGH_LR:
        advice = f"stuck with --optimizer {optimizer} --lr {lr:g}: try --lr 1e-3"
        twin = None if has_batchnorm else bn_variant(model_name)
        return advice + (f", or {twin} (with BatchNorm)" if twin else "")
    if not has_batchnorm:
        twin = bn_variant(model_name)
        return (f"{model_name} has no BatchNorm; at --lr {lr:g} it often stays at chance: "
                f"try --lr {lr / 10:g} --warmup-epochs 2" + (f", or {twin}" if twin else ""))
    return (f"check that the labels match the images, then try a lower --lr (now {lr:g}, "
            f"e.g. {lr / 10:g}) or --warmup-epochs 2")


def nonfinite_advice(*, model_name: str, has_batchnorm: bool, optimizer: str, lr: float,
                     precision: str = "fp32") -> str:
    """Advice to append to the trainer's NonFiniteLoss message."""
    tips = [f"--lr {lr / 10:g}", "--warmup-epochs 2"]
    if not has_batchnorm and bn_variant(model_name):
        tips.append(bn_variant(model_name))
    if precision == "fp16":
        tips.append("--precision bf16 or fp32")
    return (f"{model_name} diverged with --optimizer {optimizer} --lr {lr:g}; try "
            + ", ".join(tips[:-1]) + f" or {tips[-1]}")


# ----------------------------------------------------------------------------- checks
def check_chance(history: Sequence[dict[str, Any]], num_classes: int, advice: str
                 ) -> Finding | None:
    """Train accuracy within 2 points of chance, from the second epoch on (the first
    epoch's average includes its untrained start)."""
    if len(history) < 2 or num_classes < 2:
        return None
    last = history[-1]
    chance = 1.0 / num_classes
    if not abs(last["train_acc"] - chance) <= CHANCE_MARGIN:  # NaN is no finding here
        return None
    return Finding("chance", f"train accuracy {last['train_acc']:.1%} is chance for "
                   f"{num_classes} classes ({chance:.1%}): it learns nothing. {advice}",
                   last["epoch"])


def check_plateau(history: Sequence[dict[str, Any]]) -> Finding | None:
    """The train loss did not go down for PLATEAU_EPOCHS epochs in a row (and has not
    simply reached zero)."""
    if len(history) <= PLATEAU_EPOCHS:
        return None
    losses = [r["train_loss"] for r in history[-PLATEAU_EPOCHS - 1:]]
    if not all(map(math.isfinite, losses)) or losses[-1] < SETTLED_LOSS:
        return None
    if any(later < earlier for earlier, later in zip(losses, losses[1:])):
        return None
    last = history[-1]
    return Finding("plateau", f"train loss has not decreased for {PLATEAU_EPOCHS} epochs "
                   f"({losses[0]:.4f} -> {losses[-1]:.4f}) at lr {last.get('lr', 0):.3g}: the "
                   "rate is too high for this stage or the model has stalled; try a lower "
                   "--lr or a decaying --schedule (cosine, onecycle)", last["epoch"])


def check_nonfinite(history: Sequence[dict[str, Any]], advice: str) -> Finding | None:
    last = history[-1]
    bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(last.get(k, 0.0))]
    if not bad:
        return None
    return Finding("nonfinite", f"{' and '.join(bad)} is {last[bad[0]]}: {advice}",
                   last["epoch"])


def check_grad_norms(grad_norms: Sequence[float], train_loss: float, epoch: int,
                     advice: str) -> Finding | None:
    """The latest gradient norm against fixed bounds and the first one measured."""
    if not grad_norms:
        return None
    now, first = grad_norms[-1], grad_norms[0]
    if not math.isfinite(now) or now > GRAD_EXPLODE or (
            len(grad_norms) > 1 and first > 0 and now > GRAD_GROWTH * first):
        grown = (f", {now / first:.0f}x the first ({first:.3g})"
                 if len(grad_norms) > 1 and first > 0 else "")
        return Finding("grad-explode", f"gradient norm {now:.3g}{grown}: the steps are "
                       f"exploding and the run is about to diverge. {advice}", epoch)
    if now < GRAD_VANISH and train_loss > SETTLED_LOSS:
        return Finding("grad-vanish", f"gradient norm {now:.3g} while the train loss is still "
                       f"{train_loss:.4f}: the gradients vanish, nothing updates. {advice}",
                       epoch)
    return None


def check_dead_relus(dead: Sequence[str], model_name: str, epoch: int, advice: str
                     ) -> Finding | None:
    if not dead:
        return None
    shown = ", ".join(dead[:4]) + (", ..." if len(dead) > 4 else "")
    return Finding("dead-relu", f"{len(dead)} ReLU layer(s) of {model_name} output only zeros "
                   f"on a batch ({shown}): no gradient passes them, usually after too large a "
                   f"step. {advice}", epoch)


@dataclass(frozen=True)
class BnGain:
    """What one BatchNorm layer did to the run's first step: the std of its input, how many
    weight layers without BatchNorm come right before it, and the median relative SGD step
    of those layers (lr * |grad| / |weight| / (1 - momentum), at each layer's own rate)."""
    layer: str
    input_std: float
    plain_layers: int
    median_step: float
    in_features: bool = False  # all those layers are the model's convolutional features
    features_lr_scale: float = 1.0  # the run's --features-lr-scale, already in median_step


def nice_rate(lr: float) -> float:
    """``lr`` rounded to the nearest (in log) of 1, 2 or 5 times a power of ten
    (0.00095 -> 0.001, 0.0032 -> 0.002)."""
    exponent = math.floor(math.log10(lr))
    candidates = [m * 10.0 ** e for e in (exponent, exponent + 1) for m in (1, 2, 5)]
    return min(candidates, key=lambda c: abs(math.log(c / lr)))


def check_bn_gain(gains: Sequence[BnGain], lr: float, epoch: int) -> Finding | None:
    """A BatchNorm that amplifies the gradients of the plain layers before it so much that
    the run's rate moves them by several percent a step (VGG-19 with the BatchNorm head).
    When those layers are the convolutional features, the advice slows them alone
    (--features-lr-scale) and leaves the head its rate: on the CIFAR-10 zip that trained
    better than one low rate for all (2-epoch probes, 44.5% against 37.85% validation)."""
    bad = [g for g in gains if g.input_std > 0 and 1 / g.input_std > BN_GAIN
           and g.plain_layers >= PLAIN_RUN and g.median_step > LARGE_STEP]
    if not bad:
        return None
    g = max(bad, key=lambda g: g.median_step)
    scaled = ("" if g.features_lr_scale == 1 else
              f" x {g.features_lr_scale:g} (--features-lr-scale)")
    shrink = TARGET_STEP / g.median_step
    if g.in_features:
        scale = nice_rate(g.features_lr_scale * shrink)
        fix = (f"Try --features-lr-scale {scale:g} (the convolutions at {lr * scale:g}, the "
               f"head keeps --lr {lr:g}), which makes that step ~{TARGET_STEP:.1%}")
    else:
        fix = (f"Try --lr {nice_rate(lr * g.features_lr_scale * shrink):g}, which makes that "
               f"step ~{TARGET_STEP:.1%}")
    return Finding("bn-gain", f"the BatchNorm {g.layer}, after {g.plain_layers} layers without "
                   f"BatchNorm, divides an input of std {g.input_std:.2g}: it scales their "
                   f"gradients up ~{1 / g.input_std:.0f}x, so at --lr {lr:g}{scaled} each step "
                   f"moves them by {g.median_step:.0%} of their weights (median). {fix}, and "
                   f"--precise-bn {BN_PROBE_IMAGES}: behind such a run the running statistics "
                   "can miss what evaluation feeds it", epoch)


def check_bn_stats(running_acc: float, precise_acc: float, images: int, epoch: int
                   ) -> Finding | None:
    """Validation is much better with the BatchNorm statistics computed again on clean
    training images: the running averages (under augmentation, dropout and moving weights)
    misjudge what evaluation feeds the network."""
    if precise_acc - running_acc < STALE_BN_GAIN:
        return None
    return Finding("bn-stats", f"validation scores {running_acc:.1%} with the BatchNorm running "
                   f"statistics and {precise_acc:.1%} with them computed again on {images:,} "
                   "training images without augmentation or dropout: the running averages "
                   "of training do not fit the network that evaluation sees. Try --precise-bn "
                   f"{images}", epoch)


def check_epoch(history: Sequence[dict[str, Any]], *, model_name: str, has_batchnorm: bool,
                optimizer: str, lr: float, num_classes: int, grad_norms: Sequence[float] = (),
                dead_relu_layers: Sequence[str] = (), bn_gains: Sequence[BnGain] = ()
                ) -> list[Finding]:
    """Everything that looks wrong after the last epoch of ``history`` (metrics.jsonl
    records: epoch, train_loss, train_acc, val_loss, val_acc, lr). ``lr`` is the --lr the
    user set; ``grad_norms`` the norms measured so far (one an epoch, this epoch's last);
    ``dead_relu_layers`` what :func:`dead_relu_probe` found this epoch; ``bn_gains`` what
    :func:`bn_gain_probe` measured on the run's first step. Use :func:`fresh`
    to report each kind once."""
    if not history:
        return []
    facts = dict(model_name=model_name, has_batchnorm=has_batchnorm, optimizer=optimizer, lr=lr)
    advice = lr_advice(**facts)
    last = history[-1]
    found = [
        check_nonfinite(history, nonfinite_advice(**facts)),
        check_chance(history, num_classes, advice),
        check_plateau(history),
        check_grad_norms(grad_norms, last["train_loss"], last["epoch"], advice),
        check_dead_relus(list(dead_relu_layers), model_name, last["epoch"], advice),
        check_bn_gain(bn_gains, lr, last["epoch"]) if optimizer == "sgd" else None,
    ]
    return [f for f in found if f is not None]


def fresh(findings: Sequence[Finding], seen: set[str]) -> list[Finding]:
    """The findings whose code is not in ``seen`` (which this updates): one line each per
    run, not one per epoch while the problem lasts."""
    new = [f for f in findings if f.code not in seen]
    seen.update(f.code for f in new)
    return new


# ----------------------------------------------------------------------------- probes
def grad_norm(model: nn.Module, scale: float = 1.0) -> float:
    """Total L2 norm of the parameters' .grad (after backward, before the next zero_grad).
    ``scale``: a GradScaler's scale, for gradients read before ``scaler.step`` (which
    unscales them in place: after a TrainStep leave it at 1). One device sync."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float())
             for p in model.parameters() if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms))) / scale


@dataclass
class ReluProbe:
    dead: list[str] = field(default_factory=list)  # filled when the with-block ends


@contextlib.contextmanager
def dead_relu_probe(model: nn.Module) -> Iterator[ReluProbe]:
    """For the first forward pass inside the block, which nn.ReLU layers output only zeros
    (by module name); the hooks are removed on leaving. Give it the bare model, not a
    DistributedDataParallel or torch.compile wrapper."""
    probe = ReluProbe()
    alive: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _args, output):
            if name not in alive:  # the first batch only
                # above zero, not non-zero: a ReLU fused into the BatchNorm after it passes
                # its input through, and that answers as the ReLU's output would
                alive[name] = output.detach().gt(0).any()  # a device tensor: no sync here
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules()
               if isinstance(m, nn.ReLU)]
    try:
        yield probe
    finally:
        for handle in handles:
            handle.remove()
    probe.dead.extend(name for name, any_alive in alive.items() if not bool(any_alive))


def plain_runs(model: nn.Module) -> dict[str, list[str]]:
    """For each BatchNorm layer (by module name), the weights of the convolutions and dense
    layers right before it with no BatchNorm between, in module order (VGG's forward order)."""
    runs: dict[str, list[str]] = {}
    plain: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            plain.append(f"{name}.weight")
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            runs[name], plain = plain, []
    return runs


@contextlib.contextmanager
def bn_gain_probe(model: nn.Module, lr: float, momentum: float,
                  features_lr_scale: float = 1.0) -> Iterator[list[BnGain]]:
    """Around one training step (forward, backward, optimizer step): the input std of each
    BatchNorm that follows PLAIN_RUN or more plain weight layers, and those layers' median
    relative step, filled in when the block ends (the gradients are still there). The
    layers of ``model.features`` step at ``features_lr_scale`` times ``lr``."""
    gains: list[BnGain] = []
    runs = {name: run for name, run in plain_runs(model).items() if len(run) >= PLAIN_RUN}
    stds: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name: str):
        def hook(_module, args):
            stds.setdefault(name, args[0].detach().float().std())
        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in runs]
    try:
        yield gains
    finally:
        for handle in handles:
            handle.remove()
    params = dict(model.named_parameters())
    for name, std in stds.items():
        in_features = all(w.startswith("features.") for w in runs[name])
        steps = [lr * (features_lr_scale if w.startswith("features.") else 1.0)
                 * float(params[w].grad.norm() / params[w].detach().norm()) / (1 - momentum)
                 for w in runs[name] if params[w].grad is not None]
        if steps:
            gains.append(BnGain(name, float(std), len(runs[name]),
                                sorted(steps)[len(steps) // 2], in_features,
                                features_lr_scale if in_features else 1.0))


# ----------------------------------------------------------------------------- the loop's monitor
class HealthMonitor:
    """What the training loop keeps for the checks: the facts of the run, a dead-ReLU probe
    on each epoch's first batch, the gradient norm after its last, and the findings so far
    (each kind reported once)."""

    def __init__(self, model: nn.Module, *, model_name: str, optimizer: str, lr: float,
                 num_classes: int, probe_relus: bool = True, momentum: float = 0.0,
                 features_lr_scale: float = 1.0) -> None:
        self.model = model
        self.facts = dict(model_name=model_name, has_batchnorm=has_batchnorm(model),
                          optimizer=optimizer, lr=lr)
        self.num_classes = num_classes
        self.probe_relus = probe_relus  # off under torch.compile: hooks force recompiles
        self.grad_norms: list[float] = []
        self.dead: list[str] = []
        self.momentum = momentum
        self.features_lr_scale = features_lr_scale
        self.bn_gains: list[BnGain] = []
        self.seen: set[str] = set()
        self.findings: list[Finding] = []

    @contextlib.contextmanager
    def watch_step(self, first_of_epoch: bool, first_of_run: bool = False) -> Iterator[None]:
        """Probes the step when it is the epoch's first (dead ReLUs) or the run's first
        (BatchNorm gain; a resumed run's first step is not the run's)."""
        if not (first_of_epoch and self.probe_relus):
            yield
            return
        gains = (bn_gain_probe(self.model, self.facts["lr"], self.momentum, self.features_lr_scale)
                 if first_of_run and self.facts["optimizer"] == "sgd" else
                 contextlib.nullcontext([]))
        with dead_relu_probe(self.model) as probe, gains as measured:
            yield
        self.dead = list(probe.dead)
        self.bn_gains.extend(measured)

    def after_last_step(self) -> None:
        self.grad_norms.append(grad_norm(self.model))

    def end_epoch(self, history: Sequence[dict[str, Any]]) -> list[Finding]:
        """The new findings after this epoch's metrics line."""
        found = fresh(check_epoch(history, **self.facts, num_classes=self.num_classes,
                                  grad_norms=self.grad_norms, dead_relu_layers=self.dead,
                                  bn_gains=self.bn_gains),
                      self.seen)
        self.findings.extend(found)
        return found

    def note(self, finding: Finding | None) -> Finding | None:
        """A finding measured outside the epoch's metrics (``bn-stats``)."""
        if finding is not None:
            self.findings.append(finding)
        return finding

    def nonfinite_advice(self, precision: str) -> str:
        return nonfinite_advice(**self.facts, precision=precision)
