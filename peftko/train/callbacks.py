"""Trainer callbacks that tie a training run to the command around it."""

from __future__ import annotations

from transformers import TrainerCallback


class StopOnSignal(TrainerCallback):
    """In the train phase, a signal stops training at the end of the step, with a checkpoint
    (the handler and its phases: peftko.core.signals)."""

    def __init__(self, stopper):
        self.stopper = stopper

    def on_step_end(self, args, state, control, **kwargs):
        # Data-parallel, every rank stops after the same step, even if only one was signalled.
        if self.stopper.agreed():
            control.should_save = True
            control.should_training_stop = True
        return control


class BeforeFirstStep(TrainerCallback):
    """Calls `action` once the Trainer has loaded all it needs (a resumed checkpoint's weights,
    optimizer and schedule included), before the first step: a run that fails to start has
    rewritten nothing."""

    def __init__(self, action):
        self.action = action

    def on_train_begin(self, args, state, control, **kwargs):
        self.action()
