"""The shipped default bundle: it loads (LiteMedSAM from its package, hash-checked) and, given
ground-truth boxes, segments the real example polyps well. This checks the encoder, the
min-max preprocessing and the box pass on real data, independent of the detector."""

from pathlib import Path

import numpy as np
import pytest

from cp_deploy.bundle import load_bundle
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.files import read_image, read_mask
from cp_deploy.metrics import dice
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from cp_train.targets import mask_instances

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def default_engine():
    bundle = load_bundle()
    return bundle, TorchEngine(bundle)


def test_default_bundle_box_pass_on_real_polyps(default_engine):
    bundle, engine = default_engine
    assert bundle.sam_arch == "lite_medsam"
    pipe = CurriculumPipeline(bundle, engine, PipelineOptions(prompts="box"))
    names = sorted(p.stem for p in (EXAMPLES / "masks").glob("*.png"))
    images = [read_image(EXAMPLES / "images" / f"{n}.jpg") for n in names]
    gts = [read_mask(EXAMPLES / "masks" / f"{n}.png") for n in names]
    boxes = [np.stack([i.box for i in mask_instances(g)]) for g in gts]
    results = pipe.predict(images, boxes=boxes)
    scores = [dice(r.mask, g) for r, g in zip(results, gts)]
    # Zero-shot LiteMedSAM with GT boxes measures 0.946 mDice on the 100 Kvasir test images.
    assert np.mean(scores) > 0.88, scores


def test_default_bundle_reproduces_its_recorded_examples_score(default_engine):
    """The shipped weights give the mDice recorded in bundle.json on examples/ (within 0.01)."""
    from cp_train.evaluate import score_folder

    bundle, _ = default_engine
    recorded = bundle.metadata.get("examples")
    assert recorded, "the default bundle records no examples score (cp-train evaluate --bundle ...)"
    assert bundle.metadata.get("trained"), "the default bundle should be the trained one"
    scores = score_folder(bundle, EXAMPLES)
    assert abs(scores["mDice"] - recorded["mDice"]) <= 0.01, (scores, recorded)
