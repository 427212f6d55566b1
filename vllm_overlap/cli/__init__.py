"""Stage 6, the commands: ``vllm-overlap doctor | diff | compat | prove | calibrate | config``, one module per
command behind :class:`~vllm_overlap.cli.command.Command`, and the release tools built on them
(the release canary, the generated site table of docs/sites.md).

May import every lower stage (engine, sites, config, runtime, testing) and the shared leaves;
nothing below imports this package. Nothing here runs inside a vLLM process but what a command runs itself.
"""


def main(argv=None) -> int:
    """The console script ``vllm-overlap`` (kept at ``vllm_overlap.cli:main`` for installed users)."""
    from vllm_overlap.cli.dispatch import main as dispatch_main

    return dispatch_main(argv)
