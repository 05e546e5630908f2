"""pipeline.io.references: listing, choosing, fingerprinting and storing few-shot reference images
(small trees written to tmp_path)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from pipeline.io.fs import InputError
from pipeline.io.manifest import MANIFEST_COLUMNS, manifest_frame
from pipeline.io.references import (
    REFERENCE_COLUMNS,
    REFERENCE_LAYOUTS,
    _detect_references,
    choose_references,
    list_references,
    read_references,
    references_digest,
    write_references,
)
from pipeline.synthetic import make_dataset
from tests.helpers.files import touch


def rel(df, root):
    return [u[len(str(root)) + 1 :] for u in df["uri"]]


def candidates(counts: dict[str, int]) -> pd.DataFrame:
    """A candidate frame with ``counts[category]`` images per category (local-like: no ETag)."""
    rows = [
        {"uri": f"/refs/{c}/{i:03d}.png", "category": c, "gt_label": 0, "size": 10 + i, "mtime": 1.0}
        for c, n in counts.items()
        for i in range(n)
    ]
    return manifest_frame(rows)


# --------------------------------------------------------------------------------------------
# Listing: dataset trees
# --------------------------------------------------------------------------------------------


def test_mvtec_root_lists_train_good_only(tmp_path):
    summary = make_dataset(str(tmp_path / "ds"), categories=("widget", "tile"), n_good=2, n_bad=2, size=16, n_train=3)
    root = summary["root"]
    layout, df = list_references(root, "mvtec")
    assert layout == "mvtec"
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    assert rel(df, root) == [f"{c}/train/good/{i:03d}.png" for c in ("tile", "widget") for i in range(3)]
    assert df["gt_label"].tolist() == [0] * 6
    assert df["mask_uri"].isna().all()
    assert df["category"].tolist() == ["tile"] * 3 + ["widget"] * 3
    assert df.attrs["skipped"]["outside_layout"] == summary["n_files"] - 6


def test_mvtec_single_category_folder(tmp_path):
    root = tmp_path / "bottle"
    touch(root, "train/good/000.png", "train/good/001.png", "test/good/000.png", "test/broken/000.png",
          "ground_truth/broken/000_mask.png", "train/good/notes.txt")
    layout, df = list_references(str(root), "mvtec")
    assert layout == "mvtec"
    assert rel(df, root) == ["train/good/000.png", "train/good/001.png"]
    assert df["category"].tolist() == ["bottle", "bottle"]


def test_full_tree_category_without_train_good_is_left_out(tmp_path):
    root = tmp_path / "mvtec"
    touch(
        root,
        "bottle/train/good/000.png",
        "bottle/test/good/000.png",
        "bottle/test/broken/000.png",
        "bottle/ground_truth/broken/000_mask.png",
        "cable/test/good/000.png",  # no train split
        "cable/test/cut/000.png",
        "screw/train/odd/000.png",  # a train split without good/
        ".cache/train/good/000.png",
    )
    layout, df = list_references(str(root))
    assert layout == "mvtec"
    assert rel(df, root) == ["bottle/train/good/000.png"]
    _, df = list_references(str(root), "mpdd")
    assert rel(df, root) == ["bottle/train/good/000.png"]


def test_visa_1cls_layout(tmp_path):
    root = tmp_path / "visa_pytorch"
    touch(root, "candle/train/good/a.JPG", "candle/test/bad/b.JPG", "candle/ground_truth/bad/b.png")
    layout, df = list_references(str(root), "visa_1cls")
    assert layout == "visa_1cls" and rel(df, root) == ["candle/train/good/a.JPG"]


def test_btad_train_ok(tmp_path):
    root = tmp_path / "btad"
    touch(root, "01/train/ok/0000.bmp", "01/train/ok/0001.bmp", "01/test/ok/0000.bmp", "01/test/ko/0000.bmp",
          "01/ground_truth/ko/0000.png", "02/train/ok/0000.png")
    for layout_arg in ("btad", "auto"):
        layout, df = list_references(str(root), layout_arg)
        assert layout == "btad"
        assert rel(df, root) == ["01/train/ok/0000.bmp", "01/train/ok/0001.bmp", "02/train/ok/0000.png"]
        assert df["category"].tolist() == ["01", "01", "02"] and df["gt_label"].tolist() == [0, 0, 0]


def write_visa(root, lines):
    path = os.path.join(str(root), "split_csv", "1cls.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(["object,split,label,image,mask", *lines]) + "\n")


def visa_tree(root):
    touch(
        root,
        "candle/Data/Images/Normal/0000.JPG",
        "candle/Data/Images/Normal/0001.JPG",
        "candle/Data/Images/Normal/0002.JPG",
        "candle/Data/Images/Anomaly/000.JPG",
        "candle/Data/Masks/Anomaly/000.png",
        "pcb1/Data/Images/Normal/0000.JPG",
        "pcb1/Data/Images/Normal/0001.JPG",
    )
    write_visa(
        root,
        [
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
            "candle,train,normal,candle/Data/Images/Normal/0001.JPG,",
            "candle,test,normal,candle/Data/Images/Normal/0002.JPG,",
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
            "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,",
            "pcb1,test,normal,pcb1/Data/Images/Normal/0001.JPG,",
        ],
    )
    return str(root)


def test_raw_visa_train_rows(tmp_path):
    root = visa_tree(tmp_path / "visa")
    for layout_arg in ("visa", "auto"):
        layout, df = list_references(root, layout_arg)
        assert layout == "visa"
        assert rel(df, root) == [
            "candle/Data/Images/Normal/0000.JPG",
            "candle/Data/Images/Normal/0001.JPG",
            "pcb1/Data/Images/Normal/0000.JPG",
        ]
        assert df["category"].tolist() == ["candle", "candle", "pcb1"] and df["gt_label"].tolist() == [0, 0, 0]


def test_raw_visa_anomalous_train_row_is_an_error(tmp_path):
    root = tmp_path / "visa"
    touch(root, "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png")
    write_visa(root, ["candle,train,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png"])
    with pytest.raises(InputError, match=r"1cls\.csv: row 1 \(line 2\): train image .* is labelled anomaly"):
        list_references(str(root), "visa")


def test_raw_visa_without_train_rows(tmp_path):
    root = tmp_path / "visa"
    touch(root, "candle/Data/Images/Normal/0000.JPG")
    write_visa(root, ["candle,test,normal,candle/Data/Images/Normal/0000.JPG,"])
    with pytest.raises(InputError, match=r"^reference .*: no train rows in .*1cls\.csv"):
        list_references(str(root), "visa")


# --------------------------------------------------------------------------------------------
# Listing: folder and manifest
# --------------------------------------------------------------------------------------------


def test_folder_tree(tmp_path):
    root = tmp_path / "refs"
    touch(root, "bottle/a.png", "bottle/deep/b.JPG", "cable/c.png", "top.png", "notes.txt", "cable/.d.png")
    for layout_arg in ("folder", "auto"):
        layout, df = list_references(str(root), layout_arg)
        assert layout == "folder"
        assert rel(df, root) == ["bottle/a.png", "bottle/deep/b.JPG", "cable/c.png", "top.png"]
        assert df["category"].tolist() == ["bottle", "bottle", "cable", "refs"]
        assert df["gt_label"].isna().all()


def test_folder_extensions(tmp_path):
    root = tmp_path / "refs"
    touch(root, "bottle/a.png", "bottle/b.tif")
    _, df = list_references(str(root), "folder", extensions=(".tif",))
    assert rel(df, root) == ["bottle/b.tif"]


def test_manifest_csv(tmp_path):
    touch(tmp_path, "imgs/a.png", "imgs/b.png", "imgs/c.png")
    path = tmp_path / "refs.csv"
    path.write_text("uri,category,label\nimgs/b.png,bottle,good\nimgs/a.png,bottle,\nimgs/c.png,cable,0\n")
    for layout_arg in ("manifest", "auto"):
        layout, df = list_references(str(path), layout_arg)
        assert layout == "manifest"
        assert rel(df, tmp_path) == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
        assert df["category"].tolist() == ["bottle", "bottle", "cable"]
        assert df["gt_label"].tolist()[1:] == [0, 0] and df["gt_label"].isna().tolist()[0]


def test_manifest_anomalous_row_is_an_error(tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text("uri,category,label\na.png,bottle,good\nb.png,bottle,bad\n")
    with pytest.raises(
        InputError, match=r"^reference manifest .*refs\.csv: row 2 \(line 3\): 'b\.png' is labelled anomalous"
    ):
        list_references(str(path))


# --------------------------------------------------------------------------------------------
# Listing: detection and errors
# --------------------------------------------------------------------------------------------


def test_detect_references():
    assert _detect_references(["split_csv/1cls.csv", "a/train/good/x.png"]) == "visa"
    assert _detect_references(["train/good/x.png"]) == "mvtec"
    assert _detect_references(["bottle/train/good/x.png", "bottle/test/good/y.png"]) == "mvtec"
    assert _detect_references(["bottle/test/good/y.png"]) == "folder"  # no train split: a folder of images
    assert _detect_references([".x/train/good/x.png"]) == "folder"
    assert _detect_references(["01/train/ok/x.bmp"]) == "btad"
    assert _detect_references(["train/ok/x.bmp"]) == "btad"
    assert _detect_references(["bottle/a.png"]) == "folder"


def test_no_images(tmp_path):
    root = tmp_path / "empty"
    touch(root, "bottle/notes.txt")
    with pytest.raises(InputError, match=r"^reference .*empty: no images found \(looked for files ending in"):
        list_references(str(root))
    mvtec = tmp_path / "mvtec"
    touch(mvtec, "bottle/test/good/000.png", "bottle/train/good/readme.txt")
    with pytest.raises(InputError, match=r"^reference .*mvtec: no train images found .*train/good/<image>"):
        list_references(str(mvtec), "mvtec")
    with pytest.raises(
        InputError, match=r"^reference .*mvtec: no train images found in the BTAD tree .*train/ok/<image>"
    ):
        list_references(str(mvtec), "btad")
    test_only = tmp_path / "test_only"
    touch(test_only, "01/test/ok/000.bmp")
    with pytest.raises(
        InputError,
        match=r"^reference .*test_only: does not look like a BTAD tree \(expected "
        r"ROOT/<category>/train/ok/<image> or ROOT/train/ok/<image>; found no train/ folder\)",
    ):
        list_references(str(test_only), "btad")
    with pytest.raises(InputError, match=r"^reference .*nowhere: no such file, folder or prefix"):
        list_references(str(tmp_path / "nowhere"))


def test_unknown_layout(tmp_path):
    with pytest.raises(InputError, match=r"^reference .*: unknown layout 'coco' \(known: auto, folder, mvtec"):
        list_references(str(tmp_path), "coco")
    assert REFERENCE_LAYOUTS == ("auto", "folder", "mvtec", "visa", "visa_1cls", "mpdd", "btad", "manifest")


# --------------------------------------------------------------------------------------------
# Choice
# --------------------------------------------------------------------------------------------


def test_choose_is_deterministic_and_depends_on_seed():
    cands = candidates({"bottle": 20, "cable": 20})
    a, missing = choose_references(cands, ["bottle", "cable"], k=4, seed=7)
    b, _ = choose_references(cands.sample(frac=1.0, random_state=3), ["bottle", "cable"], k=4, seed=7)
    c, _ = choose_references(cands, ["bottle", "cable"], k=4, seed=8)
    assert missing == []
    assert list(a.columns) == list(REFERENCE_COLUMNS)
    pd.testing.assert_frame_equal(a, b)  # the candidates' order does not matter
    assert a["uri"].tolist() != c["uri"].tolist()
    assert a["category"].tolist() == ["bottle"] * 4 + ["cable"] * 4
    assert a["shot"].tolist() == [0, 1, 2, 3] * 2
    assert str(a["shot"].dtype) == "int64" and str(a["size"].dtype) == "Int64" and str(a["mtime"].dtype) == "Float64"


def test_without_replacement_is_distinct():
    chosen, _ = choose_references(candidates({"bottle": 5}), ["bottle"], k=5, seed=0)
    assert sorted(chosen["uri"]) == [f"/refs/bottle/{i:03d}.png" for i in range(5)]


def test_with_replacement_can_repeat():
    chosen, missing = choose_references(candidates({"bottle": 1}), ["bottle"], k=3, seed=0, with_replacement=True)
    assert missing == []
    assert chosen["uri"].tolist() == ["/refs/bottle/000.png"] * 3
    assert chosen["shot"].tolist() == [0, 1, 2]


def test_not_enough_candidates():
    with pytest.raises(
        InputError,
        match=r"category 'bottle' has 2 candidate reference images, fewer than few_shot\.k = 3; "
        r"set few_shot\.with_replacement: true, or a smaller few_shot\.k",
    ):
        choose_references(candidates({"bottle": 2}), ["bottle"], k=3, seed=0)


def test_missing_and_extra_categories():
    chosen, missing = choose_references(
        candidates({"bottle": 3, "screw": 3}), ["bottle", "cable", "zipper"], k=2, seed=0
    )
    assert missing == ["cable", "zipper"]
    assert set(chosen["category"]) == {"bottle"}  # screw is not scored: ignored


def test_category_choice_independent_of_other_categories():
    alone, _ = choose_references(candidates({"bottle": 30}), ["bottle"], k=5, seed=1)
    more, _ = choose_references(
        candidates({"aaa": 30, "bottle": 30, "cable": 30}), ["aaa", "bottle", "cable"], k=5, seed=1
    )
    pd.testing.assert_frame_equal(alone, more[more["category"] == "bottle"].reset_index(drop=True))


def test_broken_candidates_are_skipped():
    cands = candidates({"bottle": 2})
    cands.loc[0, "list_error_type"] = "BrokenLink"
    chosen, _ = choose_references(cands, ["bottle"], k=1, seed=0)
    assert chosen["uri"].tolist() == ["/refs/bottle/001.png"]


# --------------------------------------------------------------------------------------------
# Digest and storage
# --------------------------------------------------------------------------------------------


def test_digest_changes_with_etag_and_file():
    cands = candidates({"bottle": 4, "cable": 4})
    cands["etag"] = [f"e{i}" for i in range(len(cands))]
    chosen, _ = choose_references(cands, ["bottle", "cable"], k=2, seed=0)
    digest = references_digest(chosen)
    assert set(digest) == {"bottle", "cable"} and all(len(v) == 64 for v in digest.values())
    assert references_digest(chosen.iloc[::-1].reset_index(drop=True)) == digest  # stable
    changed = chosen.copy()
    changed.loc[changed["category"] == "bottle", "etag"] = "new"
    new = references_digest(changed)
    assert new["bottle"] != digest["bottle"] and new["cable"] == digest["cable"]
    other, _ = choose_references(cands, ["bottle", "cable"], k=2, seed=5)
    assert references_digest(other) != digest


def test_digest_without_etag_uses_size_and_mtime():
    chosen, _ = choose_references(candidates({"bottle": 3}), ["bottle"], k=2, seed=0)
    digest = references_digest(chosen)
    changed = chosen.copy()
    changed.loc[0, "mtime"] = 99.0
    assert references_digest(changed) != digest


@pytest.mark.parametrize("as_folder", [False, True])
def test_write_read_round_trip(tmp_path, as_folder):
    cands = candidates({"bottle": 3, "cable": 2})
    cands.loc[0, "etag"] = "abc"
    cands.loc[1, ["size", "mtime"]] = [pd.NA, pd.NA]
    chosen, _ = choose_references(cands, ["bottle", "cable"], k=3, seed=0, with_replacement=True)
    uri = str(tmp_path / "run") if as_folder else str(tmp_path / "run" / "references.parquet")
    write_references(chosen, uri)
    assert os.listdir(tmp_path / "run") == ["references.parquet"]  # no temp file left
    back = read_references(uri)
    pd.testing.assert_frame_equal(back, chosen)
    assert back["etag"].map(type).tolist().count(type(None)) == chosen["etag"].isna().sum()


def test_write_read_empty(tmp_path):
    chosen, missing = choose_references(candidates({}), ["bottle"], k=1, seed=0)
    assert missing == ["bottle"] and len(chosen) == 0
    write_references(chosen, str(tmp_path / "references.parquet"))
    pd.testing.assert_frame_equal(read_references(str(tmp_path / "references.parquet")), chosen)


@pytest.mark.parametrize("seed", [0, 42, 111, 2**32 - 1])
def test_torch_randint_sampler_draws_what_torch_draws(seed):
    """APRIL-GAN's draw: torch.manual_seed(seed), then torch.randint(0, n, (k,)) per category, the
    categories in alphabetical order, each category's candidates sorted by URI; compared with torch."""
    import torch

    counts = {"zipper": 391, "bottle": 209, "screw": 320, "carpet": 1}
    cands = candidates(counts).sample(frac=1.0, random_state=1)  # listing order does not matter
    chosen, missing = choose_references(
        cands, ["zipper", "nut", "bottle", "screw", "carpet"], 4, seed, with_replacement=True, sampler="torch_randint"
    )
    assert missing == ["nut"]
    torch.manual_seed(seed)
    for cat in sorted(counts):
        want = torch.randint(0, counts[cat], (4,)).tolist()
        got = chosen[chosen["category"] == cat].sort_values("shot")["uri"].tolist()
        assert got == [f"/refs/{cat}/{i:03d}.png" for i in want], cat


