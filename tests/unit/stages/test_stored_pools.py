"""Pools as the workers store them and the scoring actors read them (issue 28), without Ray, on the
tiny CLIP: the bank stage writes a part per (batch, category) and hands back metadata only; the pool
read in chunks (``mutual.max_pool_bytes`` smaller than the pool) equals the pool held whole; a
float16 pool stays close; a truncated or foreign part file is an error naming the file; the
features pass (:func:`pipeline.runtime.features.build`, in-process executor) hands the driver ids,
names, byte counts and digests, never a feature."""

import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.config import load_spec, tiny_overrides
from pipeline.io.banks import BankError, StoredBank, manifest_uri, write_manifest
from pipeline.io.manifest import manifest_frame
from pipeline.runtime.features import build
from pipeline.stages.bank import RESULT_COLUMNS, BankStage, BankTarget, bank_digest
from pipeline.stages.clip_score import ClipScoreStage
from tests.helpers.batches import image_batch

SETS = ["pixel.layers=[2,4]", "pixel.image_size=64", "pixel.degrees=[1,3]", "maps.map_size=24"]


def musc(*extra):
    import yaml

    with open("jobs/musc.yaml") as fh:
        data = yaml.safe_load(fh)
    return load_spec("jobs/musc.yaml", [*tiny_overrides(data), *SETS, *extra])


def _images(seed, n, size=(48, 56)):
    rng = np.random.default_rng(seed)
    return [np.full((*size, 3), 110, np.uint8) + rng.integers(0, 60, size=(*size, 3), dtype=np.uint8) for _ in range(n)]


def write_pool(spec, run_dir, cat, images, batch=3):
    """The pool of ``images`` as the workers write it: the bank stage over batches of ``batch``
    images (one part each), then the manifest the driver writes from the rows' metadata."""
    digest = bank_digest(spec, f"pool-{cat}", len(images), "fp32")
    stage = BankStage.from_spec(spec, target=BankTarget(run_dir, "pools", {cat: digest}, spec.mutual.pool_dtype))
    ids = [f"{cat}-{i:02d}" for i in range(len(images))]
    parts = {}
    for i0 in range(0, len(images), batch):
        out = stage(image_batch(images[i0 : i0 + batch], cat, image_id=ids[i0 : i0 + batch]))
        assert set(out["status"]) == {"ok"} and "image" not in out
        for name, size, sha in zip(out["bank_part"], out["bank_part_bytes"], out["bank_part_sha256"]):
            parts[name] = {"name": name, "bytes": int(size), "sha256": sha}
    uri = manifest_uri(run_dir, cat, "pools")
    write_manifest(uri, {"category": cat, "digest": digest, "precision": "fp32", "image_ids": ids,
                         "parts": list(parts.values())})
    return {"uri": uri, "digest": digest, "images": len(ids), "image_ids": ids}, ids


def scorer(spec, pools):
    stage = ClipScoreStage.from_spec(spec)
    stage.pools = pools
    return stage


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    spec = musc()
    run_dir = str(tmp_path_factory.mktemp("run"))
    images = _images(1, 8)
    entry, ids = write_pool(spec, run_dir, "gear", images)
    return spec, run_dir, images, entry, ids


def test_a_pool_read_in_chunks_equals_the_pool_held_whole(pool):
    spec, _, images, entry, ids = pool
    queries = [images[2], _images(5, 1)[0], images[7]]
    batch = image_batch(queries, "gear", image_id=[ids[2], "outside", ids[7]])
    whole = scorer(spec, {"gear": entry})
    a = whole(dict(batch))
    assert "layers" in whole.pool("gear") and list(a["status"]) == ["ok"] * 3
    stored = StoredBank(entry["uri"], entry["digest"])
    per_image = stored.image_bytes(["layer2", "layer4"])
    assert stored.nbytes > per_image * len(ids)  # the parts also hold the embeddings
    # blocks of pool_chunk // patches = 4 images: a bound of 5 images streams 4 at a time, as the whole pool's blocks
    for bound, chunk in ((5 * per_image, 4), (per_image, 1)):
        streamed = scorer(musc(f"mutual.max_pool_bytes={bound}", "mutual.pool_chunk=64"), {"gear": entry})
        plain = scorer(musc("mutual.pool_chunk=64"), {"gear": entry})
        b, c = streamed(dict(batch)), plain(dict(batch))
        held = streamed.pool("gear")
        assert "layers" not in held and held["chunk"] == chunk and streamed.pool_loads == 1
        if chunk == 4:  # the same blocks through the running top-K: the same floats
            np.testing.assert_array_equal(b["score"], c["score"])
            for m1, m2 in zip(b["anomaly_map"], c["anomaly_map"]):
                np.testing.assert_array_equal(m1, m2)
        else:  # other blocks: the same K smallest distances, summed in another order
            np.testing.assert_allclose(b["score"], c["score"], rtol=0, atol=1e-6)
            for m1, m2 in zip(b["anomaly_map"], c["anomaly_map"]):
                np.testing.assert_allclose(m1, m2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["score"], c["score"], rtol=0, atol=1e-6)  # pool_chunk changes blocks, not results
    assert list(a["scorer"]) == [a["scorer"][0]] * 3 and list(a["pool_loads"]) == [1, 1, 1]


