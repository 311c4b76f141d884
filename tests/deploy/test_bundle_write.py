"""Writing bundles: every file through the one atomic writer, each weight file hashed once per
load, derived bundles that keep what they do not replace, and weightless copies."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import cp_deploy.bundle as bundle_mod
import cp_deploy.models.weights as weights_mod
from cp_deploy.bundle import (
    BUNDLE_FILE,
    derive_bundle,
    load_bundle,
    read_spec,
    update_spec,
    weightless_copy,
    write_bundle,
)
from cp_deploy.models.build import build_models
from cp_deploy.models.weights import read_state_dict, sha256_file


@pytest.fixture
def hash_calls(monkeypatch) -> Counter:
    """Counts sha256_file calls by file name, wherever the project calls it from."""
    calls: Counter = Counter()

    def counting(path):
        calls[Path(path).name] += 1
        return sha256_file(path)

    monkeypatch.setattr(bundle_mod, "sha256_file", counting)
    monkeypatch.setattr(weights_mod, "sha256_file", counting)
    return calls


def test_each_weight_file_is_hashed_once_per_load(tiny_bundle, hash_calls):
    build_models(load_bundle(tiny_bundle.root))
    named = {tiny_bundle.sam.file.name, tiny_bundle.detector.file.name, tiny_bundle.keypoints.file.name}
    assert dict(hash_calls) == dict.fromkeys(named, 1)


def test_a_corrupt_file_is_still_refused_at_load(tiny_bundle, tmp_path):
    out = derive_bundle(tiny_bundle, tmp_path / "b", {})
    with out.sam.file.open("r+b") as f:  # flip one byte of the SAM checkpoint
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(bundle_mod.BundleError, match="sam.checkpoint.*sha256"):
        load_bundle(out.root)


def test_write_bundle_leaves_no_temporaries_and_records_the_hashes_it_wrote(tiny_bundle, tmp_path):
    net = build_models(tiny_bundle).keypoints
    spec = read_spec(tiny_bundle)
    for key in ("detector", "keypoints"):
        spec[key].pop("file")
        spec[key].pop("sha256")
    spec["sam"]["checkpoint"] = str(tiny_bundle.sam.file)  # an absolute checkpoint: its hash is recorded
    spec["sam"].pop("sha256")
    out = write_bundle(tmp_path / "w", spec, {"keypoints": net, "detector": build_models(tiny_bundle).detector})
    assert sorted(p.name for p in out.root.iterdir()) == [BUNDLE_FILE, "detector.safetensors", "keypoints.safetensors"]
    assert out.keypoints.sha256 == sha256_file(out.keypoints.file)
    assert out.sam.sha256 == sha256_file(tiny_bundle.sam.file)
    state = read_state_dict(out.keypoints.file)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_derive_bundle_replaces_one_stage_and_copies_the_rest(tiny_bundle, tmp_path):
    det = build_models(tiny_bundle).detector
    with torch.no_grad():
        for p in det.parameters():
            p.add_(0.5)
    out = derive_bundle(tiny_bundle, tmp_path / "d", {"detector": (None, det)}, metadata={"run": 3},
                        prompt={"score_threshold": 0.2})
    assert out.keypoints.file.read_bytes() == tiny_bundle.keypoints.file.read_bytes()
    assert out.sam.file.read_bytes() == tiny_bundle.sam.file.read_bytes()
    assert out.detector.sha256 != tiny_bundle.detector.sha256
    stored = read_state_dict(out.detector.file)
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())  # fp16 storage
    assert out.metadata["run"] == 3 and out.prompt.score_threshold == 0.2
    assert out.prompt.max_instances == tiny_bundle.prompt.max_instances


def test_update_spec_merges_one_section_and_keeps_the_weights(tiny_bundle, tmp_path):
    out = derive_bundle(tiny_bundle, tmp_path / "u", {})
    before = {p.name: p.read_bytes() for p in out.root.glob("*.safetensors")}
    update_spec(out.root, "metadata", {"examples": {"mDice": 0.5}})
    assert [p.name for p in out.root.iterdir() if p.name.startswith(".")] == []
    again = load_bundle(out.root)
    assert again.metadata["examples"] == {"mDice": 0.5} and again.metadata["seed"] == 0
    assert {p.name: p.read_bytes() for p in out.root.glob("*.safetensors")} == before


def test_weightless_copy_is_one_loadable_file(tmp_path):
    b = weightless_copy(tmp_path / "base")
    assert [p.name for p in b.root.iterdir()] == [BUNDLE_FILE]
    assert b.detector.file is None and b.keypoints.file is None and b.box_head.file is None
    shipped = read_spec(bundle_mod.default_bundle_path())
    assert json.loads((b.root / BUNDLE_FILE).read_text())["detector"]["config"] == shipped["detector"]["config"]
