"""bundle.json is checked before anything is loaded: known keys of the right types and ranges,
weight files inside the bundle (or an absolute SAM checkpoint), every one with its sha256, and
checkpoints that are plain tensors. Each mistake is one line naming the file, the key and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cp_deploy.bundle import BUNDLE_FILE, default_bundle_path, load_bundle, write_bundle
from cp_deploy.cli import main
from cp_deploy.errors import BundleError, WeightsError
from cp_deploy.models.build import build_models, init_bundle
from cp_deploy.models.weights import read_state_dict, sha256_file
from tests.conftest import make_images


def _copy(bundle, tmp_path: Path, edit=None) -> Path:
    """A copy of ``bundle`` with ``edit(spec)`` applied to its bundle.json."""
    d = tmp_path / "b"
    shutil.copytree(bundle.root, d)
    if edit is not None:
        spec = json.loads((d / BUNDLE_FILE).read_text())
        edit(spec)
        (d / BUNDLE_FILE).write_text(json.dumps(spec))
    return d


def _batch_error(bundle_dir: Path, tmp_path: Path, capsys) -> str:
    """``cp-deploy batch`` on one image: exit 2 and exactly one ``cp-deploy: error:`` line."""
    make_images(tmp_path / "in", 1)
    code = main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), "--bundle",
                 str(bundle_dir), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cp-deploy: error: "), err
    return err[0]


class _Boom:
    """Pickled with a reference to ``Path.touch``: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


# -- checkpoints -----------------------------------------------------------------------------------


def test_crafted_pickle_checkpoint_is_not_run_and_named(tiny_bundle, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Boom(marker)}, evil)
    with pytest.raises(WeightsError) as e:
        read_state_dict(evil)
    msg = str(e.value)
    assert str(evil) in msg and "not a plain tensor checkpoint" in msg and "safetensors" in msg
    assert "weights_only=False" not in msg and "weights_only" not in msg
    assert not marker.exists()

    def edit(spec):
        spec["sam"].update({"checkpoint": str(evil), "sha256": sha256_file(evil)})

    line = _batch_error(_copy(tiny_bundle, tmp_path, edit), tmp_path, capsys)
    assert "evil.pth: not a plain tensor checkpoint" in line and "weights_only" not in line
    assert not marker.exists()


def test_non_tensor_state_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match=r"list\.pth: not a state dict of tensors"):
        read_state_dict(path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(WeightsError, match=r"bad\.safetensors: not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")


# -- hashes and paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["heads.box", "detector", "keypoints", "sam"])
def test_weight_file_without_sha256_is_refused(tiny_bundle, tmp_path, capsys, section):
    def edit(spec):
        if section == "heads.box":
            spec["heads"]["box"] = {"file": "detector.safetensors"}
        else:
            spec[section].pop("sha256")

    d = _copy(tiny_bundle, tmp_path, edit)
    key = f"{section}.sha256"
    with pytest.raises(BundleError, match=rf"bundle\.json: key '{key}' is missing .*sha256sum .*'{key}'"):
        load_bundle(d)
    assert key in _batch_error(d, tmp_path, capsys)


@pytest.mark.parametrize("name", ["../../../../../../../../etc/passwd", "/etc/passwd", "link.safetensors"])
def test_weight_file_outside_the_bundle_is_refused(tiny_bundle, tmp_path, capsys, name):
    def edit(spec):
        spec["detector"].update({"file": name, "sha256": "0" * 64})

    d = _copy(tiny_bundle, tmp_path, edit)
    (d / "link.safetensors").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match=r"bundle\.json: key 'detector\.file' .*(outside the bundle|absolute path)"):
        load_bundle(d)
    assert "detector.file" in _batch_error(d, tmp_path, capsys)


