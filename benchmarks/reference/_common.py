"""What the reference checks share: the reference's files into a scratch folder, generated images."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def extract_files(source: str, scratch: str, files: list[str]) -> str:
    """``files`` (paths in the repository) from ``source`` (a checkout, or a git directory such as a
    mirror) into ``scratch``; returns the commit (``unknown`` for a plain folder)."""
    git_dir = (
        source
        if os.path.exists(os.path.join(source, "HEAD")) and not os.path.exists(os.path.join(source, ".git"))
        else os.path.join(source, ".git")
    )
    if os.path.isdir(git_dir):
        commit = subprocess.run(
            ["git", "--git-dir", git_dir, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "--git-dir", git_dir, "archive", "HEAD", *files], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", scratch], input=archive.stdout, check=True)
        return commit
    for f in files:
        src, dst = os.path.join(source, f), os.path.join(scratch, f)
        os.makedirs(os.path.dirname(dst) or scratch, exist_ok=True)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    return "unknown (not a git checkout)"


def unpacked(path: str, package: str, scratch: str) -> str:
    """The folder holding ``package``: a wheel (``.whl``) unpacked into the scratch folder, or a
    checkout (its ``src/`` or its root)."""
    import zipfile

    if path.endswith(".whl"):
        out = os.path.join(scratch, "unpacked-" + os.path.basename(path))
        zipfile.ZipFile(path).extractall(out)
        return out
    for cand in (os.path.join(path, "src"), path):
        if os.path.isdir(os.path.join(cand, package)):
            return cand
    raise SystemExit(f"{path}: neither a wheel nor a checkout holding {package}/")


def generated_images(scratch: str, category: str, n: int, k: int = 0, size: int = 200) -> tuple[list[str], list[str]]:
    """(test image paths, ``k`` train/good paths) of a generated MVTec-like category (some images
    with drawn defects; pipeline.synthetic)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.synthetic import make_dataset

    make_dataset(
        os.path.join(scratch, "data"), categories=(category,), n_good=n - n // 2, n_bad=n // 2, n_train=k, size=size
    )
    tests = sorted(glob.glob(os.path.join(scratch, "data", category, "test", "*", "*.png")))[:n]
    refs = sorted(glob.glob(os.path.join(scratch, "data", category, "train", "good", "*.png")))[:k]
    return tests, refs


def image_batch(paths: list[str], ids: list[str], category: str):
    """A stage batch of the images at ``paths`` (decoded with PIL to RGB uint8), all ok."""
    import numpy as np
    from PIL import Image

    n = len(paths)
    images = np.empty(n, dtype=object)
    for i, p in enumerate(paths):
        images[i] = np.asarray(Image.open(p).convert("RGB"))

    def col(values):
        return np.array(values, dtype=object)

    return {
        "image": images,
        "image_id": col(ids),
        "category": col([category] * n),
        "status": col(["ok"] * n),
        "error_stage": col([None] * n),
        "error_type": col([None] * n),
        "error_message": col([None] * n),
    }


def stored_bank(spec, run_dir: str, folder: str, category: str, paths: list[str], ids: list[str], **manifest) -> dict:
    """A bank or pool of ``paths`` as a run stores it: the bank stage writes the parts, then the
    manifest the driver writes from the rows' metadata. Returns {uri, digest}."""
    sys.path.insert(0, str(ROOT))
    from pipeline.io.banks import manifest_uri, write_manifest
    from pipeline.stages.bank import BankStage, BankTarget, bank_digest

    digest = bank_digest(spec, "reference-check", len(paths), "fp32")
    rows = BankStage.from_spec(spec, target=BankTarget(run_dir, folder, {category: digest}))(
        image_batch(paths, ids, category)
    )
    parts = {
        p: {"name": p, "bytes": int(b), "sha256": h}
        for p, b, h in zip(rows["bank_part"], rows["bank_part_bytes"], rows["bank_part_sha256"])
    }
    uri = manifest_uri(run_dir, category, folder)
    write_manifest(
        uri,
        {
            "category": category,
            "digest": digest,
            "precision": "fp32",
            "image_ids": list(ids),
            "parts": list(parts.values()),
            **manifest,
        },
    )
    return {"uri": uri, "digest": digest}


def add_common_arguments(ap) -> None:
    """The options every check has: its tolerance, a JSON output, and the hidden ones of the child
    process that runs the reference side (``--side reference --scratch DIR``)."""
    import argparse

    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", default=None, help=argparse.SUPPRESS)


def child_inputs(args) -> dict:
    """What the parent wrote for the reference side (``inputs.json`` in the scratch folder)."""
    import json

    with open(os.path.join(args.scratch, "inputs.json")) as fh:
        return json.load(fh)


def check_ok(*outputs) -> None:
    """Stop when a zsad stage failed a row (the comparison would be meaningless)."""
    for out in outputs:
        bad = [m for s, m in zip(out["status"], out["error_message"]) if s != "ok"]
        if bad:
            raise SystemExit(f"zsad failed: {bad[0]}")


def report(title: str, rows: dict[str, float], tol: float, json_path: str | None, **record) -> None:
    """Print the differences as a table; write them as JSON; exit 1 when one exceeds ``tol``."""
    import json

    print(title)
    print("| quantity | max abs difference |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.2e} |")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({**record, "differences": rows}, fh, indent=1)
    worst = max(rows.values())
    if worst > tol:
        print(f"FAIL: {worst:.2e} > --tol {tol:g}")
        raise SystemExit(1)
