"""``python -m vllm_overlap.cli``: the same as the ``vllm-overlap`` console script."""

import sys

from vllm_overlap.cli import main

sys.exit(main())
