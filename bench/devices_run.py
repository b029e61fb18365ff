"""Run a measuring snippet in a fresh Python process that sees `devices` CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_json(code: str, devices: int) -> dict:
    """The JSON object on the last stdout line of `python -c code`, run with XLA forced to
    `devices` host devices (the parent's JAX, if any, keeps its own device count)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
