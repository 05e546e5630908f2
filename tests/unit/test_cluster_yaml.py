"""cluster.yaml is checked with Ray's own cluster-config validation (what `ray up` runs first)."""

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.runtime.session import MIN_RAY

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture
def config():
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_accepts_the_template(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on any schema error
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_ray_validation_really_runs(config):
    config["worker_grups"] = {}  # a misspelled key must be rejected
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_node_groups(config):
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no pipeline tasks
    workers = {name: n for name, n in nodes.items() if name != config["head_node_type"]}
    gpu = [n for n in workers.values() if n["resources"].get("GPU", 0) > 0]
    cpu = [n for n in workers.values() if not n["resources"].get("GPU")]
    assert gpu and cpu
    for group in workers.values():
        assert 0 <= group["min_workers"] <= group["max_workers"] <= config["max_workers"]


def test_image_pins_a_supported_ray_and_no_keys_in_the_file(config):
    match = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py3\d+-gpu", config["docker"]["image"])
    assert match, config["docker"]["image"]
    assert MIN_RAY <= (int(match[1]), int(match[2])) and int(match[1]) < 3
    for node in config["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Name"]  # S3 through an instance profile
    text = CLUSTER.read_text().lower()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "secret_access_key:", "access_key_id:"):
        assert secret not in text


def test_setup_installs_zsad_and_a_weights_cache(config):
    setup = " ".join(config["setup_commands"])
    mount = next(iter(config["file_mounts"]))
    assert f"pip install --quiet {mount}" in setup and config["file_mounts"][mount] == "."
    assert ".venv" in config["rsync_exclude"]
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "ZSAD_CACHE_DIR=" in cmd
