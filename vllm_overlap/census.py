"""What the post-load steps found in the loaded model: per feature (or failed step), a report
of how many layers overlap and why the others run serially."""

from __future__ import annotations

post_load_reports: dict[str, dict] = {}
