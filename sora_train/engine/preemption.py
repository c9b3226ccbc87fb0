"""Stopping on a signal without losing work: SIGUSR1 (SLURM's warning before the time limit or a preemption) or
SIGTERM checkpoint and exit for a requeue; Ctrl-C (SIGINT) checkpoints and exits; a second Ctrl-C quits at once."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch

from ..parallel.collectives import all_reduce_values

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed on a signal, resume me (slurm/train.sbatch requeues)
EXIT_INTERRUPTED = 130


class StopRequested:
    def __init__(self):
        self.signum = 0
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            print("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: quit without saving)",
                  file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (ranks get signals at different moments; all must stop at the same step)."""
        return int(all_reduce_values([self.signum], device, "max")[0])


def exit_after_save(signum: int, step: int, out_dir: str | Path, is_main: bool, logger) -> None:
    """After the checkpoint of `step` is saved: exit 130 for Ctrl-C, else leave a requeue marker and exit 75."""
    if signum == signal.SIGINT:
        print(f"stopped by Ctrl-C after saving step {step}; the same command continues the run", flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    logger.log(step, {"preempted_by_signal": signum})
    if is_main:  # srun's exit code mixes tasks' codes; the marker is unambiguous
        (Path(out_dir) / "requeue").write_text(str(step))
    print(f"stopped by signal {signum} after saving step {step}; exit {EXIT_REQUEUE} = requeue me", flush=True)
    raise SystemExit(EXIT_REQUEUE)
