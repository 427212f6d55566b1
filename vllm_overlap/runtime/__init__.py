"""Stage 4, the in-process runtime: what runs inside vLLM's processes. ``plugin`` (what
``register()`` does), ``hooks`` (the one way into vLLM: every hook and wrapper, firewalled),
``cache_key`` (the overlay in vLLM's compile-cache key), ``streams`` (the fork/join primitive),
``site_runtime`` (each site's decision ladder and op), ``module_namespaces`` (the namespaces the
rewritten code calls), ``layer_registry`` (how an op finds its layer), the gates, hazard and
stream-safety checks, and the post-load steps: ``census`` (per site, which layers overlap),
``reports`` (what they found), ``deepseek_post_load``, ``gdn_fuse``, ``gdn_upstream``, ``refusals``;
``vllm_names`` (every vLLM name the runtime reads, with its fallback).

May import: every lower stage (engine, sites, config) and the shared leaves; torch and vLLM only
inside functions that run after vLLM imported them (``plugin`` imports neither).
"""
