"""Plain-text tables (doctor, compat, benchmarks)."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
