"""Prompt ensembles and object names (METHODS.md section 1).

A prompt set is (normal states, anomalous states, templates); a state holds ``{}`` for the object
name (or no placeholder at all) and a template holds exactly one ``{}`` for the state phrase. The
compositional ensemble is every template applied to every state, in template-major order.

The lists are data, not code: one YAML file per set in ``pipeline/models/prompt_data/`` (shipped
as package data), with keys ``name``, ``source`` (where the list comes from), ``normal_states``,
``anomalous_states`` and ``templates``. Files are read through ``importlib.resources`` on first use
and cached. Sets:

- ``winclip`` (154 normal / 88 anomalous sentences), ``winclip_anomalib`` (147 / 84),
  ``april_gan`` (245 / 175), ``vvv`` (19 x 22 = 418 / 23 x 22 = 506);
- ``zsad_agnostic``: zsad's own object-agnostic sentences (never naming the object, no
  placeholder, template ``"{}"``), so ``sentences()`` returns them unchanged for any object name.

``LOCALISING_PROMPTS`` holds VVV's 18 object-agnostic localising prompts (``vvv_localising.yaml``).

Braces other than the ``{}`` placeholder are rejected when a file is loaded, so ``str.format`` on
states and templates can never fail or substitute anything else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources

import yaml

from pipeline.errors import ZsadError

_DATA_PACKAGE = "pipeline.models"
_DATA_DIR = "prompt_data"

#: Names of the prompt sets, in the order of ``pipeline.config.PromptSetName``.
PROMPT_SET_NAMES: tuple[str, ...] = ("winclip", "winclip_anomalib", "april_gan", "vvv", "zsad_agnostic")
_LOCALISING_FILE = "vvv_localising"
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class PromptSet:
    name: str
    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]
    source: str = ""

    def sentences(self, object_name: str) -> tuple[list[str], list[str]]:
        """(normal sentences, anomalous sentences) for one object name.

        Template-major: for each template, every state in order. A state without ``{}`` ignores
        the object name. The object name is inserted literally (braces in it are not re-parsed).
        """
        normal = [t.format(s.format(object_name)) for t in self.templates for s in self.normal_states]
        anomalous = [t.format(s.format(object_name)) for t in self.templates for s in self.anomalous_states]
        return normal, anomalous


def _read_yaml(stem: str) -> dict:
    ref = resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, f"{stem}.yaml")
    try:
        text = ref.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"prompt data file {_DATA_DIR}/{stem}.yaml is missing from {_DATA_PACKAGE}") from exc
    data = yaml.load(text, Loader=_YAML_LOADER)
    if not isinstance(data, dict):
        raise ValueError(f"{_DATA_DIR}/{stem}.yaml: expected a mapping at the top level")
    if data.get("name") != stem:
        raise ValueError(f"{_DATA_DIR}/{stem}.yaml: 'name' is {data.get('name')!r}, expected {stem!r}")
    if not isinstance(data.get("source"), str) or not data["source"].strip():
        raise ValueError(f"{_DATA_DIR}/{stem}.yaml: 'source' must be a non-empty string")
    return data


def _strings(data: dict, key: str, stem: str, max_placeholders: int, min_placeholders: int = 0) -> tuple[str, ...]:
    """A non-empty list of non-empty strings whose only braces are at most/least N ``{}``."""
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise ValueError(f"{_DATA_DIR}/{stem}.yaml: {key!r} must be a non-empty list")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{_DATA_DIR}/{stem}.yaml: {key!r} holds a non-string or empty entry: {item!r}")
        n = item.count("{}")
        rest = item.replace("{}", "")
        if "{" in rest or "}" in rest:
            raise ValueError(
                f"{_DATA_DIR}/{stem}.yaml: {key!r} entry {item!r} has braces other than the '{{}}' placeholder"
            )
        if not min_placeholders <= n <= max_placeholders:
            raise ValueError(
                f"{_DATA_DIR}/{stem}.yaml: {key!r} entry {item!r} has {n} '{{}}' placeholders "
                f"(expected {min_placeholders}..{max_placeholders})"
            )
        out.append(item)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _load_set(name: str) -> PromptSet:
    data = _read_yaml(name)
    return PromptSet(
        name=name,
        normal_states=_strings(data, "normal_states", name, max_placeholders=1),
        anomalous_states=_strings(data, "anomalous_states", name, max_placeholders=1),
        templates=_strings(data, "templates", name, max_placeholders=1, min_placeholders=1),
        source=data["source"],
    )


@functools.lru_cache(maxsize=None)
def _load_localising() -> tuple[str, ...]:
    data = _read_yaml(_LOCALISING_FILE)
    return _strings(data, "prompts", _LOCALISING_FILE, max_placeholders=0)


def prompt_set(name: str) -> PromptSet:
    """The prompt set called ``name`` (loaded from package data on first use, then cached)."""
    if name not in PROMPT_SET_NAMES:
        raise ValueError(f"unknown prompt set {name!r}; known prompt sets: {', '.join(PROMPT_SET_NAMES)}")
    return _load_set(name)


class _PromptSets(Mapping[str, PromptSet]):
    """Read-only mapping name -> PromptSet over ``PROMPT_SET_NAMES``; loads each set lazily.
    Indexing an unknown name raises ``KeyError`` (as a dict would); ``prompt_set()`` raises
    ``ValueError`` with the list of known names."""

    def __getitem__(self, name: str) -> PromptSet:
        if name not in PROMPT_SET_NAMES:
            raise KeyError(name)
        return _load_set(name)

    def __iter__(self) -> Iterator[str]:
        return iter(PROMPT_SET_NAMES)

    def __len__(self) -> int:
        return len(PROMPT_SET_NAMES)

    def __repr__(self) -> str:
        return f"PROMPT_SETS({', '.join(PROMPT_SET_NAMES)})"


PROMPT_SETS: Mapping[str, PromptSet] = _PromptSets()


#: VVV's 18 object-agnostic localising prompts ("a tear", "a rip", ... "a mistake"), one pixel map each.
LOCALISING_PROMPTS: tuple[str, ...] = _load_localising()


# Category folder names whose natural object name differs from the folder name with ``_`` -> space:
# VisA (pcb1-4, macaroni1/2, chewinggum, pipe_fryum), MVTec AD (metal_nut), MPDD
# (bracket_*) and MVTec AD 2 (fruit_jelly, sheet_metal, wallplugs, walnuts).
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
    "bracket_black": "black bracket",
    "bracket_brown": "brown bracket",
    "bracket_white": "white bracket",
    "metal_plate": "metal plate",
    "fruit_jelly": "fruit jelly",
    "sheet_metal": "sheet metal",
    "wallplugs": "wall plugs",
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


# --------------------------------------------------------------------------------------------
# Prompt files the user supplies (FADE's JSON layout) and sentence wrappers
# --------------------------------------------------------------------------------------------

#: the object-name placeholder of FADE's prompt files
CLASSNAME = "{classname}"


class PromptFileError(ZsadError, ValueError):
    """A prompt file that cannot be used; the message names the file and the problem."""

    exit_code = 2


def parse_prompt_file(text: str, source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(normal, abnormal) sentences of a prompt file in FADE's JSON layout.

    Accepted: ``{"normal": {"prompts": [...]}, "abnormal": {"prompts": [...]}}`` (FADE's files; other
    keys such as ``instruction`` are ignored) or ``{"normal": [...], "abnormal": [...]}``. Sentences
    are kept as written, duplicates included (FADE keeps them); the only braces allowed are
    ``{classname}``."""
    import json

    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PromptFileError(f"prompt file {source}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PromptFileError(f"prompt file {source}: expected an object with 'normal' and 'abnormal'")
    out = []
    for key in ("normal", "abnormal"):
        if key not in data:
            raise PromptFileError(f"prompt file {source}: no {key!r} list")
        items = data[key]
        if isinstance(items, dict):
            if "prompts" not in items:
                raise PromptFileError(f"prompt file {source}: {key!r} has no 'prompts' list")
            items = items["prompts"]
        if not isinstance(items, list) or not items:
            raise PromptFileError(f"prompt file {source}: {key!r} must be a non-empty list of sentences")
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise PromptFileError(f"prompt file {source}: {key!r} holds a non-string or empty entry: {item!r}")
            rest = item.replace(CLASSNAME, "")
            if "{" in rest or "}" in rest:
                raise PromptFileError(
                    f"prompt file {source}: {key!r} sentence {item!r} has braces other than the {CLASSNAME} placeholder"
                )
        out.append(tuple(items))
    return out[0], out[1]


def read_prompt_file(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """:func:`parse_prompt_file` of a local file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"prompt file {path}: cannot be read ({exc})") from None
    return parse_prompt_file(text, path)


def file_sentences(lists: tuple[tuple[str, ...], tuple[str, ...]], object_name: str) -> tuple[list[str], list[str]]:
    """A prompt file's (normal, abnormal) sentences with ``{classname}`` replaced by the object name."""
    return [s.replace(CLASSNAME, object_name) for s in lists[0]], [s.replace(CLASSNAME, object_name) for s in lists[1]]


def wrap(sentences: list[str], wrapper: str | None) -> list[str]:
    """Every sentence put into ``wrapper`` (one ``{}``), e.g. FADE's text encoder turns
    "a cropped photo of the object" into "a photo of a a cropped photo of the object."."""
    if not wrapper:
        return list(sentences)
    head, _, tail = wrapper.partition("{}")
    return [f"{head}{s}{tail}" for s in sentences]


def ensemble(
    sets: tuple[str, ...],
    files: list[tuple[tuple[str, ...], tuple[str, ...]]],
    object_name: str,
    wrapper: str | None = None,
) -> tuple[list[str], list[str]]:
    """(normal, anomalous) sentences for one object name: the named sets' sentences, then each
    file's, in order, every sentence wrapped by ``wrapper``."""
    normal: list[str] = []
    anomalous: list[str] = []
    for name in sets:
        n, a = prompt_set(name).sentences(object_name)
        normal += n
        anomalous += a
    for lists in files:
        n, a = file_sentences(lists, object_name)
        normal += n
        anomalous += a
    return wrap(normal, wrapper), wrap(anomalous, wrapper)
