"""Stage 1, the rewrite engine: what a site is (``site``, ``settings``), how upstream
statements are found and replaced in a live function (``rewrite``, ``syntax``), how a matched
site's branches and serial path are compiled from upstream's own lines (``branches``), rewrites
on source text (``sources``: diffs, compat), where upstream already forks a site's pair
(``upstream``), the proof of a user-declared site (``user_sites``) and the private directory the
rewritten sources are written to (``cache_dir``).

May import: the standard library, pydantic, and the shared leaves ``vllm_overlap.log`` and
``vllm_overlap.outcomes``. No torch and no vLLM at import time, and nothing of a higher stage.
"""
