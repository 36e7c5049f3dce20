"""Run a benchmark's measured parts each in a fresh process (so peak memory and state are its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PREFIX = "RESULT "


def report(result: dict) -> None:
    """Called in the child: hand one JSON result to the parent."""
    print(PREFIX + json.dumps(result), flush=True)


def run_child(script: str, name: str, argv: list[str]) -> dict:
    """Run ``script --child name argv...`` in a fresh interpreter and return what it reported."""
    cmd = [sys.executable, script, "--child", name, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} child failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(PREFIX):])
    print(name, json.dumps(result), flush=True)
    return result
