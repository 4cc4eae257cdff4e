"""The end of a benchmark script: the load average after the run beside the one before, and the JSON out."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(out: str | Path, env: dict, threads: int, **payload) -> None:
    """Record the load average at the end in `env`, print it with the thread count, write {env, **payload} to `out`
    (parents made) and say where."""
    env["loadavg_end"] = os.getloadavg()
    print(f"{threads} threads, load average {env['loadavg_start']} -> {env['loadavg_end']}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, **payload), indent=2))
    print(f"wrote {out}")
