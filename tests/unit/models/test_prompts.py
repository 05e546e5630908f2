"""Prompt sets loaded from package data (METHODS.md section 1)."""

from __future__ import annotations

import fnmatch
import re
import typing
from importlib import resources
from pathlib import Path

import pytest
import tomllib

from pipeline.config import PromptSetName
from pipeline.models import prompts
from pipeline.models.prompts import (
    LOCALISING_PROMPTS,
    OBJECT_NAME_MAP,
    PROMPT_SET_NAMES,
    PROMPT_SETS,
    PromptSet,
    object_name,
    prompt_set,
)

# MVTec AD and VisA categories (folder names and natural names) that an agnostic sentence must not name.
OBJECT_WORDS = [
    "bottle", "cable", "capsule", "capsules", "carpet", "grid", "hazelnut", "leather", "metal nut", "nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper", "candle", "cashew",
    "chewing gum", "chewinggum", "fryum", "pipe fryum", "macaroni", "pcb", "printed circuit board",
]


@pytest.mark.parametrize(
    "name,n_normal,n_anomalous",
    [("winclip", 154, 88), ("winclip_anomalib", 147, 84), ("april_gan", 245, 175), ("vvv", 19 * 22, 23 * 22)],
)
def test_ensemble_sizes(name, n_normal, n_anomalous):
    normal, anomalous = PROMPT_SETS[name].sentences("bottle")
    assert (len(normal), len(anomalous)) == (n_normal, n_anomalous)


def test_template_major_order():
    s = PROMPT_SETS["winclip"]
    normal, _ = s.sentences("cable")
    assert normal[:2] == ["a cropped photo of the cable", "a cropped photo of the flawless cable"]
    assert normal[7] == "a cropped photo of a cable"  # second template, first state


def test_april_gan_lists():
    s = PROMPT_SETS["april_gan"]
    assert (len(s.normal_states), len(s.anomalous_states), len(s.templates)) == (7, 5, 35)
    assert s.normal_states == PROMPT_SETS["winclip"].normal_states
    assert "broken {}" in s.anomalous_states
    normal, anomalous = s.sentences("pill")
    assert all(x.endswith(".") for x in normal + anomalous)
    assert "this is one broken pill in the scene." in anomalous
    assert len(set(s.templates)) == 35


def test_vvv_states_extend_winclip():
    v, w = PROMPT_SETS["vvv"], PROMPT_SETS["winclip"]
    assert (len(v.normal_states), len(v.anomalous_states)) == (19, 23)
    assert v.normal_states[:7] == w.normal_states and v.anomalous_states[:4] == w.anomalous_states
    assert len(set(v.normal_states)) == 19 and len(set(v.anomalous_states)) == 23
    assert v.templates == w.templates
    assert {"new {}", "{} without any marks"} <= set(v.normal_states)
    assert {"{} in pieces", "burst {}", "snapped {}"} <= set(v.anomalous_states)


def test_localising_prompts():
    assert isinstance(LOCALISING_PROMPTS, tuple) and len(LOCALISING_PROMPTS) == 18
    assert len(set(LOCALISING_PROMPTS)) == 18
    assert LOCALISING_PROMPTS[0] == "a tear" and LOCALISING_PROMPTS[-1] == "a mistake"
    assert "a missing component" in LOCALISING_PROMPTS
    assert not any("{" in p or "}" in p for p in LOCALISING_PROMPTS)


def test_agnostic_sentences_are_many_distinct_and_never_name_the_object():
    s = PROMPT_SETS["zsad_agnostic"]
    assert s.templates == ("{}",)
    normal, anomalous = s.sentences("bottle")
    assert len(normal) >= 300 and len(anomalous) >= 300
    assert len(set(normal)) == len(normal) and len(set(anomalous)) == len(anomalous)
    assert not set(normal) & set(anomalous)
    # returned unchanged, whatever the object name (even one with braces)
    assert (normal, anomalous) == (list(s.normal_states), list(s.anomalous_states))
    assert s.sentences("{0} weird {x}") == (normal, anomalous)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in OBJECT_WORDS) + r")\b", re.IGNORECASE)
    offenders = [x for x in normal + anomalous if pattern.search(x) or "{" in x or "}" in x]
    assert offenders == []
    # diverse: several defect families are covered
    text = " ".join(anomalous)
    for word in ["scratch", "dent", "crack", "hole", "stain", "rust", "corrosion", "burr", "missing",
                 "misaligned", "bent", "discolor", "residue", "bubble", "tear", "frayed", "glue", "wrinkle",
                 "pitting", "coating", "lead", "foreign"]:
        assert word in text, word
    text = " ".join(normal)
    for word in ["clean", "intact", "uniform", "aligned", "smooth", "complete", "evenly colored", "assembled"]:
        assert word in text, word


@pytest.mark.parametrize("name", PROMPT_SET_NAMES)
def test_no_stray_braces_after_formatting(name):
    normal, anomalous = PROMPT_SETS[name].sentences("metal nut")
    assert normal and anomalous
    assert not any("{" in x or "}" in x for x in normal + anomalous)
    if name != "zsad_agnostic":
        assert all("metal nut" in x for x in normal + anomalous)


def test_every_set_loads_from_package_data():
    data_dir = resources.files("pipeline.models").joinpath("prompt_data")
    stems = sorted(Path(p.name).stem for p in data_dir.iterdir() if p.name.endswith(".yaml"))
    assert stems == sorted([*PROMPT_SET_NAMES, "vvv_localising"])
    for name in PROMPT_SET_NAMES:
        s = prompt_set(name)
        assert isinstance(s, PromptSet) and s.name == name and s.source.strip()
        assert s is PROMPT_SETS[name]  # cached
    assert dict(PROMPT_SETS).keys() == set(PROMPT_SET_NAMES)
    assert prompt_set("zsad_agnostic").source == "written for zsad"
    # the files are shipped: pyproject's package data for pipeline.models matches every data file
    pyproject = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["pipeline.models"]
    for stem in stems:
        assert any(fnmatch.fnmatch(f"prompt_data/{stem}.yaml", g) for g in globs), stem


def test_config_literal_lists_every_set():
    assert set(typing.get_args(PromptSetName)) == set(PROMPT_SET_NAMES)


def test_prompt_set_unknown_name():
    with pytest.raises(ValueError) as err:
        prompt_set("winclip_plus")
    message = str(err.value)
    assert "winclip_plus" in message
    for name in PROMPT_SET_NAMES:
        assert name in message
    with pytest.raises(KeyError):
        PROMPT_SETS["winclip_plus"]


@pytest.mark.parametrize(
    "entries,key,max_ph,min_ph",
    [(["a {b} photo"], "normal_states", 1, 0), (["a { photo"], "normal_states", 1, 0),
     (["{} and {}"], "templates", 1, 1), (["no placeholder"], "templates", 1, 1), ([], "templates", 1, 1),
     ([""], "normal_states", 1, 0), ([3], "normal_states", 1, 0)],
)
def test_loader_rejects_bad_entries(entries, key, max_ph, min_ph):
    with pytest.raises(ValueError, match=key):
        prompts._strings({key: entries}, key, "test", max_ph, min_ph)


def test_object_name_map_covers_visa_names():
    for cat, expected in [("pcb4", "printed circuit board"), ("macaroni2", "macaroni"),
                          ("pipe_fryum", "pipe fryum"), ("bracket_white", "white bracket")]:
        assert OBJECT_NAME_MAP[cat] == expected
        assert object_name(cat) == expected
