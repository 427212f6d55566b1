"""Stage 5, test and benchmark support: tiny random-weight models and a tokenizer built offline
(``tiny_models``), each site's real vLLM layer at a model's shapes (``layer_builders``), a
runner that generates through ``vllm.LLM`` (``llm_runner``) and the per-site region timing
(``layer_bench``, used by ``benchmarks/`` and ``vllm-overlap calibrate``).

May import: every lower stage (engine, sites, config, runtime) and the shared leaves. Nothing in
vLLM's processes imports it unless a test or a benchmark runs it.
"""
