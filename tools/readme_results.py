"""Copy the summary table of ``bench/results/summary-<device>.md`` into README.md's results block.

``make bench`` writes the summary; this script (run by ``make bench`` after it, or by hand) puts
its parameter-sweep rows, which carry both time and memory, between the README's
``<!-- results:start -->`` and ``<!-- results:end -->`` markers, so no figure in the README is
typed by hand. ``--check`` exits 1 when the README is out of date (tests/test_docs.py runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List

from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def block_for(summary: Path) -> str:
    """The README block for one summary file: its date/device lines, the parameter-sweep rows, the plots."""
    text = summary.read_text()
    header = [line for line in text.splitlines() if re.match(r"- (date|device|versions)\b", line)]
    rows = [_cells(line) for line in text.splitlines() if line.startswith("| ") and "|" in line[2:]]
    head, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0]) and not set(r[0]) <= {"-"}]
    col = {name: k for k, name in enumerate(head)}
    picked = [r for r in body if r[col["sweep"]] == "params"]
    rel = summary.relative_to(ROOT).as_posix()
    lines = [f"From [`{rel}`]({rel}) (`make bench`; its header has the method):", ""]
    lines += [f"  {line}" for line in header]
    names = ("MLP d→d→10", "N", "baseline time", "zo_kernels time", "speed-up", "memory ratio")
    table = [[f"{r[col['baseline']]} vs {r[col['zo_kernels']]}"] + [r[col[name]] for name in names] for r in picked]
    headers = ["baseline", "model", "N", "baseline", "zo_kernels", "speed-up", "peak memory ratio"]
    lines += ["", tabulate(table, headers, tablefmt="github", disable_numparse=True)]
    stem = summary.stem
    plots = sorted(p.name for p in RESULTS.glob(f"{stem}-*.png"))
    lines += ["", "Plots: " + ", ".join(f"[{p}](bench/results/{p})" for p in plots) + "."]
    return "\n".join(lines)


def render(readme: str) -> str:
    """``readme`` with the results block replaced by the current summaries' tables."""
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    summaries = sorted(p for p in RESULTS.glob("summary-*.md") if not p.stem.endswith("-quick"))
    body = "\n\n".join(block_for(p) for p in summaries) or "No `make bench` summary has been recorded yet."
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{body}\n{END}{after}"


def main(argv: List[str]) -> int:
    """Rewrite README.md's results block, or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args(argv)
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md's results block is out of date: run `python tools/readme_results.py`")
            return 1
        return 0
    README.write_text(fresh)
    print(f"wrote the results block of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
