"""Golden output tables of presets on the tiny models (``--tiny``) and generated data.

``python -m tests.golden.record`` runs each preset with ``zsad run --tiny`` on the Ray executor, on
data generated from fixed seeds, and stores its output tables, normalised by :func:`normalise`, under
``tests/golden/<preset>/``. tests/e2e/test_golden_outputs.py runs the same presets with the
in-process executor and with the Ray executor and compares both with these files: same rows,
columns, types and values. ``smoke``, ``fade`` and ``vvv`` were recorded from the commit before the
plan refactor (issue 10), so they pin the behaviour the refactor must keep; ``fade`` and ``vvv`` were
recorded again when their FADE maps were made to compute what FADE's code computes (issue 12);
``winclip``, ``default``, ``musc_fast`` and ``clip_sam`` were recorded with the Ray executor when the
in-process executor was added (issue 26); ``clip_sam`` again when the cascade took the best of SAM's three
masks at every step, its geometry at SAM's input resolution, an absolute region threshold and a reason for
every image kept (issue 29). ``python -m tests.golden.record fade vvv`` records only
those.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCORE_TABLES = ("scores", "errors", "masks")

# preset -> (job file, its --set overrides after --tiny, tables, data kind)
PRESETS: dict[str, tuple[str, list[str], tuple[str, ...], str]] = {
    "smoke": ("jobs/smoke.yaml", ["maps.map_size=48", "maps.threshold=0.5", "shard_size=7"], SCORE_TABLES, "mvtec"),
    "fade": ("jobs/fade.yaml", ["maps.map_size=48"], SCORE_TABLES, "mvtec"),
    "vvv": ("jobs/vvv.yaml", ["pixel.scales=[128]", "foreground.kind=classical"],
            (*SCORE_TABLES, "foreground", "tiles"), "multi"),
    "winclip": ("jobs/winclip.yaml", ["maps.map_size=48", "shard_size=5"], SCORE_TABLES, "mvtec"),
    "default": ("jobs/default.yaml", ["maps.map_size=48"], SCORE_TABLES, "mvtec"),
    "musc_fast": ("jobs/musc_fast.yaml", ["maps.map_size=48"], (*SCORE_TABLES, "embeddings"), "mvtec"),
    "clip_sam": ("jobs/clip_sam.yaml", ["maps.map_size=48"], SCORE_TABLES, "mvtec"),
}
#: every preset's run: broken files in the input are expected, the evaluation is not part of it
COMMON = ["max_error_rate=0.5"]
# columns that measure time: they differ on every run
VOLATILE = ("decode_ms", "clip_score_ms", "encode_ms", "foreground_ms", "aggregate_ms", "sam_refine_ms")


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


def run_preset(name: str, root: Path, executor: str = "ray", in_process: bool = False) -> Path:
    """Run preset ``name`` on its generated data under ``root``; returns the run folder.

    ``in_process=False``: ``zsad run --tiny`` as the tests run the CLI (tests/helpers/zsad.py; how the
    goldens are recorded).
    ``in_process=True``: the same spec through :func:`pipeline.runtime.run.run_job` in this process
    (a Ray this process already runs is used by the Ray executor)."""
    job, sets, _, kind = PRESETS[name]
    data = make_data(kind, root)
    sets = [*COMMON, *sets]
    if in_process:
        from pipeline.config import load_spec
        from pipeline.runtime.run import run_job

        spec = load_spec(REPO / job, [*sets, f"runtime.executor={executor}", "report.enabled=false"], tiny=True)
        result = run_job(spec, str(data), str(root / "out"), run_id="golden", log=lambda _m: None)
        if result.status != "succeeded":
            raise RuntimeError(f"{name} ({executor}): {result.record.get('reason')}")
        return Path(result.run_dir)
    from tests.helpers.zsad import zsad

    res = zsad("run", job, "--input", str(data), "--output", str(root / "out"), "--run-id", "golden", "--no-evaluate",
               "--tiny", "--executor", executor, *(x for s in sets for x in ("--set", s)))
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
            table = table.set_column(
                names.index(col), pa.field(col, pa.string(), nullable=False), pa.array(new, pa.string())
            )
    keys = [(k, "ascending") for k in ("image_id", "tile_index") if k in names]
    return table.sort_by(keys).replace_schema_metadata(None)


def read_tables(run_dir: Path, data_root: Path, tables: tuple[str, ...]) -> dict[str, pa.Table]:
    raw = {t: pads.dataset(str(run_dir / t), format="parquet").to_table() for t in tables}
    scores = raw["scores"]
    prefix = str(data_root) + "/"
    ids = {i: u[len(prefix) :] for i, u in zip(scores.column("image_id").to_pylist(), scores.column("uri").to_pylist())}
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
