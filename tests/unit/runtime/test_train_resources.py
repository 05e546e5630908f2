"""What zsad train's workers ask Ray for, and the refusals and waits around it (pipeline/runtime/train.py),
without starting Ray: the request per train.use_gpu, the local refusals, the bounded failure policy,
Ray Train's start timeout and the waiting lines."""

import os

import pytest

from pipeline.config import SpecError, TrainSpec, load_spec
from pipeline.runtime import train
from pipeline.runtime.train import TrainError, check_local, failure_config, start_timeout_env, worker_request

NO_GPU = {"local": True, "resources": {"CPU": 8.0}}
LOCAL_GPU = {"local": True, "resources": {"CPU": 8.0, "GPU": 1.0}}
CLUSTER = {"local": False, "resources": {"CPU": 8.0}}


def _spec(*sets: str) -> TrainSpec:
    return load_spec("jobs/train_aprilgan.yaml", list(sets), model=TrainSpec, tiny=True)


def _train(**kw):
    return _spec(*(f"train.{k}={v}" for k, v in kw.items())).train


def test_the_request_per_use_gpu():
    lines = []
    auto = _train(use_gpu="auto", resources_per_worker="{CPU: 4, GPU: 1}")
    assert train._shown({"CPU": 4.0, "CPU_group_0_abc": 1.0, "node:127.0.0.1": 1.0, "memory": 2**31}) == \
        "{CPU: 4, memory: 2.0 GiB}"  # what a person reads: no placement groups or node markers
    assert worker_request(auto, NO_GPU, lines.append) == {"CPU": 4.0}
    assert lines == [
        "train.use_gpu is auto and this machine's Ray has no GPU: training on the CPU (1 worker(s) x {CPU: 4})"
    ]
    assert worker_request(auto, LOCAL_GPU, lines.append) == {"CPU": 4.0, "GPU": 1.0}
    assert worker_request(auto, CLUSTER, lines.append) == {"CPU": 4.0, "GPU": 1.0}  # an autoscaler may add GPU nodes
    assert len(lines) == 1
    true = _train(use_gpu="true", resources_per_worker="{CPU: 2}")
    assert worker_request(true, NO_GPU, lines.append) == {"CPU": 2.0, "GPU": 1.0}  # one GPU unless said otherwise
    assert worker_request(_train(use_gpu="false"), LOCAL_GPU, lines.append) == {"CPU": 1.0}


def test_use_gpu_and_the_gpu_count_must_agree():
    with pytest.raises(SpecError, match="use_gpu is false but resources_per_worker asks for GPU: 1"):
        _spec("train.resources_per_worker={CPU: 1, GPU: 1}")  # --tiny sets use_gpu false
    with pytest.raises(SpecError, match="use_gpu is true but resources_per_worker has GPU: 0"):
        _spec("train.use_gpu=true", "train.resources_per_worker={CPU: 1, GPU: 0}")
    with pytest.raises(SpecError, match="finite numbers >= 0"):
        _spec("train.resources_per_worker={CPU: -1}")
    assert load_spec("jobs/train_aprilgan.yaml", model=TrainSpec).train.use_gpu == "auto"  # the preset's default


def test_local_refusals_name_the_keys_and_what_the_machine_has():
    spec = _spec("train.use_gpu=true", "train.resources_per_worker={CPU: 1, GPU: 1}")
    with pytest.raises(
        TrainError,
        match=r"train.use_gpu is true and train.resources_per_worker asks for \{CPU: 1, GPU: 1\} "
        r"per worker, but this machine's Ray has no GPU \(\{CPU: 2\}\)",
    ) as exc:
        check_local(spec, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0})
    assert exc.value.exit_code == 2
    spec = _spec("train.resources_per_worker={CPU: 4}", "train.num_workers=2")
    with pytest.raises(
        TrainError, match=r"2 training worker\(s\) x \{CPU: 4\} .* need 8 CPU, but this machine's Ray has 6"
    ):
        check_local(spec, {"CPU": 4.0}, {"CPU": 6.0})
    with pytest.raises(
        TrainError, match=r"leaving 0 for the data pipeline's tasks, which ask for resources.decode.num_cpus=1"
    ):
        check_local(spec, {"CPU": 4.0}, {"CPU": 8.0})
    check_local(spec, {"CPU": 4.0}, {"CPU": 9.0})  # fits, with one CPU for the decode tasks
    check_local(spec, {"CPU": 4.0, "memory": 2.0**33}, {"CPU": 9.0})  # memory: not predicted before Ray starts
    with pytest.raises(TrainError, match=r"need 1.71799e\+10 memory, but this machine's Ray has 1.07374e\+09"):
        check_local(spec, {"CPU": 4.0, "memory": 2.0**33}, {"CPU": 9.0, "memory": 2.0**30})


def test_the_failure_policy_is_bounded():
    config = failure_config(_train(max_failures=2))
    assert (config.max_failures, config.controller_failure_limit, config.max_preemption_failures) == (2, 0, 2)


def test_ray_trains_start_timeout_is_train_start_timeout_s_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv(train.GROUP_START_ENV, raising=False)
    with start_timeout_env(_train(start_timeout_s=90)):
        assert os.environ[train.GROUP_START_ENV] == "90"
    assert train.GROUP_START_ENV not in os.environ
    monkeypatch.setenv(train.GROUP_START_ENV, "5")
    with start_timeout_env(_train(start_timeout_s=90)):
        assert os.environ[train.GROUP_START_ENV] == "5"


def test_the_wait_for_workers_says_what_it_waits_for_then_gives_up(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
    lines = []
    t = _train(start_timeout_s=300)
    waiting = train.Waiting(t, {"CPU": 1.0, "GPU": 1.0}, CLUSTER, lines.append)
    waiting.check()
    assert lines == []
    clock[0] += train.FIRST_WAIT_S
    waiting.check()
    assert len(lines) == 1 and lines[0].startswith(
        "waiting for 1 training worker(s) with {CPU: 1, GPU: 1} each: the cluster"
    )
    assert "(30 s so far; train.start_timeout_s gives up after 300 s)" in lines[0]
    clock[0] += 30
    waiting.check()
    assert len(lines) == 1  # one line a minute
    clock[0] += 30
    waiting.check()
    assert len(lines) == 2
    clock[0] = 1000.0 + 300 + train._GRACE_S  # Ray Train's controller did not give up: the driver does
    with pytest.raises(TrainError, match=r"no training worker started in 300 s \(train.start_timeout_s\)") as exc:
        waiting.check()
    assert exc.value.exit_code == 1
    started = train.Waiting(t, {"CPU": 1.0}, CLUSTER, lines.append)
    started.done(1)
    clock[0] += 10_000
    started.check()  # started: no line, no limit
    assert len(lines) == 2