def test_absolute_sam_checkpoint_needs_its_recorded_hash(tiny_bundle, tmp_path):
    """An absolute SAM checkpoint (Meta's .pth, kept outside the bundle) is allowed, with its hash."""
    ckpt = tmp_path / "elsewhere" / "sam.safetensors"
    ckpt.parent.mkdir()
    shutil.copy2(tiny_bundle.sam.file, ckpt)
    d = _copy(tiny_bundle, tmp_path, lambda spec: spec["sam"].update({"checkpoint": str(ckpt), "sha256": None}))
    with pytest.raises(BundleError, match=rf"'sam\.sha256' is missing for '{ckpt}'.*run 'sha256sum {ckpt}'"):
        load_bundle(d)
    spec = json.loads((d / BUNDLE_FILE).read_text())
    spec["sam"]["sha256"] = sha256_file(ckpt)
    (d / BUNDLE_FILE).write_text(json.dumps(spec))
    assert load_bundle(d).sam.file == ckpt


def test_bundle_writers_record_every_hash(tiny_bundle, tmp_path):
    """init_bundle with a checkpoint, and write_bundle keeping a file of the spec, record hashes."""
    ckpt = tmp_path / "sam.safetensors"
    shutil.copy2(tiny_bundle.sam.file, ckpt)
    b = init_bundle(tmp_path / "init", "tiny", sam_checkpoint=str(ckpt), seed=0)
    assert b.sam.file == ckpt and b.sam.sha256 == sha256_file(ckpt)
    spec = json.loads((tiny_bundle.root / BUNDLE_FILE).read_text())
    spec["keypoints"].pop("sha256")
    out = tmp_path / "kept"
    shutil.copytree(tiny_bundle.root, out)
    assert write_bundle(out, spec, {}).keypoints.sha256 == sha256_file(out / "keypoints.safetensors")


def test_shipped_bundle_records_every_hash():
    spec = json.loads((default_bundle_path() / BUNDLE_FILE).read_text())
    entries = [*spec["heads"].values(), spec["detector"], spec["keypoints"]]
    assert all(e["sha256"] == sha256_file(default_bundle_path() / e["file"]) for e in entries)
    assert spec["sam"]["checkpoint"] is None  # lite_medsam: its package's file, checked by a constant hash
    load_bundle()


# -- keys, types and ranges ------------------------------------------------------------------------


def _set(path: str, value):
    def edit(spec):
        *parents, last = path.split(".")
        d = spec
        for p in parents:
            d = d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


_DELETE = object()

BAD_SPECS = [
    ("prompt.score_threshold", "0.3", r"'prompt\.score_threshold' is '0\.3'; expected a number in \[0, 1\]"),
    ("prompt.score_threshold", 1.5, r"'prompt\.score_threshold' is 1\.5; expected a number in \[0, 1\]"),
    ("prompt.nms_iou", 0, r"'prompt\.nms_iou' is 0; expected a number in \(0, 1\]"),
    ("prompt.max_instances", 0, r"'prompt\.max_instances' is 0; expected an integer >= 1"),
    ("prompt.max_instances", 2.5, r"'prompt\.max_instances' is 2\.5; expected an integer >= 1"),
    ("prompt.max_instances", True, r"'prompt\.max_instances' is True; expected an integer >= 1"),
    ("prompt.min_instances", -1, r"'prompt\.min_instances' is -1; expected an integer >= 0"),
    ("prompt.min_instances", 9, r"'prompt\.min_instances' \(9\) exceeds 'prompt\.max_instances'"),
    ("prompt.text", "", r"'prompt\.text' is ''; expected a non-empty string"),
    ("prompt.mode", "best", r"'prompt\.mode' must be 'all' or 'top1', got 'best'"),
    ("prompt.treshold", 0.3, r"unknown key\(s\) 'treshold' in 'prompt'; expected text, mode, .*remove or rename"),
    ("keypoints.reads", "pixels", r"'keypoints\.reads' must be 'image' or 'embedding', got 'pixels'"),
    ("detector.weights", "x", r"unknown key\(s\) 'weights' in 'detector'; expected arch, reads, config"),
    ("detector.config", [], r"'detector\.config' must be an object"),
    ("sam.sha", "x", r"unknown key\(s\) 'sha' in 'sam'; expected arch, checkpoint, sha256"),
    ("heads.mask", None, r"unknown key\(s\) 'mask' in 'heads'; expected box, refine"),
    ("detectors", {}, r"unknown key\(s\) 'detectors'; expected format_version, name, sam"),
    ("preprocess.image_size", _DELETE, r"'preprocess\.image_size' is missing; expected the model's input side"),
    ("preprocess.image_size", "256", r"'preprocess\.image_size' is '256'; expected .* a positive integer"),
    ("preprocess.normalize", _DELETE, r"'preprocess\.normalize' is missing; expected 'meanstd' or 'minmax'"),
    ("preprocess.pixel_std", [1, 0, 1], r"'preprocess\.pixel_std' is \[1, 0, 1\]; every value must be > 0"),
    ("preprocess.mean", [1, 2, 3], r"'preprocess' has unknown key\(s\) mean; expected image_size"),
    ("keypoints.preprocess", {"normalize": "meanstd"}, r"'keypoints\.preprocess\.image_size' is missing"),
    ("metadata", [], r"key 'metadata' must be an object"),
]