def test_a_float16_pool_halves_the_bytes_and_stays_close(pool, tmp_path):
    spec, _, images, entry, ids = pool
    half = musc("mutual.pool_dtype=float16")
    entry16, _ = write_pool(half, str(tmp_path), "gear", images)
    assert bank_digest(half, "r", 8, "fp32") != bank_digest(spec, "r", 8, "fp32")  # never reused for the other dtype
    s32, s16 = StoredBank(entry["uri"], None), StoredBank(entry16["uri"], None)
    assert s16.rows("layer2").dtype == np.float16 and s16.nbytes < 0.55 * s32.nbytes
    batch = image_batch(images[:2], "gear", image_id=ids[:2])
    a, b = scorer(spec, {"gear": entry})(dict(batch)), scorer(half, {"gear": entry16})(dict(batch))
    np.testing.assert_allclose(b["score"], a["score"], rtol=0, atol=5e-3)


def test_a_truncated_or_foreign_part_is_an_error_naming_the_file(pool, tmp_path):
    spec, run_dir, images, entry, ids = pool
    copy = tmp_path / "copy"
    shutil.copytree(os.path.dirname(entry["uri"]), copy)
    parts = sorted(p for p in os.listdir(copy) if p.startswith("part-"))
    victim = copy / parts[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])  # truncated
    with pytest.raises(BankError, match=f"{parts[0]}.*(truncated|bytes)"):
        StoredBank(str(copy / "manifest.json"), entry["digest"])
    other, _ = write_pool(spec, str(tmp_path / "other"), "plate", _images(9, 3))
    foreign = sorted(p for p in os.listdir(os.path.dirname(other["uri"])) if p.startswith("part-"))[0]
    shutil.copy(os.path.join(os.path.dirname(other["uri"]), foreign), victim)  # another bank's part under this name
    manifest = StoredBank(entry["uri"], None).manifest
    for p in manifest["parts"]:
        if p["name"] == parts[0]:
            p["bytes"] = victim.stat().st_size
    write_manifest(str(copy / "manifest.json"), manifest, clean=False)
    with pytest.raises(BankError, match=f"{parts[0]}: belongs to another bank"):
        StoredBank(str(copy / "manifest.json"), entry["digest"])
    stage = scorer(spec, {"gear": {**entry, "uri": str(copy / "manifest.json")}})
    out = stage(image_batch(images[:1], "gear", image_id=ids[:1]))
    assert out["status"][0] == "error" and parts[0] in out["error_message"][0]


def test_the_features_pass_hands_the_driver_metadata_only(tmp_path):
    """What reaches the driver from the pool pass: the bank stage's result columns, all of them ids,
    names, counts or digests (strings and integers); the features are in the part files."""
    from PIL import Image

    spec = musc()
    folder = tmp_path / "in"
    folder.mkdir()
    rows = []
    for cat, seed in (("gear", 1), ("plate", 2)):
        for i, img in enumerate(_images(seed, 5)):
            path = folder / f"{cat}-{i}.png"
            Image.fromarray(img).save(path)
            rows.append({"category": cat, "shot": i, "uri": str(path), "etag": None, "size": pd.NA, "mtime": pd.NA})
    listed = manifest_frame([{"uri": r["uri"], "category": r["category"], "gt_label": 0} for r in rows])
    wanted = pd.DataFrame(rows).assign(image_id=list(listed["image_id"]))  # the ids the listing gives
    seen: list[pa.Table] = []
    manifests = {}

    def complete(cat, manifest, failed):
        assert not failed
        manifests[cat] = manifest
        return manifest

    digests = {"gear": "g" * 64, "plate": "p" * 64}
    counts = build(spec, wanted, "pools", str(tmp_path / "run"), digests, "fp32", None, {"executor": "local"},
                   lambda m: None, complete, plan_hook=seen.append)
    assert counts["images"] == 10 and counts["failed"] == 0 and counts["bytes"] > 0
    for batch in seen:
        assert tuple(batch.column_names) == RESULT_COLUMNS
        for field in batch.schema:
            assert pa.types.is_string(field.type) or pa.types.is_integer(field.type), field
    for cat in ("gear", "plate"):
        stored = StoredBank(manifest_uri(str(tmp_path / "run"), cat, "pools"), digests[cat])
        want = list(wanted[wanted["category"] == cat].sort_values("shot")["image_id"])
        assert stored.image_ids == want == manifests[cat]["image_ids"]
        assert stored.rows("layer2").shape[0] == 5
