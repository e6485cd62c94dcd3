"""Server metrics in the Prometheus text exposition format (0.0.4), written by hand.

Counters and histograms are updated on the event loop only, so they need no locks; engine gauges
(running / waiting sequences, KV-cache blocks) and speculative-decoding counts come from the
snapshot the engine thread publishes after every step. ``GET /metrics`` renders them all.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from effinfer.engine.async_engine import EngineStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def value(self, *label_values: str) -> float:
        return self.values.get(label_values, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for label_values, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labels, label_values)} {_number(value)}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_number(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


def _gauge(name: str, help: str, value: float, kind: str = "gauge") -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class ServerMetrics:
    def __init__(self) -> None:
        self.http_requests = Counter(
            "effinfer_http_requests_total",
            "HTTP requests by endpoint and status code.",
            ("endpoint", "status"),
        )
        self.finished = Counter(
            "effinfer_requests_finished_total",
            "Generation requests by how they ended (stop, length, abort, error).",
            ("finish_reason",),
        )
        self.prompt_tokens = Counter("effinfer_prompt_tokens_total", "Prompt tokens of generation requests.")
        self.generation_tokens = Counter("effinfer_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(
            "effinfer_time_to_first_token_seconds", "From request arrival to its first token.", TTFT_BUCKETS
        )
        self.tpot = Histogram(
            "effinfer_time_per_output_token_seconds",
            "Per request, the mean time between output tokens after the first.",
            TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            "effinfer_e2e_request_latency_seconds", "From request arrival to its last token.", E2E_BUCKETS
        )

    def observe_request(
        self,
        finish_reason: str,
        num_prompt_tokens: int,
        num_output_tokens: int,
        arrival: float,
        first_token: float | None,
        end: float,
    ) -> None:
        """Record one engine request (one prompt; its ``n`` completions count together)."""
        self.finished.inc(finish_reason)
        self.prompt_tokens.inc(amount=num_prompt_tokens)
        self.generation_tokens.inc(amount=num_output_tokens)
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        self.e2e.observe(end - arrival)
        if num_output_tokens > 1:
            self.tpot.observe((end - first_token) / (num_output_tokens - 1))

    def render(self, stats: EngineStats, num_open_requests: int, engine_alive: bool) -> str:
        lines: list[str] = []
        for metric in (
            self.http_requests,
            self.finished,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.tpot,
            self.e2e,
        ):
            lines += metric.render()
        lines += _gauge("effinfer_num_requests_running", "Sequences in the running batch.", stats.num_running)
        lines += _gauge("effinfer_num_requests_waiting", "Sequences waiting for prefill.", stats.num_waiting)
        lines += _gauge(
            "effinfer_num_requests_open", "Requests accepted and not yet finished.", num_open_requests
        )
        lines += _gauge(
            "effinfer_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0-1).", stats.kv_cache_usage
        )
        lines += _gauge("effinfer_kv_cache_free_blocks", "Free KV-cache blocks.", stats.num_free_blocks)
        lines += _gauge("effinfer_kv_cache_total_blocks", "KV-cache blocks in all.", stats.num_blocks)
        lines += _gauge("effinfer_engine_steps_total", "Engine steps run.", stats.num_steps, "counter")
        lines += _gauge(
            "effinfer_engine_step_errors_total", "Engine steps that raised.", stats.num_step_errors
        )
        lines += _speculation_lines(stats)
        lines += _gauge("effinfer_engine_alive", "1 while the engine thread runs.", int(engine_alive))
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ReplicaCounts:
    """One data-parallel replica as /metrics shows it (``serve/data_parallel.py``)."""

    index: int
    alive: bool
    num_routed: int  # requests the router sent it
    num_generated_tokens: int
    stats: EngineStats  # its last snapshot (a stopped replica holds nothing)


def render_replicas(replicas: list[ReplicaCounts]) -> str:
    """Per-replica series, labelled ``replica="k"``, beside the totals that ``render`` shows."""
    families = (
        ("effinfer_replica_requests_routed_total", "Requests routed to the replica.", "counter",
         lambda r: r.num_routed),
        ("effinfer_replica_generation_tokens_total", "Tokens the replica generated.", "counter",
         lambda r: r.num_generated_tokens),
        ("effinfer_replica_num_requests_running", "Sequences in the replica's running batch.", "gauge",
         lambda r: r.stats.num_running),
        ("effinfer_replica_num_requests_waiting", "Sequences waiting in the replica.", "gauge",
         lambda r: r.stats.num_waiting),
        ("effinfer_replica_kv_cache_usage_ratio", "Share of the replica's KV-cache blocks in use (0-1).",
         "gauge", lambda r: r.stats.kv_cache_usage),
        ("effinfer_replica_prefix_cache_hits_total", "Prompt blocks the replica found in its prefix cache.",
         "counter", lambda r: r.stats.prefix_cache_hits),
        ("effinfer_replica_alive", "1 while the replica's process runs.", "gauge", lambda r: int(r.alive)),
    )  # fmt: skip
    lines = []
    for name, help, kind, value in families:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{replica="{r.index}"}} {_number(value(r))}' for r in replicas]
    return "\n".join(lines) + "\n"


def _speculation_lines(stats: EngineStats) -> list[str]:
    """Speculative decoding since start (all zero without it); the ratios are the counters' quotients."""
    return [
        *_gauge(
            "effinfer_spec_draft_tokens_total",
            "Speculative tokens proposed.",
            stats.num_draft_tokens,
            "counter",
        ),
        *_gauge(
            "effinfer_spec_accepted_tokens_total",
            "Speculative tokens the target accepted.",
            stats.num_accepted_tokens,
            "counter",
        ),
        *_gauge(
            "effinfer_spec_verify_steps_total",
            "Sequence-steps that verified at least one speculative token.",
            stats.num_verify_steps,
            "counter",
        ),
        *_gauge(
            "effinfer_spec_acceptance_ratio",
            "Accepted over proposed speculative tokens since start (0-1).",
            stats.spec_acceptance_rate,
        ),
        *_gauge(
            "effinfer_spec_mean_accepted_length",
            "Tokens a verifying sequence gained per step since start: accepted drafts plus the target's own.",
            stats.spec_mean_accepted_length,
        ),
    ]


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a text exposition (for tests and ``bench serve``)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
