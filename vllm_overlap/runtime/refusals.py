"""Declared refusals (``Site.refused_inside``): after loading, every layer of a site that sits
inside an instance of a refused class is marked, and the ladder runs upstream's statements
for it (the census gives the declared reason).

The mark is a plain attribute per site on the layer, read by the rewritten code (under
torch.compile too: its value is fixed once the model is loaded).
"""

from __future__ import annotations

import sys

import torch


def attribute(site_id: str) -> str:
    return f"_vllm_overlap_refused_{site_id}"


def reason(layer: torch.nn.Module, site_id: str) -> str:
    """Why ``layer`` must not run ``site_id`` overlapped ("" if nothing refuses it)."""
    return getattr(layer, attribute(site_id), "")


def refused_classes(site) -> list[tuple[type, str]]:
    """(class, reason) of the site's refusals whose class this process has imported (a model
    of a class never imported has no instance of it)."""
    out = []
    for refusal in site.refused_inside:
        owner: object = sys.modules.get(refusal.module)
        for part in refusal.qualname.split("."):
            owner = getattr(owner, part, None)
        if isinstance(owner, type):
            out.append((owner, f"inside {refusal.qualname}: {refusal.reason}"))
    return out


def mark(model: torch.nn.Module, site, site_layers: list[torch.nn.Module]) -> int:
    """Mark every layer of ``site_layers`` (the site's layers in ``model``) that sits inside a
    refused class's instance; returns how many were marked."""
    classes = refused_classes(site)
    if not classes:
        return 0
    wanted = {id(layer) for layer in site_layers}
    marked = 0
    for owner in model.modules():
        why = next((why for cls, why in classes if isinstance(owner, cls)), None)
        if why is None:
            continue
        for inner in owner.modules():
            if id(inner) in wanted and not reason(inner, site.id):
                inner.__dict__[attribute(site.id)] = why
                marked += 1
    return marked
