"""The report as files: report.json (every number), report.md, and index.html with the charts next to it.

Everything is rendered from the JSON dict, so ``--compare`` renders two saved runs with the same
code. The page has no external reference (no scripts, fonts or styles from the network): it opens
offline, with its PNG charts beside it in the same directory.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

from effinfer.bench.report import machine_line
from effinfer.report.measure import Row
from effinfer.report.plots import write_plots

MIB = 1 << 20
_ROW_FIELDS = {f.name for f in dataclasses.fields(Row)}


def rows_of(data: dict) -> list[Row]:
    return [Row(**{k: v for k, v in r.items() if k in _ROW_FIELDS}) for r in data["rows"]]


def _ratio(value, base) -> float | None:
    return value / base if value is not None and base else None


def _ppl_base(row: dict, base: dict) -> float | None:
    return base.get("paged_perplexity") if row.get("perplexity_method") == "paged" else base.get("perplexity")


def ppl_change(row: dict, base: dict) -> float | None:
    """Relative perplexity change against the baseline scored the same way (dense or through the cache)."""
    reference = _ppl_base(row, base)
    return None if row.get("perplexity") is None or not reference else row["perplexity"] / reference - 1


def reading(row: dict, base: dict) -> str:
    """One sentence per row: "int4: 2.90× decode, 1.10× batched, 0.45× memory, +1.4% perplexity"."""
    if row["status"] != "measured":
        return f"{row['label']}: {row['status']} ({row['reason']})"
    if row is base:
        return (f"{row['label']}: {row['decode_tokens_per_s']:.1f} decode tokens/s, "
                f"{row['memory_bytes'] / MIB:.1f} MiB, perplexity {row['perplexity']:.3f}")  # fmt: skip
    parts = []
    for key, what in (("decode_tokens_per_s", "decode"), ("batched_tokens_per_s", "batched"),
                      ("prefill_tokens_per_s", "prefill"), ("memory_bytes", "memory")):  # fmt: skip
        ratio = _ratio(row.get(key), base.get(key))
        if ratio is not None:
            word = "faster " if key != "memory_bytes" and ratio >= 1 else ""
            parts.append(f"{ratio:.2f}× {word}{what}" if key != "memory_bytes" else f"{ratio:.2f}× memory")
    change = ppl_change(row, base)
    if change is not None:
        parts.append(
            f"{change * 100:+.1f}% perplexity"
            + (" (through the KV cache)" if row["perplexity_method"] == "paged" else "")
        )
    if row.get("acceptance_rate") is not None:
        parts.append(f"{row['acceptance_rate'] * 100:.0f}% of drafts accepted")
    return f"{row['label']}: " + ", ".join(parts)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cell(row: dict, base: dict, key: str, spec: str, scale: float = 1.0) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    text = format(value / scale, spec)
    ratio = _ratio(value, base.get(key))
    return text if row is base or ratio is None else f"{text} ({ratio:.2f}×)"


TABLE_HEADERS = ["technique", "status", "decode tok/s", "batched tok/s", "prefill tok/s", "weights MiB",
                 "KV MiB", "perplexity", "accepted"]  # fmt: skip


def table(data: dict) -> list[list[str]]:
    """The result table as strings, one list per row, in TABLE_HEADERS order."""
    rows, base = data["rows"], data["rows"][0]
    out = []
    for r in rows:
        change = ppl_change(r, base)
        ppl = _fmt(r.get("perplexity"), ".3f")
        if change is not None and r is not base:
            ppl += f" ({change * 100:+.1f}%)"
        if r.get("perplexity_method") == "paged":
            ppl += " †"
        kv = _cell(r, base, "kv_bytes", ".1f", MIB)
        out.append([
            r["label"], r["status"] if r["status"] == "measured" else f"{r['status']}: {r['reason']}",
            _cell(r, base, "decode_tokens_per_s", ".1f"), _cell(r, base, "batched_tokens_per_s", ".1f"),
            _cell(r, base, "prefill_tokens_per_s", ".0f"), _cell(r, base, "weight_bytes", ".1f", MIB),
            kv, ppl, _fmt(r.get("acceptance_rate"), ".2f"),
        ])  # fmt: skip
    return out


def _context_lines(data: dict) -> list[str]:
    m, s, base = data["model"], data["settings"], data["rows"][0]
    budget = data.get("budget_seconds")
    return [
        f"Model: {m['path']} ({m['architecture']}, {m['format']}, {m['layers']} layers, hidden {m['hidden_size']}, "
        f"context {m['context']})",
        f"Machine: {machine_line(data['machine'])}",
        f"Date: {data['date']}; took {data['seconds'] / 60:.1f} min"
        + (f" of a {budget / 60:g}-minute budget" if budget else ""),
        f"Command: {data['command']}",
        f"Each row: batch-1 decode of {s['decode_tokens']} tokens after a {s['decode_input_len']}-token prompt; "
        f"batched: {s['num_requests']} requests (prompts {s['input_len_range'][0]}-{s['input_len_range'][1]}, "
        f"outputs {s['output_len_range'][0]}-{s['output_len_range'][1]} tokens), output tokens/s; prefill: "
        f"{s['prefill_requests']} prompts of {s['prefill_len']} tokens; weights as held in memory; KV of one "
        f"{base.get('kv_tokens') or s['kv_tokens']}-token sequence; perplexity on {s['data']} "
        f"(windows of {s['ppl_ctx']} tokens, at most {s['ppl_windows']}). († through the paged KV cache, "
        "compared with the baseline scored the same way.) Ratios are against the baseline.",
    ]


def render_markdown(data: dict, plots: list[tuple[str, str]] = ()) -> str:
    lines = ["# effinfer report: " + Path(data["model"]["path"]).name, ""]
    lines += [f"- {line}" for line in _context_lines(data)] + [""]
    lines += ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * 2 + "---:|" * 7]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table(data)]
    lines += ["", "## Reading guide", ""]
    base = data["rows"][0]
    lines += [f"- {reading(r, base)}" for r in data["rows"] if r["status"] == "measured"]
    lines += ["", "## Reproduce a row", ""]
    for r in data["rows"]:
        for kind, command in r.get("commands", {}).items():
            lines.append(f"- {r['label']} ({kind}): `{command}`")
    for caption, name in plots:
        lines += ["", f"![{caption}]({name})"]
    return "\n".join(lines) + "\n"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
tr.error td{background:#fdecea}tr.skipped td,tr.na td{color:#888}code{font-size:0.85em}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
"""


