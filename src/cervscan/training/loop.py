"""The epoch loop that both network trainings share (``train-cls --recipe finetune`` and ``train-seg``).

:class:`EpochLoop` holds one network's optimiser, learning-rate schedule and shuffled loader. It trains epoch by
epoch and, after each epoch, saves everything a resume needs (model, optimiser and scheduler state, the torch RNG
and the loader's generator) to its state file, so that an interrupted run resumed from that file gives the same
numbers as an uninterrupted one. What differs between the trainings (the loss, what happens after an epoch, extra
fields of the state) is passed in.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cervscan.files import atomic_write_with

#: ``loss_of(x, y)``: the loss of one batch (moving it to the device as needed).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``after_epoch(epoch, losses, started)``: runs after each epoch (1-based; ``losses`` of its steps, ``started`` its
#: ``time.time()`` at the start), before the state is saved; what it returns is saved in the state as well.
AfterEpoch = Callable[[int, list, float], dict | None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EpochLoop:
    """One network's training run; the loader must shuffle with ``gen`` (saved with the state)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    gen: torch.Generator
    epochs: int
    #: the state file: written after every epoch, read by :meth:`resume`; None: neither
    state_path: Path | None = None
    max_steps_per_epoch: int = 0  # 0 = all
    #: step the learning-rate schedule after every optimiser step (True) or once after every epoch (False)
    sched_per_step: bool = True

    def resume(self, adapt: Callable[[dict], None] | None = None) -> dict | None:
        """Restore the saved state, if there is a state file: model, optimiser and scheduler through their
        ``load_state_dict``, then the torch RNG and the loader's generator. Returns the state (``state["epoch"]``:
        the epochs done), or None. ``adapt(state)`` sees the state first: it may refuse it (raise) or adjust it."""
        if self.state_path is None or not self.state_path.exists():
            return None
        st = torch.load(self.state_path, map_location="cpu", weights_only=True)
        if adapt is not None:
            adapt(st)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        self.gen.set_state(st["gen"])
        return st

    def save(self, epoch: int, **extra) -> None:
        """Write the state after ``epoch`` epochs (and ``extra`` fields) atomically to the state file."""
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "epoch": epoch, **extra, "rng": torch.get_rng_state(), "gen": self.gen.get_state()}
        atomic_write_with(self.state_path, lambda f: torch.save(state, f))

    def train_epoch(self, epoch: int, loss_of: LossFn, progress: Callable[[dict], None] | None = None,
                    **event) -> list[float]:
        """One epoch (``epoch`` 0-based) of optimiser steps; ``progress`` gets a ``phase: train`` event per step
        (with ``event``'s fields). Returns the steps' losses."""
        self.model.train()
        losses: list[float] = []
        for step, (x, y) in enumerate(self.loader):
            if self.max_steps_per_epoch and step >= self.max_steps_per_epoch:
                break
            loss = loss_of(x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if self.sched_per_step:
                self.sched.step()
            losses.append(loss.item())
            if progress:
                progress({"phase": "train", "epoch": epoch + 1, "epochs": self.epochs, "step": step + 1,
                          "steps": len(self.loader), "loss": losses[-1], **event})
        if not self.sched_per_step:
            self.sched.step()
        return losses

    def run(self, start: int, stop: int, loss_of: LossFn, after_epoch: AfterEpoch,
            progress: Callable[[dict], None] | None = None, **event) -> None:
        """Epochs ``start`` to ``stop`` (0-based, ``stop`` excluded): train, ``after_epoch``, save the state."""
        for epoch in range(start, stop):
            started = time.time()
            losses = self.train_epoch(epoch, loss_of, progress, **event)
            extra = after_epoch(epoch + 1, losses, started) or {}
            if self.state_path is not None:
                self.save(epoch + 1, **extra)
