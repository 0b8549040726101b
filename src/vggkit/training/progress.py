"""Progress within an epoch: a tqdm bar on a terminal, one updating bar per epoch in a
Jupyter notebook (tqdm.auto's widget, kept as Keras's ``fit`` keeps its lines), and elsewhere
(nohup, CI logs, ``| tee``) one plain log line every ``log_every`` seconds, so a long epoch
is never silent."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("vggkit.train")

REFRESH_SECONDS = 0.5  # how often the loop reads the device-side sums (a sync)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def in_notebook() -> bool:
    """A Jupyter kernel (not a terminal IPython): its output is not a tty but shows widgets."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class Progress:
    """``steps`` batches of one epoch, ``first`` of them already done (a resume)."""

    def __init__(self, steps: int, first: int, epoch: int, epochs: int, images_per_step: int,
                 *, enabled: bool, log_every: float = 30.0) -> None:
        self.steps, self.first, self.epoch, self.epochs = steps, first, epoch, epochs
        self.images_per_step = images_per_step
        self.start = self.last_refresh = self.last_line = time.perf_counter()
        self.done = first
        self.bar = None
        self.log_every = log_every if enabled else 0.0
        notebook = enabled and in_notebook()
        if enabled and (notebook or sys.stderr.isatty()):
            if notebook:
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}/{epochs}",
                            unit="batch", leave=notebook, dynamic_ncols=True, file=sys.stderr)
            self.log_every = 0.0

    def due(self) -> bool:
        """Time to read the sums again (at most every REFRESH_SECONDS)."""
        return time.perf_counter() - self.last_refresh > REFRESH_SECONDS

    def show(self, done: int, loss: float, acc: float) -> None:
        """``done`` batches of the epoch finished, with the running loss and accuracy."""
        now = time.perf_counter()
        rate = (done - self.first) * self.images_per_step / max(1e-9, now - self.start)
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.2f}%",
                                 img_s=f"{rate:,.0f}", refresh=False)
        elif self.log_every and now - self.last_line >= self.log_every and done < self.steps:
            per_step = (now - self.start) / max(1, done - self.first)
            log.info("epoch %d/%d  step %d/%d  loss %.4f  acc %.2f%%  %s img/s  ETA %s",
                     self.epoch, self.epochs, done, self.steps, loss, 100 * acc,
                     f"{rate:,.0f}", format_eta(per_step * (self.steps - done)))
            self.last_line = now
        self.done, self.last_refresh = done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