def render_html(data: dict, plots: list[tuple[str, str]] = ()) -> str:
    esc = html.escape
    css_class = {"measured": "", "error": "error", "skipped": "skipped", "not applicable": "na"}
    head = "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADERS)
    body = []
    for r, cells in zip(data["rows"], table(data)):
        tds = "".join(f'<td class="{"n" if i >= 2 else ""}">{esc(c)}</td>' for i, c in enumerate(cells))
        body.append(f'<tr class="{css_class[r["status"]]}">{tds}</tr>')
    base = data["rows"][0]
    guide = "".join(f"<li>{esc(reading(r, base))}</li>" for r in data["rows"] if r["status"] == "measured")
    commands = "".join(
        f"<li>{esc(r['label'])} ({esc(kind)}): <code>{esc(c)}</code></li>"
        for r in data["rows"] for kind, c in r.get("commands", {}).items()
    )  # fmt: skip
    figures = "".join(f'<figure><img src="{esc(name)}" alt="{esc(caption)}"><figcaption>{esc(caption)}'
                      "</figcaption></figure>" for caption, name in plots)  # fmt: skip
    context = "".join(f"<li>{esc(line)}</li>" for line in _context_lines(data))
    title = esc("effinfer report: " + Path(data["model"]["path"]).name)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{title}</h1>\n<ul>{context}</ul>\n"
        f"<h2>Techniques</h2>\n<table><tr>{head}</tr>\n{''.join(body)}</table>\n"
        f"<h2>Reading guide</h2>\n<ul>{guide}</ul>\n<h2>Charts</h2>\n{figures or '<p>no charts</p>'}\n"
        f"<h2>Reproduce a row</h2>\n<ul>{commands}</ul>\n</body></html>\n"
    )


def write_report(data: dict, out: Path) -> list[Path]:
    """report.json, report.md, index.html and the charts in ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_of(data)
    plots = [(caption, path.name) for caption, path in write_plots(rows, rows[0], out)]
    files = [out / "report.json", out / "report.md", out / "index.html"]
    files[0].write_text(json.dumps(data, indent=2) + "\n")
    files[1].write_text(render_markdown(data, plots))
    files[2].write_text(render_html(data, plots))
    return files + [out / name for _, name in plots]


# -------------------------------------------------------------------- two runs side by side


def compare_markdown(a: dict, b: dict, names: tuple[str, str]) -> str:
    """Each technique measured in both runs: A's and B's figures and B / A."""
    rows_b = {r["name"]: r for r in b["rows"]}
    lines = [f"# effinfer report: {names[0]} vs {names[1]}", ""]
    for label, data in zip(names, (a, b)):
        lines.append(f"- {label}: {Path(data['model']['path']).name} on {machine_line(data['machine'])} "
                     f"({data['date']})")  # fmt: skip
    metrics = [("decode_tokens_per_s", "decode tok/s", ".1f"), ("batched_tokens_per_s", "batched tok/s", ".1f"),
               ("prefill_tokens_per_s", "prefill tok/s", ".0f"), ("memory_bytes", "memory MiB", ".1f"),
               ("perplexity", "perplexity", ".3f")]  # fmt: skip
    header = ["technique"] + [f"{title} {n}" for _, title, _ in metrics for n in (*names, "B/A")]
    lines += ["", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for ra in a["rows"]:
        rb = rows_b.get(ra["name"])
        if rb is None or ra["status"] != "measured" or rb["status"] != "measured":
            continue
        cells = [ra["label"]]
        for key, _, spec in metrics:
            scale = MIB if key == "memory_bytes" else 1
            va, vb = ra.get(key), rb.get(key)
            cells += [_fmt(None if va is None else va / scale, spec), _fmt(None if vb is None else vb / scale, spec),
                      _fmt(_ratio(vb, va), ".2f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_html(markdown_text: str, title: str) -> str:
    """The comparison table as a page (the Markdown table turned into HTML, nothing external)."""
    esc = html.escape
    parts, table_rows = [], []
    for line in markdown_text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tag = "th" if not table_rows else "td"
            table_rows.append("<tr>" + "".join(f"<{tag}>{esc(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("- "):
            parts.append(f"<p>{esc(line[2:])}</p>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(parts)}"
            f"<table>{''.join(table_rows)}</table></body></html>\n")  # fmt: skip
