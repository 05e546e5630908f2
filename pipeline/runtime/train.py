"""``zsad train``: APRIL-GAN adapters trained on a frozen CLIP with Ray Train (METHODS.md section 3).

Driver:
1. check the spec against the model's shape (:mod:`pipeline.runtime.preflight`), list the labelled
   input (a layout with masks), refuse data that cannot be trained on (exit 2);
2. decide what each worker asks for (:func:`worker_request`: ``train.use_gpu`` auto/true/false);
   for a local Ray, refuse workers the machine can never hold (:func:`check_local`, exit 2) before
   Ray starts, and again on the started Ray's resources; start (or attach to) Ray; then write
   ``OUTPUT/TRAIN_ID/_train_plan.json`` (spec, input; a resume must match it);
3. the data flows through Ray Data (zsad's decode stage, then the training-sample stage: image at
   the adapters' size + mask) into a ``TorchTrainer`` with ``train.num_workers`` data-parallel
   workers (DDP), a bounded failure policy (:func:`failure_config`: ``train.max_failures``
   restarts, each going on after the last finished epoch) and ``train.start_timeout_s`` to place
   the workers, during which the driver says what it waits for every minute (:class:`Waiting`);
4. rank 0 writes a checkpoint after every epoch to ``OUTPUT/TRAIN_ID/checkpoints/epoch-NNNN/``
   (``adapters.safetensors``, ``optimizer.pt``, then ``state.json`` last: a checkpoint without it is
   unfinished and ignored). ``--resume`` continues after the last finished epoch, loss curve included;
5. the final adapters, in zsad's format with their metadata, go to ``OUTPUT/TRAIN_ID/adapters.safetensors``
   and ``train.json`` is written last (settings, loss curve, dataset digest, versions, wall time,
   the adapters' path and sha256).

Progress (epoch, step, loss, images/s) comes from rank 0 through a Ray queue and is printed by the
driver while ``fit`` runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from pipeline.config import TrainSpec
from pipeline.errors import ZsadError
from pipeline.io import fs as fsio
from pipeline.io.atomic import file_target, write_atomic
from pipeline.io.layouts import InputError, list_inputs
from pipeline.io.sinks import read_json, write_json
from pipeline.runtime.ids import check_run_id, new_run_id

PLAN = "_train_plan.json"
RECORD = "train.json"
FINAL = "adapters.safetensors"


class TrainError(ZsadError, RuntimeError):
    """Training that cannot start or did not finish; ``exit_code`` 2 for bad input or unusable
    weights, 1 (the default) when training itself failed."""


@dataclass
class TrainResult:
    train_id: str
    train_dir: str
    adapters_uri: str
    sha256: str
    record: dict[str, Any] = field(default_factory=dict)
    already: bool = False  # a --resume found the training finished: nothing was run or written


def dataset_digest(manifest: pd.DataFrame) -> str:
    """sha256 of the training set's identity: each image's URI, size, ETag, label and mask URI."""
    h = hashlib.sha256()
    cols = [c for c in ("uri", "size", "etag", "gt_label", "mask_uri") if c in manifest]
    rows = sorted("\t".join(str(v) for v in row) for row in manifest[cols].itertuples(index=False, name=None))
    for row in rows:
        h.update((row + "\n").encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def check_training_data(manifest: pd.DataFrame, input_uri: str) -> None:
    """Refuse data that cannot train adapters: no labels, or anomalous images but no masks."""
    if manifest.empty:
        raise TrainError(f"input {input_uri}: no images to train on", exit_code=2)
    labelled = manifest["gt_label"].notna()
    if not labelled.any():
        raise TrainError(f"input {input_uri}: no image has a ground-truth label; training needs a layout with labels "
                         "and masks (mvtec, visa, or a manifest with gt_label and mask_uri)", exit_code=2)
    anomalous = manifest["gt_label"] == 1
    if not anomalous.any():
        raise TrainError(f"input {input_uri}: no anomalous image (gt_label 1): the adapters would learn nothing",
                         exit_code=2)
    if manifest.loc[anomalous, "mask_uri"].isna().all():
        raise TrainError(f"input {input_uri}: the anomalous images have no masks (mask_uri); training needs "
                         "pixel masks (mvtec and visa layouts carry them)", exit_code=2)


def _checkpoints(train_dir: str, storage) -> dict[int, str]:
    """Finished checkpoints: epoch -> folder URI (those with a ``state.json``)."""
    fs, path = fsio.filesystem(fsio.join(train_dir, "checkpoints"), storage)
    out = {}
    try:
        found = fs.glob(f"{path}/epoch-*/state.json")
    except FileNotFoundError:
        return {}
    for p in found:
        name = p.rstrip("/").split("/")[-2]
        out[int(name.split("-")[1])] = fsio.join(train_dir, "checkpoints", name)
    return out


def _read_local(uri: str, storage, suffix: str) -> str:
    """A local copy of ``uri`` (the path itself when it is local)."""
    if not fsio.is_remote(uri):
        return fsio.local_path(uri)
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(fsio.read_bytes(uri, storage))
    return path


# ------------------------------------------------------------------------------------------------
# the worker loop (runs in Ray Train workers)
# ------------------------------------------------------------------------------------------------


def _worker_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pipeline.config import NoPixelMap, SpecError
    from pipeline.models import adapter_training as training
    from pipeline.models import adapters as adapter_models
    from pipeline.ops.mosaic import apply_mosaics
    from pipeline.stages.clip_score import ClipScoreStage

    spec = TrainSpec.model_validate(config["spec"])
    storage = config["storage"]
    t = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    queue = config.get("queue")
    if queue is not None and rank == 0:  # the workers are placed: the driver stops waiting for them
        queue.put({"started": world})
    start_epoch, resume = int(config["start_epoch"]), config.get("resume")
    losses, steps = list(config.get("losses", [])), int(config.get("steps", 0))
    done = _checkpoints(config["train_dir"], storage)
    if done and max(done) > start_epoch:  # Ray Train restarted the workers (train.max_failures): go on from there
        start_epoch, resume = max(done), done[max(done)]
        state = read_json(fsio.join(resume, "state.json"), storage)
        losses, steps = list(state["losses"]), int(state["steps"])
    stage = ClipScoreStage(spec.clip, spec.score, weights_cache=spec.weights_cache, storage=storage, pixel=NoPixelMap(),
                           use_gpu=bool(config["use_gpu"]))
    stage.setup()
    device = stage.device
    model = stage.model
    for p in model.parameters():
        p.requires_grad_(False)
    visual = model.visual
    width, embed = visual.transformer.width, int(visual.output_dim)
    layers = spec.adapters.layers
    if layers[-1] > len(visual.transformer.resblocks):
        raise SpecError(f"adapters.layers {list(layers)} exceed the {len(visual.transformer.resblocks)} blocks of "
                        f"{spec.clip.model}")
    if resume:
        adapters, _ = adapter_models.load_adapters(
            _read_local(fsio.join(resume, "adapters.safetensors"), storage, ".safetensors"),
            width=width, embed=embed, n_layers=len(layers))
    elif spec.adapters.weights is not None:  # start from given adapters (fetched once per node)
        from pipeline.io.weights import resolve

        path = resolve(spec.adapters.weights, spec.weights_cache, storage, what="adapters file").path
        adapters, _ = adapter_models.load_adapters(path, width=width, embed=embed, n_layers=len(layers))
    else:
        torch.manual_seed(t.seed)
        adapters = adapter_models.Adapters(width, embed, len(layers))
    adapters = adapters.to(device)
    optimizer = training.make_optimizer(adapters, t.learning_rate, t.betas)
    if resume:
        state = torch.load(io.BytesIO(fsio.read_bytes(fsio.join(resume, "optimizer.pt"), storage)), weights_only=True)
        optimizer.load_state_dict(state)
    net = ray.train.torch.prepare_model(adapters) if world > 1 else adapters
    plain = net.module if hasattr(net, "module") else net
    texts: dict[str, torch.Tensor] = {}

    def text_for(category: str) -> torch.Tensor:
        if category not in texts:
            c = stage.text_classifier(category)
            texts[category] = training.text_matrix(c.normal, c.anomalous).to(device)
        return texts[category]

    shard = ray.train.get_dataset_shard("train")
    pre = stage.preprocess
    for epoch in range(start_epoch, t.epochs):
        generator = torch.Generator().manual_seed(t.seed * 100003 + epoch * 1009 + rank)
        total, count, images_seen, failed, mosaics = 0.0, 0, 0, 0, 0
        t0 = time.monotonic()
        for batch in shard.iter_batches(batch_size=t.batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * t.batch_size, local_shuffle_seed=t.seed + epoch):
            ok = np.asarray([s == "ok" for s in batch["status"]])
            failed += int((~ok).sum())
            if not ok.any():
                continue
            cats = [str(c) for c in np.asarray(batch["category"])[ok]]
            images = training.to_input([batch["pixels"][i] for i in np.flatnonzero(ok)], pre.mean, pre.std, device)
            masks = torch.from_numpy(np.stack([np.asarray(batch["mask"][i]) for i in np.flatnonzero(ok)])).to(device)
            images, masks, made = apply_mosaics(images, masks, cats, t.mosaic_probability, generator)
            mosaics += made
            text = torch.stack([text_for(c) for c in cats])
            loss = training.train_step(visual, net, optimizer, images, masks, text, layers)
            steps += 1
            total += loss * len(cats)
            count += len(cats)
            images_seen += len(cats)
            if queue is not None and rank == 0:
                rate = images_seen * world / max(time.monotonic() - t0, 1e-9)
                queue.put({"epoch": epoch + 1, "epochs": t.epochs, "step": steps, "loss": loss, "images_per_s": rate})
        sums = torch.tensor([total, float(count), float(failed), float(mosaics)], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        total, count, failed, mosaics = sums.tolist()
        if count == 0:
            raise RuntimeError(f"epoch {epoch + 1}: no usable training image "
                               f"({int(failed)} failed to decode or had no mask)")
        mean = total / count
        losses.append({"epoch": epoch + 1, "loss": mean, "images": int(count), "failed": int(failed),
                       "mosaics": int(mosaics), "seconds": round(time.monotonic() - t0, 3)})
        if rank == 0:
            folder = fsio.join(config["train_dir"], "checkpoints", f"epoch-{epoch + 1:04d}")
            with file_target(fsio.join(folder, "adapters.safetensors"), storage) as local:
                adapter_models.save_adapters(plain.cpu() if device.type != "cpu" else plain, local,
                                             {**config["metadata"], "width": width, "embed": embed, "epoch": epoch + 1,
                                              "loss": mean})
                plain.to(device)
            buf = io.BytesIO()
            torch.save(optimizer.state_dict(), buf)
            write_atomic(fsio.join(folder, "optimizer.pt"), buf.getvalue(), storage)
            write_json(fsio.join(folder, "state.json"), {"epoch": epoch + 1, "steps": steps, "losses": losses}, storage)
            if queue is not None:
                queue.put({"epoch_done": epoch + 1, "epochs": t.epochs, "loss": mean, "images": int(count),
                           "failed": int(failed)})
        ray.train.report({"epoch": epoch + 1, "loss": mean})


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------

#: the first "waiting for workers" line comes after this many seconds (half of train.start_timeout_s when
#: that is shorter; Ray Train takes 10-20 s to start its workers on a free machine), then one every WAIT_EVERY_S
FIRST_WAIT_S = 30.0
WAIT_EVERY_S = 60.0
#: how long Ray Train's controller waits for a worker group to start (read from the driver's environment)
GROUP_START_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
#: the driver's own limit goes this far beyond train.start_timeout_s (the controller should have given up)
_GRACE_S = 60.0


def _shown(resources: dict[str, float]) -> str:
    """``{CPU: 4, GPU: 1}``: the resources a person reads (no object store or node markers)."""
    keep = {k: v for k, v in resources.items()  # "_group_": no placement groups
            if not k.startswith(("node:", "object_store", "accelerator_type:")) and "_group_" not in k}
    return "{" + ", ".join(f"{k}: {v / 2**30:.1f} GiB" if k == "memory" else f"{k}: {v:g}"
                           for k, v in sorted(keep.items())) + "}"


def worker_request(t, session: dict[str, Any], log: Callable[[str], None]) -> dict[str, float]:
    """What each Ray Train worker asks for: ``train.resources_per_worker`` with a GPU (1 unless it
    says otherwise) when ``train.use_gpu`` is true, or ``auto`` where the session can have GPUs (a
    cluster, whose autoscaler may add them, or a local Ray with a GPU); on a local Ray without a GPU,
    ``auto`` trains on the CPU and says so."""
    request = {k: float(v) for k, v in t.resources_per_worker.items() if k != "GPU"}
    gpus = float(t.resources_per_worker.get("GPU", 1.0))
    if t.use_gpu is False:
        return request
    if t.use_gpu == "auto" and session["local"] and not session["resources"].get("GPU"):
        log(f"train.use_gpu is auto and this machine's Ray has no GPU: training on the CPU "
            f"({t.num_workers} worker(s) x {_shown(request)})")
        return request
    return {**request, "GPU": gpus}


def check_local(spec: TrainSpec, request: dict[str, float], available: dict[str, float]) -> None:
    """On a local Ray: refuse at once (exit 2) a worker group this machine can never hold, or one
    that leaves no CPU for the data pipeline's decode tasks, instead of waiting forever."""
    t = spec.train
    n = t.num_workers
    have = _shown({k: v for k, v in available.items() if k in ("CPU", "GPU", "memory")})
    if request.get("GPU") and not available.get("GPU"):
        raise TrainError(f"train.use_gpu is {str(t.use_gpu).lower()} and train.resources_per_worker asks for "
                         f"{_shown(request)} per worker, but this machine's Ray has no GPU ({have}): set "
                         "train.use_gpu: auto (train on the CPU) or false, or run on a cluster with GPUs (--address)",
                         exit_code=2)
    for resource, amount in request.items():
        if resource == "memory" and resource not in available:
            continue  # not predicted before Ray starts: checked on the started Ray's resources
        need = amount * n
        if need > available.get(resource, 0.0) + 1e-9:
            raise TrainError(f"{n} training worker(s) x {_shown(request)} (train.num_workers x "
                             f"train.resources_per_worker) need {need:g} {resource}, but this machine's Ray has "
                             f"{available.get(resource, 0.0):g} ({have}): they could never start. Lower "
                             f"train.resources_per_worker.{resource} or train.num_workers (e.g. --set "
                             "'train.resources_per_worker={CPU: 1}'), or run on a cluster (--address)", exit_code=2)
    cpus = available.get("CPU", 0.0)
    left = cpus - request.get("CPU", 0.0) * n
    decode = spec.resources.decode.num_cpus
    if decode > left + 1e-9:
        raise TrainError(f"the {n} training worker(s) hold {request.get('CPU', 0.0) * n:g} of this machine's "
                         f"{cpus:g} CPUs, leaving {max(left, 0.0):g} for the data pipeline's tasks, which ask for "
                         f"resources.decode.num_cpus={decode:g}: they could never run. Lower "
                         "train.resources_per_worker.CPU or resources.decode.num_cpus (e.g. 0.5)", exit_code=2)


