"""Stage 1, the rewrite engine: what a site is (``site``, ``settings``), how upstream
statements are found and replaced in a live function (``rewrite``, ``syntax``), how a matched
site's branches and serial path are compiled from upstream's own lines (``branches``), rewrites
on source text (``sources``: diffs, compat), where upstream already forks a site's pair
(``upstream``), the proof of a user-declared site (``user_sites``), the private directory the
rewritten sources are written to (``cache_dir``) and which features a model's layers run, by
the architecture vLLM builds (``architectures``; vLLM's model registry is read only inside the
function that needs it).

May import: the standard library, pydantic, and the shared leaves ``vllm_overlap.log`` and
``vllm_overlap.outcomes``. No torch and no vLLM at import time, and nothing of a higher stage.
"""
