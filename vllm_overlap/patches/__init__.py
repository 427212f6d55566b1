"""The features, one module each. Order here is the order of doctor's rows."""

from __future__ import annotations

from ..features import Feature
from .deepseek_indexer import FEATURE as DEEPSEEK_INDEXER
from .gdn_in_proj import FEATURE as GDN_IN_PROJ
from .mla_q_b_proj import FEATURE as MLA_Q_B_PROJ

FEATURES: dict[str, Feature] = {
    f.name: f for f in (GDN_IN_PROJ, DEEPSEEK_INDEXER, MLA_Q_B_PROJ)
}
