"""Loss and probe curves as one PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in history if r.get(key) is not None]
        return [r["step"] for r in rows], [float(r[key]) for r in rows]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss"),
                       ("general_loss", "probe: general reference loss"), ("medical_loss", "probe: medical loss")):
        xs, ys = series(key)
        if xs:
            left.plot(xs, ys, marker=".", label=label)
    left.set_xlabel("step")
    left.set_ylabel("loss (nats/token)")
    left.legend(fontsize=8)
    for key, label in (("distinct_2", "distinct-2"), ("repeat_4gram", "repeated 4-gram rate"),
                       ("empty_rate", "empty-answer rate")):
        xs, ys = series(key)
        if xs:
            right.plot(xs, ys, marker=".", label=label)
    collapsed = [r["step"] for r in history if r.get("collapsed")]
    for step in collapsed:
        right.axvline(step, color="red", linestyle="--", linewidth=1)
    right.set_xlabel("step")
    right.set_ylim(0, 1.05)
    right.set_title("collapse probe" + (" (red: collapse)" if collapsed else ""), fontsize=9)
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
