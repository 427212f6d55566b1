"""The features, one module each. Order here is the order of doctor's rows."""

from __future__ import annotations

from ..features import Feature
from .gdn_in_proj import FEATURE as GDN_IN_PROJ

FEATURES: dict[str, Feature] = {f.name: f for f in (GDN_IN_PROJ,)}
