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
    git_dir = source if os.path.exists(os.path.join(source, "HEAD")) and not os.path.exists(os.path.join(source, ".git")) \
        else os.path.join(source, ".git")
    if os.path.isdir(git_dir):
        commit = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        archive = subprocess.run(["git", "--git-dir", git_dir, "archive", "HEAD", *files], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", scratch], input=archive.stdout, check=True)
        return commit
    for f in files:
        src, dst = os.path.join(source, f), os.path.join(scratch, f)
        os.makedirs(os.path.dirname(dst) or scratch, exist_ok=True)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    return "unknown (not a git checkout)"


def generated_images(scratch: str, category: str, n: int, k: int = 0, size: int = 200) -> tuple[list[str], list[str]]:
    """(test image paths, ``k`` train/good paths) of a generated MVTec-like category (some images
    with drawn defects; pipeline.synthetic)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.synthetic import make_dataset

    make_dataset(os.path.join(scratch, "data"), categories=(category,), n_good=n - n // 2, n_bad=n // 2, n_train=k,
                 size=size)
    tests = sorted(glob.glob(os.path.join(scratch, "data", category, "test", "*", "*.png")))[:n]
    refs = sorted(glob.glob(os.path.join(scratch, "data", category, "train", "good", "*.png")))[:k]
    return tests, refs
