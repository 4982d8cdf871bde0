"""What every DataLoader worker of this library runs first."""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a DataLoader worker: ignore SIGTERM, SIGUSR1 and SIGINT. A scheduler or a terminal signals the whole
    process group; the training process decides (it finishes its update and saves a checkpoint, see
    `mae.train.preemption`), and a worker dying first would turn that clean stop into a crash."""
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
