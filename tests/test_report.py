"""effinfer report: structure of the report, its files, its reproducing commands and its errors.

Nothing here asserts a speed (the machine may be busy); the numbers are checked against the
commands they claim to reproduce.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from effinfer.cli import main
from effinfer.report import techniques
from effinfer.report.techniques import Prepared, Technique

# Small measurements: the structure is what is tested, not the figures' precision.
SMALL = ["--decode-tokens", "8", "--num-requests", "4", "--ppl-ctx", "128", "--ppl-windows", "2",
         "--threads", "1", "--no-progress"]  # fmt: skip
STATUSES = {"measured", "error", "skipped", "not applicable"}


def _broken(target) -> Prepared:
    raise RuntimeError("this technique fails on purpose")


@pytest.fixture
def failing_technique(monkeypatch):
    """A registry entry that fails while preparing: the report must carry on and show the error."""
    broken = Technique("broken", "broken", "fails on purpose", 10_000, 0.1, _broken)
    monkeypatch.setitem(techniques.TECHNIQUES, "broken", broken)
    return broken


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["report", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_page(out: Path, expect_charts: bool = True) -> dict:
    data = json.loads((out / "report.json").read_text())
    assert data["schema"] == "effinfer-report/1"
    assert {"command", "date", "machine", "model", "settings", "rows"} <= set(data)
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "</html>" in page
    # Offline: no scripts, styles, fonts or images fetched from anywhere.
    assert (
        not re.search(r"(src|href)=\"(https?:)?//", page) and "http://" not in page and "https://" not in page
    )
    images = re.findall(r'<img src="([^"]+)"', page)
    assert bool(images) == expect_charts
    assert all((out / name).is_file() and (out / name).stat().st_size > 1000 for name in images)
    assert (out / "report.md").read_text().startswith("# effinfer report")
    for row in data["rows"]:
        assert row["status"] in STATUSES
        if row["status"] == "measured":
            for key in ("decode_tokens_per_s", "batched_tokens_per_s", "prefill_tokens_per_s", "weight_bytes",
                        "kv_bytes", "perplexity"):  # fmt: skip
                assert row[key] > 0, (row["name"], key)
            assert row["commands"]["row"].startswith("effinfer report")
            assert row["label"] in page
    return data


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    """One report on the default model: baseline, int8 weights, int8 KV and a failing technique."""
    out = tmp_path_factory.mktemp("report")
    broken = Technique("broken", "broken", "fails on purpose", 10_000, 0.1, _broken)
    techniques.TECHNIQUES["broken"] = broken
    try:
        code = main(["report", "--out", str(out), "--techniques", "int8,kv-int8,broken", *SMALL])
    finally:
        del techniques.TECHNIQUES["broken"]
    assert code == 0
    return out


def test_report_rows_files_and_error_row(small_report):
    data = _check_page(small_report)
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows)[0] == "baseline" and set(rows) == {"baseline", "int8", "kv-int8", "broken"}
    assert rows["broken"]["status"] == "error"
    assert rows["broken"]["reason"] == "RuntimeError: this technique fails on purpose"
    assert rows["int8"]["status"] == rows["kv-int8"]["status"] == "measured"
    # What each technique changes shows where it should.
    assert rows["int8"]["weight_bytes"] < rows["baseline"]["weight_bytes"]
    assert rows["kv-int8"]["kv_bytes"] < rows["baseline"]["kv_bytes"]
    assert rows["kv-int8"]["weight_bytes"] == rows["baseline"]["weight_bytes"]
    assert rows["kv-int8"]["perplexity_method"] == "paged" and rows["baseline"]["paged_perplexity"] > 0
    assert rows["int8"]["engine_kwargs"] == {"quantization": "int8"}


@pytest.mark.parametrize("name", ["baseline", "int8"])
def test_row_perplexity_is_what_eval_ppl_prints(small_report, capsys, name):
    row = next(r for r in json.loads((small_report / "report.json").read_text())["rows"] if r["name"] == name)
    argv = shlex.split(row["commands"]["perplexity"])
    assert argv[:3] == ["effinfer", "eval", "ppl"]
    assert main(argv[1:]) == 0
    printed = capsys.readouterr().out
    assert f"perplexity {row['perplexity']:.4f} " in printed
    assert f"over {row['ppl_tokens']} tokens" in printed


def test_row_speed_is_what_bench_measures(small_report, tmp_path, capsys):
    """The row's speed command replays the same prompts and output lengths through `effinfer bench`,
    and its figures agree with the row's. Only a factor of 3 is asserted (the two runs are timed at
    different moments of a possibly busy machine): the check is against unit or workload mix-ups,
    such as counting prompt tokens or requests as output tokens."""
    row = next(
        r for r in json.loads((small_report / "report.json").read_text())["rows"] if r["name"] == "baseline"
    )
    argv = shlex.split(row["commands"]["speed"])
    assert argv[:2] == ["effinfer", "bench"]
    out = tmp_path / "bench.json"
    assert main([*argv[1:], "--json", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    results = json.loads(out.read_text())["results"]
    for scenario in ("decode", "offline"):
        for lens in ("prompt_lens", "output_lens"):
            assert results[scenario][lens] == row["workload"][scenario][lens], (scenario, lens)
    pairs = [
        (results["decode"]["effinfer"]["tokens_per_s"], row["decode_tokens_per_s"]),
        (results["offline"]["effinfer"]["output_tokens_per_s"], row["batched_tokens_per_s"]),
    ]
    for bench_speed, row_speed in pairs:
        assert 1 / 3 < bench_speed / row_speed < 3, pairs


def test_compare_two_runs_renders(small_report, tmp_path, capsys):
    data = json.loads((small_report / "report.json").read_text())
    other = json.loads(json.dumps(data))
    for row in other["rows"]:
        if row["decode_tokens_per_s"]:
            row["decode_tokens_per_s"] *= 2
    second = tmp_path / "b.json"
    second.write_text(json.dumps(other))
    code, out, _ = _run(capsys, "--compare", str(small_report / "report.json"), str(second), "--out",
                        str(tmp_path / "cmp"))  # fmt: skip
    assert code == 0
    baseline_line = next(line for line in out.splitlines() if line.startswith("| baseline"))
    assert "| 2.00 |" in baseline_line  # B's decode is twice A's
    assert "broken" not in out  # only techniques measured in both runs
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert "<table>" in page and "https://" not in page


def test_budget_skips_what_does_not_fit(tmp_path, capsys):
    # A budget smaller than the baseline alone: the baseline is measured, everything else skipped.
    code, _, _ = _run(capsys, "--out", str(tmp_path), "--techniques", "int4,ngram-spec", "--budget-minutes",
                      "0.001", *SMALL)  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["measured", "skipped", "skipped"]
    assert all("estimated" in r["reason"] for r in rows[1:])
    assert "skipped" in (tmp_path / "index.html").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/nonexistent/model", "--out", "X"], "does not exist"),
        (["--techniques", "int8,warp-drive", "--out", "X"], "unknown technique(s) warp-drive"),
        (["--budget-minutes", "-1", "--out", "X"], "--budget-minutes must be positive"),
        (["--techniques", "int8"], "--out DIR is required"),
        (["--compare", __file__, __file__], "is not valid JSON"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_default_model_three_minute_budget(tmp_path, capsys, failing_technique):
    """The acceptance run: every technique offered on the default model, a 3-minute budget."""
    code, _, _ = _run(capsys, "--out", str(tmp_path), "--budget-minutes", "3", *SMALL)
    assert code == 0
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    # How many fit depends on the machine's speed; charts need two measured rows.
    data = _check_page(tmp_path, expect_charts=sum(r["status"] == "measured" for r in rows) >= 2)
    names = [r["name"] for r in data["rows"]]
    assert names[0] == "baseline" and sorted(names) == sorted(techniques.TECHNIQUES)
    assert data["rows"][0]["status"] == "measured" and data["budget_seconds"] == 180
    assert next(r for r in data["rows"] if r["name"] == "broken")["status"] == "error"
    assert all("estimated" in r["reason"] for r in data["rows"] if r["status"] == "skipped")
    spec = next(r for r in data["rows"] if r["name"] == "ngram-spec")
    if spec["status"] == "measured":
        assert 0 <= spec["acceptance_rate"] <= 1
