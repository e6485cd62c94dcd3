"""``effinfer report``: what each technique buys on the user's model, measured the same way for all.

One command runs every applicable technique (weight quantization schemes, GPTQ/AWQ, int8 KV
cache, n-gram speculation, sliding window with sinks, ...; ``techniques.py`` is the registry)
through the existing measurement code (``effinfer bench``'s runner, ``effinfer eval ppl``'s
perplexity) within a time budget, and writes an HTML page with a table and charts, report.json
and report.md (``render.py``). ``--compare`` puts two saved runs side by side.
"""

from effinfer.report.cli import register
from effinfer.report.run import Report, run_report
from effinfer.report.techniques import TECHNIQUES, ReportError, Technique, register_technique

__all__ = ["register", "run_report", "Report", "TECHNIQUES", "Technique", "ReportError", "register_technique"]
