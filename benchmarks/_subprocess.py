"""The benchmark scripts' way to run a command: quietly, and on failure stop with the command and the end of its
error output (not a bare CalledProcessError)."""

from __future__ import annotations

import subprocess
import sys


def run_quiet(cmd: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        sys.exit(f"failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")
