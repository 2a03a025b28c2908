"""Helpers shared by the benchmarks: run a command in its own process and measure it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# paths.data_root's rule (conf: `${oc.env:FINETUNE_DATA_ROOT,data}`): the folder that holds
# hymenoptera_data/ and flowers-102/
DATA_ROOT = Path(os.environ.get("FINETUNE_DATA_ROOT", REPO / "data"))
# The plain loops get the allocator setting train.py applies to itself (see
# finetune.runtime.keep_freed_memory_in_process): without it glibc's page faults would slow them
# down 1.5-3x on a small CPU, and the comparison would measure the allocator, not the loops.
PLAIN_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def run_measured(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `command` from the repository root; wall seconds, peak resident memory (MB) of its
    largest process, and its last JSON line (if it printed one)."""
    # A benchmark stopped by SIGTERM (kill, a job scheduler) exits through `finally` below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the command with its loader workers
    )
    finished = False
    try:
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        finished = True
    finally:
        # A stopped benchmark stops its command too: a training left running would go on
        # sharing the CPU with every later measurement.
        if not finished:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(output[-4000:])
        raise RuntimeError(f"{' '.join(command)} exited with {code}")
    last_json = next(
        (json.loads(line) for line in reversed(output.splitlines()) if line.startswith("{")), {}
    )
    return {
        "wall_seconds": round(wall, 2),
        "peak_memory_mb": round(usage.ru_maxrss / 1024),  # Linux reports kilobytes
        **last_json,
    }


def train_py(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """`python train.py` with `overrides`; adds the run's metrics.json."""
    measured = run_measured(
        [
            sys.executable,
            "train.py",
            f"hydra.run.dir={run_dir}",
            "print_config=false",
            "callbacks.progress_bar=null",
            *overrides,
        ]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**measured, "metrics": metrics}


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3)
