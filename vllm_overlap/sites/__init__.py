"""Stage 2, the site declarations: every feature and the sites it groups, one module per
feature (this file is the registry). Only declarations live here, each with its four facts;
which architectures run which feature and which vLLM names the runtime reads are the
engine's and the runtime's (``engine.architectures``, ``runtime.vllm_names``).

May import: the engine (stage 1) and the shared leaves. No torch, no vLLM at import time. A
declaration names its runtime steps (post-load, mode factories, upstream switch) as
``"module:function"`` strings that the runtime resolves when it runs them; the runtime passes
each step its feature, so nothing below looks the registry up by name.

Order here is the order of doctor's rows, the config's keys and the site table in docs/sites.md; the order
in which sites stack on a shared target is each site's ``stack``, not this.
"""

from __future__ import annotations

from vllm_overlap.engine.site import Feature, Site
from vllm_overlap.sites.deepseek_indexer import FEATURE as DEEPSEEK_INDEXER
from vllm_overlap.sites.delta_in_proj import FEATURE as DELTA_IN_PROJ
from vllm_overlap.sites.gdn_in_proj import FEATURE as GDN_IN_PROJ
from vllm_overlap.sites.kv_a_proj import FEATURE as KV_A_PROJ
from vllm_overlap.sites.mla_q_b_proj import FEATURE as MLA_Q_B_PROJ

FEATURES: dict[str, Feature] = {
    f.name: f for f in (GDN_IN_PROJ, DEEPSEEK_INDEXER, MLA_Q_B_PROJ, KV_A_PROJ, DELTA_IN_PROJ)
}
SITES: dict[str, Site] = {s.id: s for f in FEATURES.values() for s in f.sites}


def problems() -> list[str]:
    """What is wrong with the registry as declared (empty: nothing)."""
    out = [p for s in SITES.values() for p in s.problems()]
    for feature in FEATURES.values():
        out += [f"{s.id}: declared under {feature.name}, says {s.feature}"
                for s in feature.sites if s.feature != feature.name]
        out += [f"{s.id}: no entry for {feature.name}'s mode {m}"
                for s in feature.sites for m in feature.extra_modes if m not in dict(s.modes)]
        by_module: dict[tuple[str, str], str] = {}
        for site in feature.sites:
            for module in {t.module for t in site.targets}:
                other = by_module.setdefault((module, site.entry), site.id)
                if other != site.id:
                    out.append(f"{site.id} and {other} both call {site.entry} in {module}")
    ids = [s.id for f in FEATURES.values() for s in f.sites]
    out += [f"site id {i} declared twice" for i in set(ids) if ids.count(i) > 1]
    return out
