"""compile_form: a site's branches compiled from the statements its anchors matched, and the
proofs it makes before anything runs, for a pair and for a fan-out of three (synthetic
upstream code; the declared sites are covered by the harness)."""

from __future__ import annotations

import textwrap

import pytest

from vllm_overlap.engine.branches import compile_form
from vllm_overlap.engine.rewrite import Anchor, RewriteSkipped, Target
from vllm_overlap.engine.site import Branch, Facts, Form, Site

UPSTREAM = """
def forward(self, x):
    y = x + 1
    a = self.left(x)
    b = self.mid(x)
    c = self.right(x)
    return a + b + c + y
"""

THREE = Anchor(
    "a = self.left(x)\nb = self.mid(x)\nc = self.right(x)",
    "b, a, c = __site__.fan(self, x)",
)


def _site(anchor=THREE, current="b = self.mid(x)", aux=("a = self.left(x)", "c = self.right(x)"), params=("self", "x")):
    def branch(text):
        return Branch(text, text.split(" = ")[0])

    aux_branches = tuple(branch(t) for t in aux) if isinstance(aux, tuple) else branch(aux)
    return Site(
        id="probe",
        feature="gdn_in_proj",
        summary="synthetic",
        targets=(Target("probe_module", "Layer.forward"),),
        forms=(Form((anchor,), current=branch(current), aux=aux_branches),),
        entry="fan",
        params=params,
        tokens="x",
        dynamo="plain",
        facts=Facts("why", "how", "upstream", "remove when"),
    )


def _compile(site, source=UPSTREAM):
    return compile_form(site, 0, textwrap.dedent(source), {}, "<probe>", 1)


class Layer:
    """Each projection logs its call and returns a value of its own."""

    def __init__(self):
        self.calls = []
        for name, value in (("left", 10), ("mid", 20), ("right", 30)):
            setattr(self, name, self._projection(name, value))

    def _projection(self, name, value):
        def project(x):
            self.calls.append(name)
            return x * value

        return project


def test_a_fan_out_names_its_branches_and_runs_them_in_upstreams_order():
    site = _site()
    assert site.problems() == []
    compiled = _compile(site)
    assert list(compiled.branches) == ["current", "aux", "aux2"]
    assert compiled.order == ("aux", "current", "aux2")  # by upstream's lines, not the form's
    layer = Layer()
    assert compiled.serial(layer, 2) == (40, 20, 60)  # the form's order: mid, left, right
    assert layer.calls == ["left", "mid", "right"]
    assert compiled.sources == {"current": "b = self.mid(x)\n", "aux": "a = self.left(x)\n", "aux2": "c = self.right(x)\n"}


def test_a_skipped_branch_does_not_run_and_gives_none():
    compiled = _compile(_site())
    layer = Layer()
    assert compiled.serial(layer, 1, skip="aux2") == (20, 10, None)
    assert layer.calls == ["left", "mid"]


def test_a_pair_keeps_its_two_names():
    compiled = _compile(_site(current="a = self.left(x)", aux="b = self.mid(x)"))
    assert list(compiled.branches) == ["current", "aux"] and compiled.order == ("current", "aux")
    assert compiled.serial(Layer(), 1) == (10, 20)


def test_the_projections_are_every_branchs_calls_on_the_layer():
    layer = Layer()
    compiled = _compile(_site())
    assert compiled.projections(layer, 1) == (layer.mid, layer.left, layer.right)


def test_two_aux_branches_that_are_not_independent_are_refused():
    """The second aux branch reads a name (a parameter of the entry) that the first assigns:
    their order would matter."""
    source = UPSTREAM.replace("def forward(self, x):", "def forward(self, x, z):")
    source = source.replace("a = self.left(x)", "z = self.left(x)").replace("self.right(x)", "self.right(z)")
    anchor = Anchor("z = self.left(x)\nb = self.mid(x)\nc = self.right(z)", "b, z, c = __site__.fan(self, x, z)")
    site = _site(anchor, aux=("z = self.left(x)", "c = self.right(z)"), params=("self", "x", "z"))
    with pytest.raises(RewriteSkipped, match="the aux branch assigns z, which the aux2 branch reads: not independent"):
        _compile(site, source)
    # the same statements where nothing reads z afterwards compile
    source = source.replace("self.right(z)", "self.right(x)")
    anchor = Anchor("z = self.left(x)\nb = self.mid(x)\nc = self.right(x)", "b, z, c = __site__.fan(self, x, z)")
    assert _compile(_site(anchor, aux=("z = self.left(x)", "c = self.right(x)"), params=("self", "x", "z")), source)


def test_a_branch_reading_another_branchs_result_is_refused():
    source = UPSTREAM.replace("c = self.right(x)", "c = self.right(a)")
    anchor = Anchor("a = self.left(x)\nb = self.mid(x)\nc = self.right(a)", "b, a, c = __site__.fan(self, x)")
    with pytest.raises(RewriteSkipped, match="the aux2 branch reads a, which it is not passed"):
        _compile(_site(anchor, aux=("a = self.left(x)", "c = self.right(a)")), source)


def test_a_branch_outside_the_matched_statements_is_refused():
    anchor = Anchor("a = self.left(x)\nb = self.mid(x)", "b, a = __site__.fan(self, x)")
    with pytest.raises(RewriteSkipped, match="the aux2 branch's statements are not in the matched code"):
        _compile(_site(anchor))


def test_every_form_of_a_site_has_the_same_branches():
    site = _site()
    pair = Form((THREE,), current=Branch("b = self.mid(x)", "b"), aux=Branch("a = self.left(x)", "a"))
    broken = Site(**{**site.__dict__, "forms": (site.forms[0], pair)})
    assert broken.problems() == [
        "probe form 1: branches ['current', 'aux'], form 0 has ['current', 'aux', 'aux2']"
    ]


def test_an_op_site_declares_one_output_per_value_of_every_branch():
    site = _site()
    op = Site(**{**site.__dict__, "dynamo": "op"})
    assert op.problems() == ["probe: 0 outputs declared, branches return 3"]
