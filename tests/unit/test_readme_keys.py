"""README's table of spec keys against the spec models (issue 30): every key the table names is a
field of :class:`pipeline.config.JobSpec` (a section or a key under one), every key of the models
is in the table, and a default written as one literal is the model's, so the two cannot drift apart.

A key cell holds one or more keys in backticks: full dotted keys (`` `retries.read` ``), keys
relative to the first one's section (`` `few_shot.reference`, `layout` ``), a kind with its own keys
(`` `pixel.kind: april_gan` (`layers`, `image_size`) ``) or a section with its keys
(`` `sam_refine` (`steps`, `combine`) ``)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import JobSpec, StageResources, WeightsSpec

README = Path(__file__).resolve().parents[2] / "README.md"
CODE = re.compile(r"`([^`]+)`")

#: models documented as one value, not key by key, with where their keys are described
WHOLE: dict[type, str] = {
    WeightsSpec: "a weights spec: its forms are README's 'Weights specs' section",
    StageResources: "resources.<stage>: its keys and defaults are in the row's default column",
}


def _models(annotation) -> list[type[BaseModel]]:
    """The spec models a field holds (through Optional, unions and Annotated), unless documented whole."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) and annotation not in WHOLE else []
    if typing.get_origin(annotation) in (typing.Union, typing.Annotated) or type(annotation).__name__ == "UnionType":
        args = typing.get_args(annotation)
        args = args[:1] if typing.get_origin(annotation) is typing.Annotated else args
        return [m for a in args for m in _models(a)]
    return []


def model_keys(model: type[BaseModel] = JobSpec, prefix: str = "") -> tuple[set[str], set[str]]:
    """(sections, leaf keys) of ``model``, dotted; the kinds of a per-kind section share one key set."""
    sections, leaves = set(), set()
    for name, field in model.model_fields.items():
        key = prefix + name
        inner = _models(field.annotation)
        if inner:
            sections.add(key)
            for m in inner:
                s, k = model_keys(m, key + ".")
                sections |= s
                leaves |= k
        else:
            leaves.add(key)
    return sections, leaves


def kinds(section: str) -> set[str]:
    """The ``kind`` values a per-kind section takes."""
    members = _models(JobSpec.model_fields[section].annotation)
    return {typing.get_args(m.model_fields["kind"].annotation)[0] for m in members}


def key_tables(text: str) -> list[list[list[str]]]:
    """The rows (lists of cells) of README's tables whose header starts with ``key``."""
    tables, rows, inside = [], None, False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            inside = False
            continue
        if not inside:
            inside = True
            rows = [] if cells[0] == "key" else None
            if rows is not None:
                tables.append(rows)
        elif rows is not None and not set(line) <= set("|-: "):
            rows.append(cells)
    return tables


def cell_keys(cell: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(dotted keys, (section, kind) pairs) that one key cell names."""
    match = re.match(r"^(?P<head>.*?)\s*\((?P<sub>[^()]*)\)\s*$", cell)
    head, sub = (match["head"], match["sub"]) if match else (cell, "")
    names = CODE.findall(head)
    assert names, f"README key cell without a `key`: {cell!r}"
    first, _, kind = names[0].partition(": ")
    keys, pairs = [first], []
    parent = first.rpartition(".")[0]
    for name in names[1:]:
        keys.append(name if "." in name or not parent else f"{parent}.{name}")
    base = parent if kind else first
    if kind:
        pairs.append((parent, kind))
    keys += [f"{base}.{name}" for name in CODE.findall(sub)]
    return keys, pairs


def documented() -> tuple[list[str], list[tuple[str, str]]]:
    tables = key_tables(README.read_text(encoding="utf-8"))
    assert tables, "README has no table of spec keys (| key | default | meaning |)"
    keys, pairs = [], []
    for row in (r for rows in tables for r in rows):
        k, p = cell_keys(row[0])
        keys += k
        pairs += p
    return keys, pairs


def test_every_documented_key_is_a_spec_key():
    sections, leaves = model_keys()
    keys, pairs = documented()
    unknown = sorted(k for k in keys if k not in sections | leaves)
    assert not unknown, f"README documents keys the spec models do not have: {unknown}"
    wrong = sorted(f"{s}: {k}" for s, k in pairs if k not in kinds(s))
    assert not wrong, f"README documents kinds that do not exist: {wrong}"


def test_every_spec_key_is_documented():
    _, leaves = model_keys()
    keys, _ = documented()
    missing = sorted(leaves - set(keys))
    assert not missing, f"spec keys missing from README's key table: {missing}"


def test_the_parser_reads_every_form_of_key_cell():
    assert cell_keys("`retries.read`, `retries.model_load`") == (["retries.read", "retries.model_load"], [])
    assert cell_keys("`few_shot.reference`, `layout`") == (["few_shot.reference", "few_shot.layout"], [])
    assert cell_keys("`pixel.kind: april_gan` (`layers`, `weights`)") == (
        ["pixel.kind", "pixel.layers", "pixel.weights"], [("pixel", "april_gan")])
    assert cell_keys("`sam_refine` (`steps`)") == (["sam_refine", "sam_refine.steps"], [])
    table = "| key | default | meaning |\n|---|---|---|\n| `a.b` | 1 | x |\n\n| preset | x |\n|---|---|\n| `c` | y |\n"
    assert key_tables(table) == [[["`a.b`", "1", "x"]]]


def _field(key: str):
    """The pydantic field of a dotted key (the first kind that has it, for a per-kind section)."""
    models: list[type[BaseModel]] = [JobSpec]
    for part in key.split("."):
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is None:
            return None
        models = _models(field.annotation)
    return field


def test_documented_defaults_match_the_models():
    """Where a row gives each of its keys a default that is one literal in backticks (`` `0.05` ``,
    `` `[2, 3]` ``), it is the model's default; prose defaults (none, from the environment) are not read."""
    checked, wrong = 0, []
    for row in (r for rows in key_tables(README.read_text(encoding="utf-8")) for r in rows):
        keys, pairs = cell_keys(row[0])
        keys = keys[1:] if pairs else keys  # `pixel.kind: april_gan`: the defaults are its keys'
        defaults = [d.strip() for d in row[1].split(", ")] if len(keys) > 1 else [row[1]]
        if len(defaults) != len(keys):
            continue
        for key, text in zip(keys, defaults):
            literal = re.fullmatch(r"`([^`]*)`", text)
            field = _field(key)
            if literal is None or field is None:
                continue
            want = field.get_default(call_default_factory=True)
            if want is PydanticUndefined or isinstance(want, BaseModel):
                continue
            try:
                given = yaml.safe_load(literal[1])
            except yaml.YAMLError:
                given = literal[1]
            want = list(want) if isinstance(want, tuple) else want
            checked += 1
            if given != want:
                wrong.append(f"{key}: README {literal[1]}, model {want!r}")
    assert checked > 50, checked  # the table's literal defaults are read at all
    assert not wrong, f"README's defaults differ from the models': {wrong}"
