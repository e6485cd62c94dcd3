"""The report's charts (matplotlib, Agg backend): quality against speed, quality against memory, speed-ups.

Each returns the file it wrote, or None when there is nothing to draw or matplotlib is missing.
"""

from __future__ import annotations

from pathlib import Path

from effinfer.report.measure import Row

MIB = 1 << 20


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _scored(rows: list[Row], x: str) -> list[Row]:
    return [r for r in rows if r.status == "measured" and r.perplexity is not None and getattr(r, x)]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x higher is better, y lower is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(
            (ox >= x and oy <= y) and (ox > x or oy < y) for j, (ox, oy) in enumerate(points) if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def quality_scatter(rows: list[Row], x: str, path: Path, title: str, xlabel: str, scale: float = 1.0,
                    higher_is_better: bool = True) -> Path | None:  # fmt: skip
    plt = _pyplot()
    rows = _scored(rows, x)
    if plt is None or len(rows) < 2:
        return None
    xs = [getattr(r, x) / scale for r in rows]
    ys = [r.perplexity for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r, xv, yv in zip(rows, xs, ys):
        ax.annotate(r.label, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front([(xv if higher_is_better else -xv, yv) for xv, yv in zip(xs, ys)])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", lw=1.2,
            label="Pareto front", zorder=2)  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_bars(rows: list[Row], baseline: Row, path: Path) -> Path | None:
    plt = _pyplot()
    rows = [r for r in rows if r.status == "measured" and r is not baseline and r.decode_tokens_per_s]
    if plt is None or not rows or not baseline.decode_tokens_per_s:
        return None
    metrics = [("decode_tokens_per_s", "batch-1 decode"), ("batched_tokens_per_s", "batched"),
               ("prefill_tokens_per_s", "prefill")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(rows) + 1.6))
    height = 0.8 / len(metrics)
    for k, (field, label) in enumerate(metrics):
        values = [getattr(r, field) / getattr(baseline, field) for r in rows]
        positions = [i + k * height for i in range(len(rows))]
        ax.barh(positions, values, height=height, label=label)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks([i + height for i in range(len(rows))], [r.label for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("× the baseline (higher is faster)")
    ax.set_title("Speed-up over the baseline", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(rows: list[Row], baseline: Row, out: Path) -> list[tuple[str, Path]]:
    """(caption, file) of every chart that could be drawn, written into ``out``."""
    charts = [
        ("Quality against batch-1 decode speed (Pareto front: nothing is both faster and better)",
         quality_scatter(rows, "decode_tokens_per_s", out / "quality_speed.png",
                         "Perplexity vs decode speed", "batch-1 decode tokens/s (higher is better)")),
        ("Quality against memory (weights + KV of one long sequence)",
         quality_scatter(rows, "memory_bytes", out / "quality_memory.png", "Perplexity vs memory",
                         "weights + KV MiB (lower is better)", scale=MIB, higher_is_better=False)),
        ("Speed-ups over the baseline", speedup_bars(rows, baseline, out / "speedups.png")),
    ]  # fmt: skip
    return [(caption, path) for caption, path in charts if path is not None]
