"""The end-of-run report: hardware description and the markdown rendering of the JSON summary."""

from __future__ import annotations

import os
import platform

import torch

from effinfer.machine import cpu_model


def hardware_description(device: torch.device, world_size: int) -> dict:
    info = {
        "device": device.type,
        "processes": world_size,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def summary_markdown(summary: dict) -> str:
    hw = summary["hardware"]
    val = summary["val_loss"]
    rows = [
        ("steps", summary["steps"]),
        ("parameters", f"{summary['parameters']:,}"),
        ("tokens seen", f"{summary['tokens_seen']:,}"),
        (
            "train loss (last step / mean of last 10)",
            f"{_num(summary['train_loss'])} / {_num(summary['train_loss_last10'])}",
        ),
        ("held-out loss", _num(val)),
        ("held-out perplexity", _num(summary["val_perplexity"], ".2f")),
        ("wall time (this run)", f"{summary['wall_seconds']:.1f} s"),
        (
            "training tokens/s (this run / median step)",
            f"{_num(summary['tokens_per_second'], ',.0f')} / {_num(summary['steady_tokens_per_second'], ',.0f')}",
        ),
        ("hardware", f"{hw['processes']} x {hw.get('gpu', hw['cpu'])}, {hw['torch_threads']} threads"),
    ]
    lines = ["# Training summary", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)
