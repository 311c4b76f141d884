"""`cp-deploy batch --input` takes a folder, a file, a glob or a text file listing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cp_deploy.cli import main
from cp_deploy.errors import InputError
from cp_deploy.executors.inputs import list_inputs
from tests.conftest import make_images


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_images(tmp_path / "data" / "a", 2)
    make_images(tmp_path / "data" / "b", 2, seed=1)
    (tmp_path / "data" / "notes.txt").write_text("not an image\n")
    return tmp_path / "data"


def test_a_file_a_glob_and_a_list_name_their_files(tree):
    one = list_inputs(tree / "a" / "img_000.png")
    assert (one.root, one.files, one.rescanned) == (tree / "a", [Path("img_000.png")], None)
    pattern = list_inputs(f"{tree}/**/img_001.png")
    assert pattern.root == tree and pattern.files == [Path("a/img_001.png"), Path("b/img_001.png")]
    assert pattern.rescanned == tree  # a rerun of the glob lists this folder again
    listed = tree / "list.txt"
    listed.write_text("# two images\na/img_000.png\n\nb/img_001.png  # relative to the list\na/img_000.png\n")
    got = list_inputs(listed)
    assert got.root == tree and got.files == [Path("a/img_000.png"), Path("b/img_001.png")]
    assert list_inputs(tree).files == [Path(f"{d}/img_00{i}.png") for d in "ab" for i in (0, 1)]


def test_nothing_matched_or_listed_is_one_line(tree):
    with pytest.raises(InputError, match="matches no image"):
        list_inputs(f"{tree}/**/*.jpg")
    (tree / "bad.txt").write_text("a/img_000.png\na/missing.png\n")
    with pytest.raises(InputError, match=r"bad\.txt: lists files that do not exist: .*missing\.png"):
        list_inputs(tree / "bad.txt")
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(tree / "nowhere")


def test_batch_on_a_list_and_the_output_checks(tiny_bundle, tree, tmp_path, capsys):
    listed = tree / "list.txt"
    listed.write_text("a/img_000.png\nb/img_001.png\n")
    common = ["batch", "--bundle", str(tiny_bundle.root), "--no-progress"]
    assert main([*common, "--input", str(listed), "--output", str(tmp_path / "out")]) == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == ["a/img_000.png", "b/img_001.png"]
    assert (tmp_path / "out" / "masks" / "b" / "img_001.png").is_file()
    capsys.readouterr()
    # A glob is listed again on a rerun, so its output may not lie under the glob's folder.
    assert main([*common, "--input", f"{tree}/**/*.png", "--output", str(tree / "out")]) == 2
    assert "inside --input" in capsys.readouterr().err
    # A single file: an output beside it is fine, one that holds it is not.
    assert main([*common, "--input", str(tree / "a" / "img_000.png"), "--output", str(tree / "a" / "seg")]) == 0
    assert main([*common, "--input", str(tree / "a" / "img_000.png"), "--output", str(tree)]) == 2
    assert "holds the input" in capsys.readouterr().err
