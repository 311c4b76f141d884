"""``cp-train`` maps its flags onto the library's Dataset and recipes, and its subcommands run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cp_deploy.bundle import load_bundle
from cp_train.cli import build_parser, main
from cp_train.commands import dataset_from, recipes_from
from cp_train.stages.detector import DetectorRecipe
from cp_train.stages.keypoints import KeypointRecipe
from cp_train.stages.sam_box import SamBoxRecipe
from cp_train.stages.sam_refine import SamRefineRecipe

REQUIRED = ["--data", "d", "--split", "d/train.txt", "--out", "o"]


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_flags_map_to_the_stage_recipe_and_the_dataset():
    args = _parse("sam-refine", *REQUIRED, "--epochs", "2", "--seed", "1", "--val-seed", "0", "--point-jitter",
                  "0.05", "--refine-points", "predicted", "--refine-train-points", "predicted", "--max-images", "5",
                  "--val-fraction", "0.2", "--resume", "--ema", "0.9")
    assert recipes_from(args) == {"sam-refine": SamRefineRecipe(
        epochs=2, seed=1, ema=0.9, resume=True, point_jitter=0.05, train_points="predicted", val_points="predicted")}
    data = dataset_from(args)
    assert (data.root, data.split, data.val_seed, data.val_fraction, data.max_images) == (
        Path("d"), Path("d/train.txt"), 0, 0.2, 5)
    assert dataset_from(_parse("sam-box", *REQUIRED, "--seed", "3")).val_seed == 3  # --seed carves by default


def test_all_gives_every_stage_its_own_defaults():
    recipes = recipes_from(_parse("all", *REQUIRED, "--keypoint-arch", "topdown_heatmap", "--keypoint-crop", "64"))
    assert list(recipes) == ["detector", "sam-box", "sam-refine", "keypoints"]
    assert recipes["sam-box"] == SamBoxRecipe() and (recipes["sam-box"].epochs, recipes["sam-box"].lr) == (3, 1e-4)
    assert recipes["detector"] == DetectorRecipe() and recipes["detector"].epochs == 8
    assert recipes["keypoints"] == KeypointRecipe(arch="topdown_heatmap", crop=64)
    det = recipes_from(_parse("detector", *REQUIRED, "--detector-size", "320", "--detector-freeze", "0", "--giou",
                              "2", "--workers", "5", "--val-metric", "boxes", "--lr", "1e-3"))["detector"]
    assert det == DetectorRecipe(lr=1e-3, size=320, freeze=0, giou=2.0, workers=5, val_metric="boxes")


def test_families_come_from_the_registry(capsys):
    assert _parse("keypoints", *REQUIRED, "--keypoint-arch", "hrnet").keypoint_arch == "hrnet"  # old name, alias
    # checked against the registry after parsing (it imports torch), before any data is read
    assert main(["keypoints", *REQUIRED, "--keypoint-arch", "no_such_family"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--keypoint-arch no_such_family" in err and "topdown_heatmap" in err and "\n" not in err
    det = _parse("detector", *REQUIRED, "--detector-arch", "embedding_centernet")
    assert det.detector_arch == "embedding_centernet"


def test_every_flag_of_every_subcommand_has_help():
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings} has no help"


def test_evaluate_records_the_examples_score(dataset, tiny_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.root, bundle)
    assert main(["evaluate", "--bundle", str(bundle), "--examples", str(dataset)]) == 0
    printed = json.loads(capsys.readouterr().out)
    recorded = load_bundle(bundle).metadata["examples"]
    assert recorded == {"prompts": "curriculum", **{k: round(v, 4) for k, v in printed.items()}}