def failure_config(t):
    """Ray Train's failure policy, bounded: ``train.max_failures`` restarts of failed (or preempted)
    workers, and no restart of a worker group that could not start (Ray's default for both of the
    latter is unbounded: a request no node can satisfy was retried forever). How long a start may
    take is ``train.start_timeout_s`` (:func:`start_timeout_env`)."""
    from ray.train import FailureConfig

    return FailureConfig(max_failures=t.max_failures, controller_failure_limit=0,
                         max_preemption_failures=t.max_failures)


@contextlib.contextmanager
def start_timeout_env(t):
    """For the block: Ray Train's worker-group start timeout (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``,
    60 s by default, passed from the driver's environment to the Train controller) is
    ``train.start_timeout_s``, so the controller itself gives up when the workers cannot be placed
    in time. A value the user exported is kept."""
    if GROUP_START_ENV in os.environ:
        yield
        return
    os.environ[GROUP_START_ENV] = f"{t.start_timeout_s:g}"
    try:
        yield
    finally:
        os.environ.pop(GROUP_START_ENV, None)


class Waiting:
    """The driver's watch over the start of the workers: until rank 0 says it runs, a line
    ``waiting for N workers with {...}: the cluster has ...`` after :data:`FIRST_WAIT_S` (or half of
    ``train.start_timeout_s``) and then
    every :data:`WAIT_EVERY_S`; after ``train.start_timeout_s`` a :class:`TrainError` (exit 1)."""

    def __init__(self, t, request: dict[str, float], session: dict[str, Any], log: Callable[[str], None]) -> None:
        self.t, self.session, self.log = t, session, log
        self.what = f"{t.num_workers} training worker(s) with {_shown(request)} each"
        self.t0 = time.monotonic()
        self.next = self.t0 + min(FIRST_WAIT_S, t.start_timeout_s / 2)
        self.started = False
        self.said = False

    def _where(self) -> str:
        import ray

        where = "this machine's Ray" if self.session["local"] else "the cluster"
        try:
            total, free = _shown(ray.cluster_resources()), _shown(ray.available_resources())
        except Exception as exc:  # noqa: BLE001 - the line is information; the wait goes on
            return f"{where} (its resources could not be read: {exc})"
        return f"{where} has {total} in all, {free} free now"

    def done(self, workers: int) -> None:
        if not self.started and self.said:  # the wait was announced: say that it ended
            self.log(f"{workers} training worker(s) started after {time.monotonic() - self.t0:.0f} s")
        self.started = True

    def gave_up(self) -> TrainError:
        """The error of a training whose workers never started (exit 1)."""
        return TrainError(f"no training worker started in {self.t.start_timeout_s:g} s (train.start_timeout_s): "
                          f"Ray could not place {self.what}; {self._where()}. Add nodes with those resources, "
                          "lower train.resources_per_worker or train.num_workers, or raise train.start_timeout_s",
                          exit_code=1)

    def check(self) -> None:
        if self.started:
            return
        now = time.monotonic()
        waited = now - self.t0
        if waited >= self.t.start_timeout_s + _GRACE_S:  # Ray Train's controller should have given up by now
            raise self.gave_up()
        if now >= self.next:
            self.next, self.said = now + WAIT_EVERY_S, True
            self.log(f"waiting for {self.what}: {self._where()} ({waited:.0f} s so far; "
                     f"train.start_timeout_s gives up after {self.t.start_timeout_s:g} s)")



