"""What a run records: metrics.jsonl (+ TensorBoard), loss.png, and the MoE figures of a logged step."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when available) and the in-memory history used for loss.png."""

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("TensorBoard logging is off: the tensorboard package is not installed")
            else:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(records: list[dict[str, Any]], boundaries: list[int], path: Path) -> bool:
    """loss.png: train loss per log step and validation loss per evaluation. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("loss.png not written: matplotlib is not installed (pip install matplotlib)")
        return False
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train" and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    for b in boundaries:
        ax.axvline(b, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def moe_figures(moe_stats) -> dict[str, Any]:
    if not moe_stats:
        return {}
    loads = [[round(float(v), 6) for v in s.load] for s in moe_stats]
    dropped = [float(s.dropped_fraction) for s in moe_stats]
    experts = [round(float(s.experts_per_token), 6) for s in moe_stats]
    imbalance = [round(float(s.imbalance), 6) for s in moe_stats]
    return {"moe_expert_load": loads, "moe_max_load": max(max(layer) for layer in loads),
            "moe_dropped_fraction": sum(dropped) / len(dropped),
            "moe_experts_per_token": experts, "moe_imbalance": imbalance,  # per layer; imbalance = max / mean load
            "moe_mean_imbalance": sum(imbalance) / len(imbalance)}