BAD_IDS = [f"{k}=" + ("deleted" if v is _DELETE else repr(v)) for k, v, _ in BAD_SPECS]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_SPECS, ids=BAD_IDS)
def test_bad_bundle_json_is_one_line_naming_the_key(tiny_bundle, tmp_path, capsys, key, value, expected):
    d = _copy(tiny_bundle, tmp_path, _set(key, value))
    with pytest.raises(BundleError, match=r"bundle\.json: .*" + expected):
        load_bundle(d)
    line = _batch_error(d, tmp_path, capsys)
    assert BUNDLE_FILE in line and key.split(".")[-1] in line


# Which archs exist is the model registry's knowledge: checked where the networks are built.
BAD_STAGES = [
    ("detector.arch", "yolo", r"'detector\.arch': unknown detector arch 'yolo'; known: embedding_centernet, "
                              r"lite0_centernet, grounding_dino"),
    ("keypoints.arch", "vitpose", r"'keypoints\.arch': unknown keypoint arch 'vitpose'; known: embedding_heatmap, "
                                  r"topdown_heatmap, hrnet \(= topdown_heatmap\)"),
    ("keypoints.reads", "image", r"'keypoints\.reads' is 'image', but embedding_heatmap reads the embedding; "
                                 r"set it to 'embedding'"),
    ("detector.reads", "image", r"'detector\.reads' is 'image', but embedding_centernet reads the embedding"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_STAGES, ids=[f"{k}={v!r}" for k, v, _ in BAD_STAGES])
def test_unknown_arch_or_wrong_reads_is_one_line_naming_the_key(tiny_bundle, tmp_path, capsys, key, value, expected):
    d = _copy(tiny_bundle, tmp_path, _set(key, value))
    bundle = load_bundle(d)
    with pytest.raises(BundleError, match=r"bundle\.json: " + expected):
        build_models(bundle)
    line = _batch_error(d, tmp_path, capsys)
    assert BUNDLE_FILE in line and key in line


def test_metadata_stays_free_form(tiny_bundle, tmp_path):
    d = _copy(tiny_bundle, tmp_path, _set("metadata", {"anything": [1, {"goes": None}], "note": "x"}))
    assert load_bundle(d).metadata["anything"] == [1, {"goes": None}]


def test_config_the_net_does_not_take_names_the_key(tiny_bundle, tmp_path, capsys):
    d = _copy(tiny_bundle, tmp_path, _set("keypoints.config.hiden", 64))
    with pytest.raises(BundleError, match=r"bundle\.json: 'keypoints\.config' does not fit arch 'embedding_heatmap'"
                                          r" .*hiden.*fix or remove the key"):
        build_models(load_bundle(d))
    assert "keypoints.config" in _batch_error(d, tmp_path, capsys)