def test_torch_randint_sampler_needs_replacement_and_a_32_bit_seed():
    from pydantic import ValidationError

    from pipeline.config import FewShotSpec

    with pytest.raises(ValidationError, match="with_replacement"):
        FewShotSpec(sampler="torch_randint", with_replacement=False)
    with pytest.raises(ValidationError, match=r"\[0, 2\^32\)"):
        FewShotSpec(sampler="torch_randint", with_replacement=True, seed=2**32)
    assert FewShotSpec(sampler="torch_randint", with_replacement=True, seed=42).k == 1


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_torch_shuffle_sampler_takes_what_a_shuffling_dataloader_yields_first(seed):
    """FADE's draw: torch.manual_seed(seed), then a DataLoader(shuffle=True) over the category's
    train images (sorted by path); its first k batches are the references. Compared with torch's
    own DataLoader, per category (FADE seeds again before each category)."""
    import torch

    counts = {"zipper": 23, "bottle": 9, "carpet": 2}
    cands = candidates(counts).sample(frac=1.0, random_state=3)
    chosen, missing = choose_references(cands, ["zipper", "bottle", "carpet"], 2, seed, sampler="torch_shuffle")
    assert missing == []
    for cat, n in counts.items():
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(list(range(n)), batch_size=1, shuffle=True)
        want = [int(b) for b, _ in zip(loader, range(2))]
        got = chosen[chosen["category"] == cat].sort_values("shot")["uri"].tolist()
        assert got == [f"/refs/{cat}/{i:03d}.png" for i in want], cat
    with pytest.raises(InputError, match="'carpet' has 2 candidate"):
        choose_references(cands, ["carpet"], 3, seed, sampler="torch_shuffle")


def test_torch_shuffle_sampler_needs_no_replacement():
    from pydantic import ValidationError

    from pipeline.config import FewShotSpec

    with pytest.raises(ValidationError, match="without replacement"):
        FewShotSpec(sampler="torch_shuffle", with_replacement=True)
    with pytest.raises(ValidationError, match=r"\[0, 2\^64\)"):
        FewShotSpec(sampler="torch_shuffle", seed=-1)
    assert FewShotSpec(sampler="torch_shuffle", seed=0).sampler == "torch_shuffle"
