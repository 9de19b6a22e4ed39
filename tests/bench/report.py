"""docs/benchmarks.md: each benchmark owns one `## Title` section and rewrites only that."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def write_section(title: str, text: str) -> None:
    """Replace the `## {title}` section with `text` (which starts with that heading), or
    append it; other sections stay as they are."""
    heading = f"## {title}"
    current = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        DOCS.write_text(current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    DOCS.write_text(
        "".join(lines[:start]) + text.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    )
