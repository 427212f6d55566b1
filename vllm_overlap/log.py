"""The overlay's logger: vLLM's, under ``vllm.vllm_overlap``, so its lines look like vLLM's."""

from __future__ import annotations

import logging


def logger() -> logging.Logger:
    try:
        from vllm.logger import init_logger
    except ImportError:  # pragma: no cover - vLLM always present in real use
        return logging.getLogger("vllm.vllm_overlap")
    return init_logger("vllm.vllm_overlap")
