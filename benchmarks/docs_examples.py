"""Re-run the worked examples of a docs page and check that they still print what the page shows.

A page such as ``docs/quantization-formulas.md`` shows each example as a ```python block followed
by "Output:" and a ```text block. This runs every such block in a fresh interpreter from the
repository root and compares its output with the page, line by line. Exit status 1 if any
example fails or prints something else. Run:
``python benchmarks/docs_examples.py [docs/quantization-formulas.md ...]``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(r"```python\n(.*?)```\s*\n+Output:\s*\n+```text\n(.*?)```", re.S)


def check_page(page: Path, timeout: float) -> int:
    """Run the page's examples; returns the number that failed or printed something else."""
    text = page.read_text(encoding="utf-8")
    examples = EXAMPLE.findall(text)
    unpaired = text.count("```python") - len(examples)
    failures = 0
    for index, (code, expected) in enumerate(examples, 1):
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        same = run.returncode == 0 and run.stdout.strip() == expected.strip()
        print(f"{page.name} example {index}: {'same output' if same else 'DIFFERENT'}")
        if not same:
            failures += 1
            print(f"expected:\n{expected}got (exit {run.returncode}):\n{run.stdout}{run.stderr[-2000:]}")
    print(f"{page.name}: {len(examples) - failures} of {len(examples)} examples reproduce", end="")
    print(f"; {unpaired} python blocks without an Output block (not checked)" if unpaired else "")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", default=[str(REPO / "docs" / "quantization-formulas.md")])
    parser.add_argument("--timeout", type=float, default=600, help="seconds per example")
    args = parser.parse_args()
    failures = sum(check_page(Path(page), args.timeout) for page in args.pages)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
