"""vllm-overlap: a vLLM plugin that runs independent GEMMs of DeepSeek-V3.2 attention and of
Qwen3-Next / Qwen3.5 Gated DeltaNet on two streams.

Importing this package is cheap (no torch, no vLLM); vLLM calls :func:`register` through the
``vllm.general_plugins`` entry point in every process.
"""

__version__ = "0.1.0"


def register() -> None:
    from vllm_overlap.runtime.plugin import register as _register

    _register()
