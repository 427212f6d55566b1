"""The fork/join recorder's hazard check can fail: each kind of cross-branch access it must
catch, and the aliasing it must not mistake for one."""

from __future__ import annotations

import pytest
import torch
from fork_join_recorder import fork, join

from vllm_overlap.runtime import streams


def test_hazard_check_catches_a_branch_writing_what_the_other_reads(recorder):
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)

    def region():
        return streams.run_pair("probe", lambda: x @ w, lambda: x.mul_(2), 4, None)

    recorder.run(region)
    assert recorder.log == [fork("probe"), join("probe")]
    with pytest.raises(AssertionError, match="branch 1 writes what branch 0 uses"):
        recorder.assert_no_cross_branch_hazard()


def test_hazard_check_passes_independent_branches(recorder):
    x = torch.randn(4, 8)
    w0, w1 = torch.randn(8, 8), torch.randn(8, 3)
    recorder.run(lambda: streams.run_pair("probe", lambda: x @ w0, lambda: x @ w1, 4, None))
    recorder.assert_no_cross_branch_hazard()


def test_hazard_check_compares_every_pair_of_a_fan_outs_branches(recorder):
    """A fan-out of three: the two aux branches are checked against each other too."""
    x = torch.randn(4, 8)
    w0, w1, w2 = torch.randn(8, 8), torch.randn(8, 3), torch.randn(8, 5)
    y = torch.randn(4, 5)

    def fan(third):
        return recorder.run(lambda: streams.run_many("probe", lambda: x @ w0, [lambda: x @ w1, third], 4, None))

    r0, (r1, r2) = fan(lambda: x @ w2)
    assert recorder.log == [fork("probe"), join("probe")] and r2.shape == (4, 5)
    recorder.assert_no_cross_branch_hazard()
    fan(lambda: torch.add(x @ w2, 0, out=y))  # writes y, which no other branch touches: fine
    recorder.assert_no_cross_branch_hazard()
    fan(lambda: (x @ w1).add_(1) + y.copy_(x @ w2)[:, :3])  # reads w1 too: a read is no hazard
    recorder.assert_no_cross_branch_hazard()
    fan(lambda: w1.mul_(1))  # writes what branch 1 reads
    with pytest.raises(AssertionError, match="branch 2 writes what branch 1 uses"):
        recorder.assert_no_cross_branch_hazard()


def test_hazard_check_ignores_views_of_an_input_both_branches_read(recorder):
    """Both branches reshape the input they share, as vLLM's CPU GEMM kernels do on some
    machines: a view aliases its input, it writes nothing."""
    x = torch.randn(4, 8)
    w0, w1 = torch.randn(8, 8), torch.randn(8, 3)
    recorder.run(
        lambda: streams.run_pair(
            "probe", lambda: x.view(2, 16).view(4, 8) @ w0, lambda: x.t().t()[:, :8] @ w1, 4, None
        )
    )
    recorder.assert_no_cross_branch_hazard()


def test_hazard_check_catches_a_write_through_a_view(recorder):
    x = torch.randn(4, 8)
    w0 = torch.randn(8, 8)
    recorder.run(lambda: streams.run_pair("probe", lambda: x @ w0, lambda: x.view(32)[:8].add_(0), 4, None))
    with pytest.raises(AssertionError, match="branch 1 writes what branch 0 uses"):
        recorder.assert_no_cross_branch_hazard()


def test_hazard_check_ignores_a_temporary_freed_in_one_branch_and_a_new_tensor_in_the_other(
    recorder,
):
    """Branch 0's products are freed inside the branch; branch 1 then makes tensors of the
    same sizes, which a CPU allocator tends to place at the freed addresses (glibc's does for
    some of these sizes). Different tensors, no hazard."""
    sizes = (8, 16, 24, 32, 48, 64)
    x = {n: torch.randn(n, n) for n in sizes}
    w0 = {n: torch.randn(n, n) for n in sizes}
    w1 = {n: torch.randn(n, n) for n in sizes}

    def branch0():  # each product is a temporary, freed before the branch returns
        return [(x[n] @ w0[n]).exp().sum() for n in sizes]

    def branch1():  # new tensors of the same sizes
        return [x[n] @ w1[n] for n in sizes]

    recorder.run(lambda: streams.run_pair("probe", branch0, branch1, 8, None))
    recorder.assert_no_cross_branch_hazard()
