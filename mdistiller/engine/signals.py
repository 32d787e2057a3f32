"""SIGTERM/SIGINT during training: finish the current step (or checkpoint write), then stop with a resumable run.

A signal only sets a flag; the trainer polls it at step and epoch boundaries (`GracefulStop.check`), so a
checkpoint being written is always completed. The partial epoch is discarded: `latest` (the last finished epoch,
written atomically) is the resumable checkpoint and `--resume` continues exactly as an uninterrupted seeded run.
A second signal of the same kind restores the default behaviour, so pressing Ctrl-C twice still kills at once.
"""
import os
import signal
import threading
from typing import Dict, Optional

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Raised at a step boundary after SIGTERM/SIGINT; the CLI exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """Installs the flag-setting handlers (main thread only: elsewhere Python cannot) until `uninstall()`."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signum:  # asked twice: stop waiting for the step boundary
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def check(self, epoch: int, step: int, latest: str) -> None:
        """Raise TrainingStopped when a signal arrived; `step` is the number of finished steps of `epoch`."""
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        if os.path.isfile(latest):
            kept = f"resume from {latest} (epoch {epoch - 1}) with --resume"
        else:
            kept = "no epoch had finished, so there is no checkpoint; start again without --resume"
        raise TrainingStopped(
            f"stopped by {name} at epoch {epoch} after {step} step(s); the partial epoch is discarded; {kept}",
            self.signum,
        )
