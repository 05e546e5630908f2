"""Golden output tables of the smoke, fade and vvv presets (tiny models, generated data).

``python -m tests.golden.record`` runs each preset with ``zsad run`` on data generated from fixed seeds
and stores its output tables, normalised by :func:`normalise`, under ``tests/golden/<preset>/``.
tests/e2e/test_golden_outputs.py runs the same commands and compares the tables with these files:
same rows, columns, types and values. They were recorded from the commit before the plan refactor
(issue 10), so they pin the behaviour the refactor must keep; ``fade`` and ``vvv`` were recorded again
when their FADE maps were made to compute what FADE's code computes (issue 12: GEM's first pass,
the sentence wrapper, GEM vision features, PIL resize). ``python -m tests.golden.record fade vvv``
records only those.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ZSAD = str(Path(sys.executable).with_name("zsad"))
TINY_CLIP = ["--set", "clip.model=zsad-tiny", "--set", "clip.weights=null", "--set", "allow_random_weights=true"]

# preset -> (job file, extra overrides, tables, data kind)
PRESETS: dict[str, tuple[str, list[str], tuple[str, ...], str]] = {
    "smoke": ("jobs/smoke.yaml", ["--set", "maps.map_size=48", "--set", "maps.threshold=0.5", "--set", "shard_size=7"],
              ("scores", "errors", "masks"), "mvtec"),
    "fade": ("jobs/fade.yaml", TINY_CLIP + ["--set", "pixel.scales=[128,160]", "--set", "pixel.grid=8",
                                            "--set", "pixel.gem_depth=2", "--set", "maps.map_size=48",
                                            "--set", "resources.clip_score.num_gpus=0"],
             ("scores", "errors", "masks"), "mvtec"),
    "vvv": ("jobs/vvv.yaml", TINY_CLIP + ["--set", "sam.model=tiny", "--set", "sam.weights=null",
                                          "--set", "pixel.scales=[128]", "--set", "pixel.grid=8",
                                          "--set", "pixel.gem_depth=2", "--set", "tiling.min_tile=96",
                                          "--set", "tiling.tile_map_size=32", "--set", "foreground.kind=classical",
                                          "--set", "maps.map_size=64",
                                          "--set", "resources.foreground.num_gpus=0",
                                          "--set", "resources.clip_score.num_gpus=0"],
            ("scores", "errors", "masks", "foreground", "tiles"), "multi"),
}
# columns that measure time: they differ on every run
VOLATILE = ("decode_ms", "clip_score_ms", "encode_ms", "foreground_ms", "aggregate_ms")


def make_data(kind: str, root: Path) -> Path:
    """The input of a preset: an mvtec tree with two broken files, or a multi-instance tree."""
    from pipeline.synthetic import make_dataset, make_multi_instance_dataset

    data = root / "in"
    if kind == "mvtec":
        make_dataset(str(data), categories=("widget", "tile"), n_good=3, n_bad=3, size=64, seed=5)
        (data / "widget" / "test" / "good" / "zz_empty.png").write_bytes(b"")
        (data / "tile" / "test" / "good" / "zz_text.png").write_bytes(b"not an image at all")
    else:
        make_multi_instance_dataset(str(data), n_good=2, n_bad=2, size=(160, 224), instances=(2, 3), seed=4)
    return data


def run_preset(name: str, root: Path) -> Path:
    job, extra, _, kind = PRESETS[name]
    data = make_data(kind, root)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([ZSAD, "run", job, "--input", str(data), "--output", str(root / "out"), "--run-id", "golden", "--set", "max_error_rate=0.5",
                          "--no-evaluate", *extra], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"zsad run {job} exited {res.returncode}:\n{res.stderr[-4000:]}")
    return root / "out" / "golden"


def normalise(table: pa.Table, data_root: Path, ids: dict[str, str]) -> pa.Table:
    """Drop the timing columns, replace URIs by paths relative to the input and image ids by the
    same relative path (ids are hashes of absolute URIs), and sort the rows."""
    names = [n for n in table.column_names if n not in VOLATILE]
    table = table.select(names)
    prefix = str(data_root) + "/"
    for col in ("uri", "image_id"):
        if col in names:
            values = table.column(col).to_pylist()
            new = [v[len(prefix):] if col == "uri" else ids[v] for v in values]
            table = table.set_column(names.index(col), pa.field(col, pa.string(), nullable=False), pa.array(new, pa.string()))
    keys = [(k, "ascending") for k in ("image_id", "tile_index") if k in names]
    return table.sort_by(keys).replace_schema_metadata(None)


def read_tables(run_dir: Path, data_root: Path, tables: tuple[str, ...]) -> dict[str, pa.Table]:
    raw = {t: pads.dataset(str(run_dir / t), format="parquet").to_table() for t in tables}
    scores = raw["scores"]
    prefix = str(data_root) + "/"
    ids = {i: u[len(prefix):] for i, u in zip(scores.column("image_id").to_pylist(), scores.column("uri").to_pylist())}
    return {t: normalise(tab, data_root, ids) for t, tab in raw.items()}


def main(names: list[str] | None = None) -> None:
    """Record the goldens of ``names`` (default: every preset)."""
    for name, (_, _, tables, _) in PRESETS.items():
        if names and name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            run_dir = run_preset(name, root)
            out = HERE / name
            out.mkdir(exist_ok=True)
            for table, data in read_tables(run_dir, root / "in", tables).items():
                pq.write_table(data, out / f"{table}.parquet")
                print(f"{name}/{table}: {data.num_rows} rows, {data.num_columns} columns")


if __name__ == "__main__":
    main(sys.argv[1:])
