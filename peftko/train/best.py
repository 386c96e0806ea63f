"""Keeping the adapter with the lowest held-out loss: a small corpus is memorised within a few
passes on a pretrained base (its held-out loss falls, then rises), and the user should get the
adapter from before that, and hear that it happened.

The trainable weights (LoRA and the marker rows: a few MB) are copied to the CPU at each new lowest
held-out loss; at the end they are put back if a later evaluation was worse. The copy lives in
memory only: after --resume, the lowest is taken among the evaluations since the resume.

The weights before the first step (LoRA at zero, the marker rows as registered) are copied too: when
every trained state is worse on the held-out text than that, the run keeps it (back_to_registered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from peftko.core import distributed
from peftko.core.progress import say, warn
from peftko.run.records import worse_after_training


@dataclass
class Best:
    loss: float
    step: int
    weights: dict[str, torch.Tensor]


class KeepBest(TrainerCallback):
    """Remembers the weights at the lowest eval_loss; warns when an evaluation is worse than it."""

    def __init__(self, model):
        self.model = model
        self.best: Best | None = None
        self.last: tuple[float, int] | None = None  # (eval_loss, step) of the latest evaluation
        self.initial: dict[str, torch.Tensor] | None = None  # before the first step; None after a resume

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.initial = self._copy()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not math.isfinite(loss):
            return
        self.last = (loss, state.global_step)
        if self.best is None or loss < self.best.loss:
            self.best = Best(loss, state.global_step, self._copy())
            return
        distributed.on_main(lambda: say(
            f"note: held-out loss rose to {loss:.4f} at step {state.global_step} (lowest {self.best.loss:.4f} at "
            f"step {self.best.step}): the model is starting to memorise the training books", err=True))

    def _copy(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self) -> Best | None:
        """Put the best weights back when a later evaluation was worse; the Best restored, or None."""
        if self.best is None or self.last is None or self.last[1] == self.best.step:
            return None
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.best.weights:
                    p.copy_(self.best.weights[name].to(p.device))
        return self.best

    def restore_initial(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.initial:
                    p.copy_(self.initial[name].to(p.device))


def back_to_registered(keeper: KeepBest | None, keep_best: bool, bpc_before: float | None,
                       bpc_after: float | None) -> bool:
    """When the trained adapter is worse on the held-out text than the markers as registered, put
    the registered-only state back (True), or say why it cannot be (False)."""
    if not worse_after_training(bpc_before, bpc_after):
        return False
    if keeper is None or keeper.initial is None:
        why = ("keep_best is off (--no-keep-best)" if not keep_best else
               "the run was resumed, and the weights from before its first step are not kept across a resume")
        distributed.on_main(lambda: warn(
            f"keep_best: the trained adapter is kept although the markers as registered did better on the held-out "
            f"documents ({bpc_before:.3f} against {bpc_after:.3f} bits per character): {why}"))
        return False
    keeper.restore_initial()
    distributed.on_main(lambda: say(
        f"kept the adapter as registered, before any step: training made the held-out documents harder to predict "
        f"({bpc_after:.3f} bits per character after training, {bpc_before:.3f} with the markers registered). "
        "Lower --lr, train fewer steps or add text; --no-keep-best keeps the last step's"))
    return True