def _comparable(spec_data: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(spec_data))
    data.pop("storage", None)
    data.get("train", {}).pop("epochs", None)  # a resume may train for more epochs
    return data


def train_job(
    spec: TrainSpec,
    input_uri: str,
    output_uri: str,
    *,
    run_id: str | None = None,
    resume: bool = False,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train adapters (see the module doc). Raises :class:`TrainError`."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from pipeline.runtime.ray_plan import training_dataset
    from pipeline.runtime.rows import source_rows
    from pipeline.runtime.run import versions
    from pipeline.runtime.session import CONFIG_ERRORS, LOAD_ERRORS, failure, local_resources, ray_session, root_cause

    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.monotonic()
    run_id = run_id or new_run_id(started)
    problem = check_run_id(run_id)
    if problem:
        raise TrainError(problem, exit_code=2)
    storage = fsio.storage_options(spec.storage)
    from pipeline.runtime.preflight import spec_problem

    problem = spec_problem(spec, storage, objects=True)  # what a run's driver checks, before Ray starts
    if problem:
        raise TrainError(problem, exit_code=2)
    train_dir = fsio.join(fsio.normalise(output_uri), run_id)
    plan_uri = fsio.join(train_dir, PLAN)
    try:
        finished = fsio.exists(fsio.join(train_dir, RECORD), storage)
        planned = fsio.exists(plan_uri, storage)
    except Exception as exc:
        raise TrainError(f"output {output_uri}: cannot be reached: {exc}", exit_code=2) from None
    if finished and resume:  # a retry loop's resume of a finished training: nothing to do, nothing written
        record = read_json(fsio.join(train_dir, RECORD), storage)
        plan = read_json(plan_uri, storage) if planned else None
        if plan is not None and _comparable(plan["spec"]) != _comparable(spec.redacted()):
            raise TrainError(f"training {train_dir} was started with a different spec", exit_code=2)
        return TrainResult(run_id, train_dir, record["adapters"], record["sha256"], record, already=True)
    if finished:
        raise TrainError(f"training {train_dir} already finished (it has a {RECORD}); choose another --run-id",
                         exit_code=2)
    if resume and not planned:
        raise TrainError(f"nothing to resume at {train_dir}: no {PLAN}", exit_code=2)
    if planned and not resume:
        raise TrainError(f"training {train_dir} was interrupted; continue it with --resume", exit_code=2)
    done: dict[int, str] = {}
    if resume:
        plan = read_json(plan_uri, storage)
        if _comparable(plan["spec"]) != _comparable(spec.redacted()):
            raise TrainError(f"training {train_dir} was started with a different spec", exit_code=2)
        input_uri = plan["input"]
        done = _checkpoints(train_dir, storage)
    try:
        _, manifest = list_inputs(input_uri, spec.data, storage)
    except InputError as exc:
        raise TrainError(str(exc), exit_code=2) from None
    manifest = manifest[manifest["list_error_type"].isna()] if "list_error_type" in manifest else manifest
    check_training_data(manifest, input_uri)
    digest = dataset_digest(manifest)
    if resume and plan.get("dataset_digest") != digest:
        raise TrainError(f"the data under {input_uri} changed since training {train_dir} started (dataset digest); "
                         "start a new training", exit_code=2)
    start_epoch = max(done) if done else 0
    losses: list[dict[str, Any]] = []
    steps = 0
    if start_epoch:
        state = read_json(fsio.join(done[start_epoch], "state.json"), storage)
        losses, steps = state["losses"], state["steps"]
        log(f"resuming: epoch {start_epoch} of {spec.train.epochs} finished (loss {losses[-1]['loss']:.4f}); "
            f"continuing at epoch {start_epoch + 1}")
    metadata = {
        "backbone": spec.clip.model, "clip_weights": spec.clip.weights.describe() if spec.clip.weights else "random",
        "random_weights": spec.random_weights, "image_size": spec.adapters.image_size,
        "layers": list(spec.adapters.layers), "activation": spec.clip.activation,
        "prompt_set": spec.score.describe_prompts(), "aggregation": spec.score.aggregation,
        "object_names": spec.score.object_names.policy, "dataset_digest": digest,
        "zsad_version": versions().get("zsad"), "train_id": run_id,
    }
    n_images = len(manifest)
    log(f"train {run_id}: {n_images} labelled images ({int((manifest['gt_label'] == 1).sum())} anomalous) from "
        f"{input_uri} -> {train_dir}; {spec.train.epochs} epochs on {spec.train.num_workers} worker(s)")
    if spec.random_weights:
        log("WARNING: random CLIP weights (allow_random_weights: true): the adapters are NOT meaningful")
    if start_epoch >= spec.train.epochs:
        log(f"all {spec.train.epochs} epochs are done; writing the final adapters")
    else:
        t = spec.train
        if address is None:  # a local Ray: refused before it starts when the machine can never hold the workers
            predicted = local_resources()
            check_local(spec, worker_request(t, {"local": True, "resources": predicted}, log), predicted)
        with contextlib.ExitStack() as held:
            try:
                session = held.enter_context(ray_session(address, log))
            except ConnectionError as exc:  # a cluster that cannot be reached (or refuses this client)
                raise TrainError(f"cannot attach to the Ray cluster at {address}: {root_cause(exc)}",
                                 exit_code=2) from None
            request = worker_request(t, session, log if address else lambda m: None)  # a local one: said above
            if session["local"]:  # again, with what the started Ray has
                check_local(spec, request, dict(session["resources"]))
            if not resume:  # written once nothing refuses the training: from here on it can be resumed
                write_json(plan_uri, {"run_id": run_id, "input": input_uri, "dataset_digest": digest,
                                      "spec": spec.redacted()}, storage)
            ds = training_dataset(spec, source_rows(manifest), storage)
            queue = Queue(maxsize=1000)
            config = {"spec": spec.model_dump(mode="json"), "storage": storage, "train_dir": train_dir,
                      "metadata": metadata, "start_epoch": start_epoch, "losses": losses, "steps": steps,
                      "queue": queue, "resume": done.get(start_epoch), "use_gpu": "GPU" in request}
            trainer = TorchTrainer(
                _worker_loop, train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu="GPU" in request,
                                             resources_per_worker=request),
                run_config=RunConfig(name=f"zsad-train-{run_id}", storage_path=tempfile.mkdtemp(prefix="zsad-train-"),
                                     failure_config=failure_config(t)),
                datasets={"train": ds},
            )
            outcome: dict[str, Any] = {}

            def fit() -> None:
                try:
                    outcome["result"] = trainer.fit()
                except BaseException as exc:  # noqa: BLE001 - reported by the driver below
                    outcome["error"] = exc

            thread = threading.Thread(target=fit, name="zsad-train-fit", daemon=True)
            held.enter_context(start_timeout_env(t))  # read by fit() when it starts the controller
            thread.start()
            last = 0.0
            waiting = Waiting(t, request, session, log)
            while thread.is_alive() or queue.qsize():
                try:
                    msg = queue.get(timeout=0.5)
                except Empty:
                    waiting.check()  # until the workers are placed: a line every minute, then the time limit
                    continue
                if "started" in msg:
                    waiting.done(msg["started"])
                elif "epoch_done" in msg:
                    log(f"epoch {msg['epoch_done']}/{msg['epochs']} done: loss {msg['loss']:.4f} "
                        f"on {msg['images']} images"
                        + (f" ({msg['failed']} left out: decode or mask errors)" if msg["failed"] else "")
                        + "; checkpoint written")
                elif time.monotonic() - last >= 2.0:
                    last = time.monotonic()
                    log(f"epoch {msg['epoch']}/{msg['epochs']} step {msg['step']}: loss {msg['loss']:.4f}, "
                        f"{msg['images_per_s']:.1f} images/s")
            thread.join()
            error = outcome.get("error")
            if error is not None and not waiting.started and \
                    type(getattr(error, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
                raise waiting.gave_up()  # Ray Train's controller gave up after train.start_timeout_s
            if error is not None:
                kind, text = failure(error)
                raise TrainError(f"training failed: {kind}: {text}",
                                 exit_code=2 if kind in LOAD_ERRORS + CONFIG_ERRORS else 1)
    done = _checkpoints(train_dir, storage)
    if not done or max(done) < spec.train.epochs:
        raise TrainError(f"training {train_dir} ended without its last checkpoint (have epochs {sorted(done)})")
    last_dir = done[max(done)]
    state = read_json(fsio.join(last_dir, "state.json"), storage)
    from pipeline.models.adapters import load_adapters, save_adapters

    local = _read_local(fsio.join(last_dir, "adapters.safetensors"), storage, ".safetensors")
    from safetensors import safe_open

    with safe_open(local, framework="pt") as fh:  # the backbone's sizes, as the checkpoint holds them
        embed, width = fh.get_slice("fc.0.weight").get_shape()
    adapters, _ = load_adapters(local, width=width, embed=embed, n_layers=len(spec.adapters.layers))
    final_uri = fsio.join(train_dir, FINAL)
    with file_target(final_uri, storage) as final_local:
        sha = save_adapters(adapters, final_local, {**metadata, "width": width, "embed": embed,
                                                    "epochs": spec.train.epochs, "loss": state["losses"][-1]["loss"]})
    record = {
        "train_id": run_id, "status": "succeeded", "input": input_uri, "output": train_dir,
        "started": started.isoformat(), "ended": dt.datetime.now(dt.timezone.utc).isoformat(),
        "wall_seconds": round(time.monotonic() - t_start, 3), "images": n_images, "dataset_digest": digest,
        "losses": state["losses"], "steps": state["steps"], "adapters": final_uri, "sha256": sha,
        "random_weights": spec.random_weights, "metadata": metadata, "versions": versions(), "spec": spec.redacted(),
    }
    write_json(fsio.join(train_dir, RECORD), record, storage)
    return TrainResult(run_id, train_dir, final_uri, sha, record)
