"""Presenting a benchmark run: the plain-text table, the markdown section, the JSON file and the plot.

Every report is built from one ``BenchReport``: the context (command, date, machine, model,
settings) and, per scenario, each engine's result. Ratios are effinfer / peer for rates, so
above 1 means effinfer is faster.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effinfer.bench.throughput import DecodeResult, ThroughputResult
from effinfer.machine import cpu_model

ENGINE = "effinfer"


@dataclass
class Scenario:
    key: str  # "decode", "offline", "concurrent"
    title: str  # for people, e.g. "offline, 16 requests"
    detail: str  # the workload, e.g. "prompts 32-128, outputs 16-64 tokens"
    prompt_lens: list[int] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)
    results: dict[str, DecodeResult | ThroughputResult] = field(default_factory=dict)


@dataclass
class BenchReport:
    command: str
    date: str
    machine: dict
    model: dict
    settings: dict
    peer: str | None
    scenarios: list[Scenario] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        if self.peer is None:
            return {}
        out = {}
        for scenario in self.scenarios:
            ours, theirs = scenario.results.get(ENGINE), scenario.results.get(self.peer)
            if ours is None or theirs is None:
                continue
            if isinstance(ours, DecodeResult):
                out[f"{scenario.key}_tokens_per_s"] = ours.tokens_per_s / theirs.tokens_per_s
            else:
                out[f"{scenario.key}_output_tokens_per_s"] = (
                    ours.output_tokens_per_s / theirs.output_tokens_per_s
                )
                out[f"{scenario.key}_total_tokens_per_s"] = (
                    ours.total_tokens_per_s / theirs.total_tokens_per_s
                )
        return out


def machine_info(device: torch.device, num_threads: int, peer_version: str | None = None) -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": num_threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if peer_version is not None:
        info["transformers"] = peer_version
    return info


def machine_line(machine: dict) -> str:
    parts = [f"{machine['cpu']}", f"{machine['usable_cpus']} of {machine['logical_cpus']} CPUs usable"]
    parts.append(f"{machine['threads']} torch threads")
    if "gpu" in machine:
        parts.append(machine["gpu"])
    parts.append(f"device {machine['device']}")
    parts.append(f"torch {machine['torch']}")
    if "transformers" in machine:
        parts.append(f"transformers {machine['transformers']}")
    return ", ".join(parts)


def model_line(model: dict) -> str:
    return (
        f"{model['path']} ({model['architecture']}, {model['parameters'] / 1e9:.3f}B parameters, "
        f"{model['dtype']}; {model['weight_bytes_per_decode_step'] / 1e9:.3f} GB of weights read per decode step)"
    )


# ---- the results table ----------------------------------------------------------------------
def table_rows(report: BenchReport) -> list[tuple[str, str, str, str, str]]:
    """(scenario, metric, effinfer, peer, ratio) strings; peer and ratio are empty without a peer."""
    peer = report.peer
    rows = []
    for scenario in report.scenarios:
        ours, theirs = scenario.results.get(ENGINE), scenario.results.get(peer) if peer else None
        label = f"{scenario.title} ({scenario.detail})"
        metrics = _decode_metrics() if isinstance(ours, DecodeResult) else _throughput_metrics(peer)
        for metric, getter, fmt, is_rate in metrics:
            a = getter(ours) if ours is not None else None
            b = getter(theirs) if theirs is not None else None
            ratio = f"{a / b:.2f}x" if is_rate and a is not None and b else ""
            rows.append((label, metric, _fmt(a, fmt), _fmt(b, fmt) if peer else "", ratio))
            label = ""
    return rows


def _decode_metrics():
    return [
        ("decode tokens/s", lambda r: r.tokens_per_s, ".2f", True),
        ("median ms/token", lambda r: r.median_ms_per_token, ".1f", False),
        ("weight read GB/s", lambda r: r.weight_gb_per_s, ".2f", True),
    ]


def _throughput_metrics(peer: str | None):
    metrics = [
        ("output tokens/s", lambda r: r.output_tokens_per_s, ".2f", True),
        ("total tokens/s", lambda r: r.total_tokens_per_s, ".2f", True),
        ("wall time s", lambda r: r.seconds, ".2f", False),
    ]
    if peer is not None:
        metrics.append(("generated tokens/s*", lambda r: r.generated_tokens_per_s, ".2f", False))
    return metrics


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def notes(report: BenchReport) -> list[str]:
    lines = [
        "decode tokens/s: batch 1, greedy, prefill excluded (clock from the first to the last generated token).",
        "weight read GB/s: bytes of weights one decode step reads (embedding table excluded unless tied) x decode tokens/s.",
        "output tokens/s counts each request's own output length; total tokens/s adds the prompt tokens.",
    ]
    if report.peer == "HF":
        lines += [
            "HF offline: one batched generate() over left-padded prompts; every row runs to the longest output "
            "length, so it computes more tokens than were asked for. *generated tokens/s counts all of them "
            "(rows x longest output); it is not comparable with effinfer's and gets no ratio.",
            "HF concurrent: equal prompt and output lengths, so no padding: generated = output tokens.",
        ]
    return lines


def render_text(report: BenchReport) -> str:
    headers = (
        "scenario",
        "metric",
        ENGINE,
        report.peer or "",
        f"{ENGINE}/{report.peer}" if report.peer else "",
    )
    rows = table_rows(report)
    keep = [i for i in range(5) if i < 3 or report.peer]
    cells = [[h for i, h in enumerate(headers) if i in keep]] + [
        [c for i, c in enumerate(r) if i in keep] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keep))]

    def line(row):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(cells[0]))
    out = [
        f"effinfer bench  {report.date}",
        f"command: {report.command}",
        f"machine: {machine_line(report.machine)}",
        f"model:   {model_line(report.model)}",
        rule,
        line(cells[0]),
        rule,
    ]
    for row in cells[1:]:
        if row[0] and out[-1] != rule:
            out.append("")
        out.append(line(row))
    out.append(rule)
    out += [f"  {n}" for n in notes(report)]
    return "\n".join(out)


def render_markdown(report: BenchReport) -> str:
    peer = report.peer
    headers = ["scenario", "metric", ENGINE] + ([peer, f"{ENGINE}/{peer}"] if peer else [])
    out = [
        f"## effinfer bench: {Path(report.model['path']).name}, {report.model['dtype']}, "
        f"{report.machine['device']} ({report.date})",
        "",
        "```",
        report.command,
        "```",
        "",
        f"- Date: {report.date}",
        f"- Machine: {machine_line(report.machine)}",
        f"- Model: {model_line(report.model)}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(headers) - 2)) + "|",
    ]
    for row in table_rows(report):
        out.append("| " + " | ".join(row[: len(headers)]) + " |")
    out.append("")
    out += [f"- {n}" for n in notes(report)]
    return "\n".join(out) + "\n"


def append_markdown(report: BenchReport, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    separator = "" if not existing else ("\n" if existing.endswith("\n") else "\n\n")
    with open(path, "a") as f:
        f.write(separator + render_markdown(report))


def to_json(report: BenchReport) -> dict:
    return {
        "command": report.command,
        "date": report.date,
        "machine": report.machine,
        "model": report.model,
        "settings": report.settings,
        "engines": [ENGINE] + ([report.peer] if report.peer else []),
        "results": {
            s.key: {
                "title": s.title,
                "detail": s.detail,
                "prompt_lens": s.prompt_lens,
                "output_lens": s.output_lens,
                **{engine: result.to_dict() for engine, result in s.results.items()},
            }
            for s in report.scenarios
        },
        "ratios": report.ratios(),
    }


def write_json(report: BenchReport, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(report), indent=2) + "\n")


def write_plot(report: BenchReport, path: str | os.PathLike) -> bool:
    """A bar chart of tokens/s per scenario and engine. Needs matplotlib; returns False without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, so {path} was not drawn", file=sys.stderr)
        return False
    panels = []  # (title, {engine: tokens/s})
    for s in report.scenarios:
        if s.key == "decode":
            panels.append((f"{s.title}\ndecode tokens/s", {e: r.tokens_per_s for e, r in s.results.items()}))
        else:
            values = {e: r.output_tokens_per_s for e, r in s.results.items()}
            panels.append((f"{s.title}\noutput tokens/s", values))
    engines = [ENGINE] + ([report.peer] if report.peer else [])
    colors = ["tab:blue", "tab:orange"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        heights = [values.get(e, 0.0) for e in engines]
        bars = ax.bar(engines, heights, color=colors[: len(engines)])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.15)
        if report.peer and all(heights):
            ax.set_xlabel(f"{ENGINE}/{report.peer} = {heights[0] / heights[1]:.2f}x", fontsize=9)
    fig.suptitle(
        f"{Path(report.model['path']).name}, {report.model['dtype']}, {report.machine['device']}, "
        f"{report.machine['threads']} threads",
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
