"""Prompt ensembles and object names (METHODS.md section 1).

A prompt set is (normal states, anomalous states, templates); a state holds ``{}`` for the object
name and a template holds ``{}`` for the state phrase. The compositional ensemble is every
template applied to every state, in template-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

WINCLIP_NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
WINCLIP_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}",
    "a cropped photo of a {}",
    "a close-up photo of a {}",
    "a close-up photo of the {}",
    "a bright photo of a {}",
    "a bright photo of the {}",
    "a dark photo of the {}",
    "a dark photo of a {}",
    "a jpeg corrupted photo of a {}",
    "a jpeg corrupted photo of the {}",
    "a blurry photo of the {}",
    "a blurry photo of a {}",
    "a photo of a {}",
    "a photo of the {}",
    "a photo of a small {}",
    "a photo of the small {}",
    "a photo of a large {}",
    "a photo of the large {}",
    "a photo of the {} for visual inspection",
    "a photo of a {} for visual inspection",
    "a photo of the {} for anomaly detection",
    "a photo of a {} for anomaly detection",
)


def _anomalib_templates() -> tuple[str, ...]:
    """anomalib's WinCLIP list: the 22 templates minus "a cropped photo of a {}" and
    "a jpeg corrupted photo of a {}", each ending with a period, with
    "a jpeg corrupted photo of the {}." listed twice (21 entries)."""
    dropped = {"a cropped photo of a {}", "a jpeg corrupted photo of a {}"}
    out = []
    for t in WINCLIP_TEMPLATES:
        if t in dropped:
            continue
        out.append(t + ".")
        if t == "a jpeg corrupted photo of the {}":
            out.append(t + ".")
    return tuple(out)


@dataclass(frozen=True)
class PromptSet:
    name: str
    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]

    def sentences(self, object_name: str) -> tuple[list[str], list[str]]:
        """(normal sentences, anomalous sentences) for one object name."""
        normal = [t.format(s.format(object_name)) for t in self.templates for s in self.normal_states]
        anomalous = [t.format(s.format(object_name)) for t in self.templates for s in self.anomalous_states]
        return normal, anomalous


PROMPT_SETS: dict[str, PromptSet] = {
    "winclip": PromptSet("winclip", WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES),
    "winclip_anomalib": PromptSet("winclip_anomalib", WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, _anomalib_templates()),
}

# Category folder names of MVTec AD / VisA whose natural object name differs from the folder name.
OBJECT_NAME_MAP: dict[str, str] = {
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "chewinggum": "chewing gum",
    "pipe_fryum": "pipe fryum",
    "metal_nut": "metal nut",
}


def object_name(category: str, policy: str = "mapping", overrides: dict[str, str] | None = None) -> str:
    """The object name used in prompts for ``category``.

    ``raw``: the category as is; ``underscore``: ``_`` -> space; ``mapping``: the built-in table
    (pcb1 -> printed circuit board, ...) then ``_`` -> space. ``overrides`` win over the policy.
    """
    if overrides and category in overrides:
        return overrides[category]
    if policy == "raw":
        return category
    if policy == "underscore":
        return category.replace("_", " ")
    if policy == "mapping":
        return OBJECT_NAME_MAP.get(category, category).replace("_", " ")
    raise ValueError(f"unknown object-name policy {policy!r} (raw, underscore, mapping)")
