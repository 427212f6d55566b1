"""What the post-load steps found in the loaded model.

``site_reports``: per site, how many layers run it, how many overlap and why the others run
upstream's statements (``runtime.census``). ``post_load_reports``: per feature (or failed
step), its own step's report (the DeepSeek MLA census, the GDN fusion)."""

from __future__ import annotations

site_reports: dict[str, dict] = {}
post_load_reports: dict[str, dict] = {}
