"""decode.device: model end to end (issue 31): the decode stage ships the encoded bytes and the CLIP
actor decodes them (on this machine's CPU: the device decoder's CPU path, the code a GPU actor runs
with ``device="cuda"``). At full size it decodes the pixels the CPU decode stage decodes, so the
default preset's tables are the same; a bad file fails with the same error in both; a config whose
first stage after decode is not a model actor is refused before anything runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.ops import heatmap
from tests.helpers.zsad import TINY, zsad

pytestmark = pytest.mark.integration


def _inputs(folder):
    rng = np.random.default_rng(11)
    folder.mkdir()
    for i in range(3):
        small = (rng.random((15, 20, 3)) * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)).copy()
        if i == 1:
            big[80:140, 100:180] = (250, 20, 20)
        exif = Image.Exif()
        exif[0x0112] = 6 if i == 2 else 1  # one image stored on its side
        Image.fromarray(big).save(folder / f"img{i}.jpg", quality=92, exif=exif.tobytes())
    Image.fromarray(big).save(folder / "img3.png")
    (folder / "broken.jpg").write_bytes((folder / "img0.jpg").read_bytes()[:2000])


def _run(tmp_path, data, device):
    out = tmp_path / f"out-{device}"
    res = zsad("run", "jobs/default.yaml", "--input", str(data), "--output", str(out), "--run-id", "r", *TINY,
               "--executor", "local", "--set", f"decode.device={device}", "--set", "decode.resolution=exact",
               "--set", "pixel.vision_multiplier=1", "--set", "max_error_rate=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    scores = pd.read_parquet(out / "r" / "scores").set_index("uri").sort_index()
    masks = pd.read_parquet(out / "r" / "masks").set_index("image_id").sort_index()
    return scores, masks, res.stderr


def test_decoding_in_the_model_actor_gives_the_cpu_decode_stages_tables(tmp_path):
    data = tmp_path / "data"
    _inputs(data)
    cpu, cpu_masks, _ = _run(tmp_path, data, "cpu")
    model, model_masks, log = _run(tmp_path, data, "model")
    assert "decoded on this actor's CPU" in log  # no GPU here: the device decoder's CPU path
    assert list(model.index) == list(cpu.index)
    assert model["status"].tolist() == cpu["status"].tolist() == ["error", "ok", "ok", "ok", "ok"]
    assert model["error_type"].iloc[0] == cpu["error_type"].iloc[0] == "TruncatedImage"
    assert model["height"].tolist()[1:] == cpu["height"].tolist()[1:] == [240, 240, 320, 240]  # img2 turned
    np.testing.assert_allclose(model["score"].to_numpy()[1:], cpu["score"].to_numpy()[1:], rtol=0, atol=1e-9)
    assert list(model_masks.index) == list(cpu_masks.index)
    for image_id, row in model_masks.iterrows():
        ref = cpu_masks.loc[image_id]
        if not row.map_png:  # the broken file: no map in either
            assert not ref.map_png
            continue
        a = heatmap.decode_png16(row.map_png, row.map_min, row.map_max)
        b = heatmap.decode_png16(ref.map_png, ref.map_min, ref.map_max)
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-6


def test_a_plan_without_a_model_actor_after_decode_is_refused_before_it_runs(tmp_path):
    data = tmp_path / "data"
    _inputs(data)
    res = zsad("run", "jobs/vvv.yaml", "--input", str(data), "--output", str(tmp_path / "out"), *TINY,
               "--executor", "local", "--set", "decode.device=model", "--set", "foreground.kind=classical")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "decode.device: model" in res.stderr and "'foreground', a CPU task" in res.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
    res = zsad("validate", "jobs/vvv.yaml", *TINY, "--set", "decode.device=model", "--set", "foreground.kind=classical")
    assert res.returncode == 2 and "plan: decode.device: model" in res.stderr, res.stderr[-2000:]
    assert zsad("validate", "jobs/vvv.yaml", *TINY, "--set", "decode.device=model").returncode == 0  # SAM: an actor
