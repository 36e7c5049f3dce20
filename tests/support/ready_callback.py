"""A callback that tells a test process-driver when a child run has reached the point to interrupt.

Imported by a child ``python -m lightning_mobillm fit`` (``tests/support`` is put on its ``PYTHONPATH``):
after ``after_steps`` training batches it prints one line ``MOBILLM_TEST_READY server_pid=<pid>`` on
stdout, so the test reads a line instead of sleeping and guessing.
"""

from __future__ import annotations

import lightning as L

READY = "MOBILLM_TEST_READY"


class ReadyAfterSteps(L.Callback):
    def __init__(self, after_steps: int = 2) -> None:
        self.after_steps = after_steps
        self._said = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._said and trainer.global_step >= self.after_steps:
            self._said = True
            print(f"{READY} server_pid={getattr(trainer.strategy, 'server_pid', None)}", flush=True)
