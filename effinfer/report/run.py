"""The report's plan: which techniques apply, which fit the time budget, in what order.

The baseline runs first, always; its measured time (then the median over the rows measured so far,
each divided by its cost) is the unit of every other technique's cost estimate (``Technique.cost``,
e.g. 4x for GPTQ, which calibrates before it measures). The rest
run by value, highest first; one whose estimate would pass the budget is skipped and listed as
skipped, and the plan goes on to cheaper ones that still fit.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from effinfer.bench.report import machine_info
from effinfer.report import float_copy
from effinfer.report.measure import MeasureSettings, Row, measure
from effinfer.report.techniques import ReportError, Target, Technique, select


@dataclass
class Report:
    command: str
    date: str
    machine: dict
    model: dict
    settings: dict
    budget_seconds: float | None
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)

    def baseline(self) -> Row:
        return self.rows[0]

    def measured(self) -> list[Row]:
        return [r for r in self.rows if r.status == "measured"]

    def to_dict(self) -> dict:
        return {
            "schema": "effinfer-report/1",
            "command": self.command,
            "date": self.date,
            "machine": self.machine,
            "model": self.model,
            "settings": self.settings,
            "budget_seconds": self.budget_seconds,
            "seconds": self.seconds,
            "rows": [r.to_dict() for r in self.rows],
        }


def run_report(
    model: str | os.PathLike, settings: MeasureSettings, names: list[str] | None, budget_seconds: float | None,
    device: str = "cpu", command: str = "", show_progress: bool = True,
) -> Report:  # fmt: skip
    """Measure the chosen techniques (all when ``names`` is None) on ``model`` within the budget."""
    techniques = select(names)
    if budget_seconds is not None and budget_seconds <= 0:
        raise ReportError(f"--budget-minutes must be positive, got {budget_seconds / 60:g}")
    model = Path(model)
    if not model.exists():
        raise ReportError(f"model {str(model)!r} does not exist")
    if not Path(settings.data).is_file():
        raise ReportError(f"data file {str(settings.data)!r} does not exist")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="effinfer-report-") as workdir:
        target = Target.open(model, device, Path(workdir))
        if target.is_gguf and float_copy.available():
            target.make_float_copy = float_copy.write_float_copy
        report = Report(
            command=command,
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            machine=machine_info(torch.device(device), settings.threads or torch.get_num_threads()),
            model={"path": str(model.resolve()), "architecture": target.config.architecture,
                   "format": "gguf" if target.is_gguf else "hf", "layers": target.config.num_layers,
                   "hidden_size": target.config.hidden_size, "context": target.config.max_position_embeddings},
            settings={k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                      for k, v in vars(settings).items()},
            budget_seconds=budget_seconds,
        )  # fmt: skip
        baseline, *rest = techniques
        cache_techniques = any(t.scores_through_cache for t in rest)
        report.rows.append(measure(baseline, target, settings, show_progress, also_paged=cache_techniques))
        # Seconds per unit of cost: the median over the rows measured so far (a first row that
        # built kernels or warmed caches then stops inflating every later estimate).
        per_unit = [report.rows[0].seconds]
        for technique in sorted(rest, key=lambda t: -t.value):
            row = _planned_row(technique, target, settings, statistics.median(per_unit), budget_seconds,
                               start, show_progress)  # fmt: skip
            if row.status == "measured":
                per_unit.append(row.seconds / technique.cost)
            report.rows.append(row)
        report.machine["threads"] = torch.get_num_threads()
    report.seconds = time.perf_counter() - start
    return report


def _planned_row(
    technique: Technique, target: Target, settings: MeasureSettings, unit: float, budget: float | None,
    start: float, show_progress: bool,
) -> Row:  # fmt: skip
    reason = technique.applies(target)
    if reason is not None:
        return Row(technique.name, technique.label, technique.description, "not applicable", reason)
    estimate = unit * technique.cost
    elapsed = time.perf_counter() - start
    if budget is not None and elapsed + estimate > budget:
        row = Row(technique.name, technique.label, technique.description, "skipped",
                  f"estimated {estimate:.0f} s; {max(budget - elapsed, 0):.0f} s of the budget left")  # fmt: skip
    else:
        row = measure(technique, target, settings, show_progress)
    row.estimated_seconds = estimate
    return row
