"""One training run per output directory: a second run with the same directory refuses instead of interleaving
its checkpoints and logs with the first.

The lock is an exclusive `flock` on `<run dir>/.lock`, which holds the owner's PID and host for the message. The
kernel drops the lock when its process dies, SIGKILL included, so a stale lock can never block a restart (the
file alone, left behind, means nothing). Under torchrun only rank 0 (env RANK) locks: the ranks share the directory.
"""
import fcntl
import glob
import os
import socket
import time
from typing import IO, Optional

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process trains into the same output directory."""


class RunLock:
    """Held from construction until `release()` (or the process's death)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.file: Optional[IO[str]] = None
        if int(os.environ.get("RANK", "0")) != 0:
            return
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown process"
            handle.close()
            raise RunLockedError(
                f"output directory {directory} is in use by another training run ({owner}); wait for it to end, "
                "or choose another EXPERIMENT.NAME or LOG.PREFIX"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.file = handle
        remove_stale_temporaries(directory)

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def remove_stale_temporaries(directory: str) -> None:
    """Delete `.NAME.*.tmp` files that a killed checkpoint writer left (see `save_checkpoint`); only the lock
    holder calls this, so no live writer owns them."""
    for path in glob.glob(os.path.join(directory, ".*.tmp")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
