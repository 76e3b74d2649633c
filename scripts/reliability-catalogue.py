#!/usr/bin/env python
"""Rewrite the bad-input list of docs/RELIABILITY.md (section 1) from the catalogue's own record.

    EFFDSTL_CATALOGUE_OUT=/tmp/cat.json .venv/bin/python -m pytest -q tests/test_bad_inputs.py
    .venv/bin/python scripts/reliability-catalogue.py /tmp/cat.json

The record (written by tests/test_bad_inputs.py) holds every case's command and the exact line
it printed; nothing in the list is typed by hand. Section 1's heading gets the counts; the prose
between the heading and the list stays as it is.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"


def render(rows: list[dict]) -> str:
    out = []
    for i, r in enumerate(rows, 1):
        phase = "validation" if r["phase"] == "pre" else "in a job"
        out.append(f"{i}. **{r['id']}** — {r['what']} ({phase}, exit {r['rc']})  ")
        out.append(f"   `{r['command']}`  ")
        if r.get("skipped"):
            out.append(f"   → skipped where the catalogue ran: {r['skipped']}")
        else:
            out.append(f"   → `{r['error']}`" if r["error"] else "   → (no single error line: see the test's output)")
    return "\n".join(out) + "\n"


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    rows = json.loads(Path(sys.argv[1]).read_text())
    text = DOC.read_text()
    head = re.search(r"^## 1\. Bad inputs:.*$", text, flags=re.M)
    first = re.search(r"^1\. \*\*", text[head.end():], flags=re.M)
    nxt = re.search(r"^## 2\.", text, flags=re.M)
    if not (head and first and nxt):
        raise SystemExit("docs/RELIABILITY.md: section 1's heading, list or section 2 not found")
    tried = [r for r in rows if not r.get("skipped")]
    refused = sum(1 for r in tried if r["rc"] != 0 and r["error"])
    heading = f"## 1. Bad inputs: {len(tried)} tried, {refused} refused cleanly, nothing lost"
    start = head.end() + first.start()
    prose = text[head.end():start]
    n_pre = sum(1 for r in tried if r["phase"] == "pre")
    prose = re.sub(r"The \d+ \*validation\* cases", f"The {n_pre} *validation* cases", prose)
    prose = re.sub(r"The \d+(\s+)\*in a job\* cases", lambda m: f"The {len(tried) - n_pre}{m.group(1)}*in a job* cases", prose)
    text = text[:head.start()] + heading + prose + render(rows) + "\n" + text[nxt.start():]
    DOC.write_text(text)
    print(f"docs/RELIABILITY.md: section 1 rewritten ({len(rows)} cases, {refused} refused in one line)")


if __name__ == "__main__":
    main()
