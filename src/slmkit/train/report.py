"""End-of-run artifacts: the loss curve (when matplotlib is installed) and `report.md`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def plot_losses(records: list[dict[str, Any]], out: Path) -> bool:
    """Write train/val loss against step to `out`; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def write_report(path: Path, summary: dict[str, Any], train_config: dict[str, Any], model_config: dict[str, Any], plot: bool,
                 title: str = "Pretraining report") -> None:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:,.4g}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in summary.items())
    text = (
        f"# {title}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        + ("![loss curve](loss.png)\n\n" if plot else "(install `slmkit[plot]` for a loss curve)\n\n")
        + f"## Training config\n\n```json\n{json.dumps(train_config, indent=2)}\n```\n\n"
        f"## Model config\n\n```json\n{json.dumps(model_config, indent=2)}\n```\n"
    )
    path.write_text(text, encoding="utf-8")
