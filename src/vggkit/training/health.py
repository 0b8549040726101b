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


@dataclass(frozen=True)
class Finding:
    code: str  # chance | plateau | nonfinite | grad-explode | grad-vanish | dead-relu
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


def check_epoch(history: Sequence[dict[str, Any]], *, model_name: str, has_batchnorm: bool,
                optimizer: str, lr: float, num_classes: int, grad_norms: Sequence[float] = (),
                dead_relu_layers: Sequence[str] = ()) -> list[Finding]:
    """Everything that looks wrong after the last epoch of ``history`` (metrics.jsonl
    records: epoch, train_loss, train_acc, val_loss, val_acc, lr). ``lr`` is the --lr the
    user set; ``grad_norms`` the norms measured so far (one an epoch, this epoch's last);
    ``dead_relu_layers`` what :func:`dead_relu_probe` found this epoch. Use :func:`fresh`
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
                alive[name] = output.detach().ne(0).any()  # a device tensor: no sync here
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules()
               if isinstance(m, nn.ReLU)]
    try:
        yield probe
    finally:
        for handle in handles:
            handle.remove()
    probe.dead.extend(name for name, any_alive in alive.items() if not bool(any_alive))


# ----------------------------------------------------------------------------- the loop's monitor
class HealthMonitor:
    """What the training loop keeps for the checks: the facts of the run, a dead-ReLU probe
    on each epoch's first batch, the gradient norm after its last, and the findings so far
    (each kind reported once)."""

    def __init__(self, model: nn.Module, *, model_name: str, optimizer: str, lr: float,
                 num_classes: int, probe_relus: bool = True) -> None:
        self.model = model
        self.facts = dict(model_name=model_name, has_batchnorm=has_batchnorm(model),
                          optimizer=optimizer, lr=lr)
        self.num_classes = num_classes
        self.probe_relus = probe_relus  # off under torch.compile: hooks force recompiles
        self.grad_norms: list[float] = []
        self.dead: list[str] = []
        self.seen: set[str] = set()
        self.findings: list[Finding] = []

    @contextlib.contextmanager
    def watch_step(self, first_of_epoch: bool) -> Iterator[None]:
        if not (first_of_epoch and self.probe_relus):
            yield
            return
        with dead_relu_probe(self.model) as probe:
            yield
        self.dead = list(probe.dead)

    def after_last_step(self) -> None:
        self.grad_norms.append(grad_norm(self.model))

    def end_epoch(self, history: Sequence[dict[str, Any]]) -> list[Finding]:
        """The new findings after this epoch's metrics line."""
        found = fresh(check_epoch(history, **self.facts, num_classes=self.num_classes,
                                  grad_norms=self.grad_norms, dead_relu_layers=self.dead),
                      self.seen)
        self.findings.extend(found)
        return found

    def nonfinite_advice(self, precision: str) -> str:
        return nonfinite_advice(**self.facts, precision=precision)
