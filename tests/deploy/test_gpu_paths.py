"""The arithmetic of the GPU paths, on the CPU: device preprocessing, batched postprocessing,
fused ViT attention with window trimming, bucketed decoders, and cp-bench's latency mode.

What only runs on CUDA (compiled flex kernels, CUDA graph capture and replay, pinned uploads)
is checked by ``tools/gpu_bench.py`` on a GPU; these tests pin the arithmetic those paths run."""

from __future__ import annotations

import copy
import json
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

from cp_bench.cli import main as bench_main
from cp_deploy.bundle import load_bundle
from cp_deploy.engines.torch import BucketedHead, TorchEngine
from cp_deploy.models.attention import use_fast_attention
from cp_deploy.models.build import build_models
from cp_deploy.models.sam import PromptHead, build_sam
from cp_deploy.pipeline import CurriculumPipeline
from cp_deploy.preprocess import (
    Geometry,
    PreprocessConfig,
    postprocess_batch,
    postprocess_masks,
    preprocess_batch,
    preprocess_image,
    resize_longest_side,
    resize_longest_side_torch,
)
from export.parity import synthetic_images

# Upscales and downscales (up to 4x, so 9-tap kernels), extreme aspect ratios, a side already at
# the target (Pillow skips that pass), a 1-pixel side, and 1030x260 -> 1024x258, where the height
# loses more than twice the width's pixels (Pillow 13 then runs its vertical pass first).
SIZES = ((96, 128), (131, 77), (1, 5), (7, 300), (256, 190), (1030, 260))


@pytest.mark.parametrize("image_size", [256, 1024])
def test_torch_resize_is_pillows_bilinear_pixel_for_pixel(image_size):
    """Bound 0: the torch path ports Pillow's fixed-point bilinear passes. (F.interpolate with
    antialias=True rounds once from float instead of twice in 8 bits and lands 1 level off on
    11-20% of pixels, measured on 96x128 and 3000x2000 inputs: not the model's input.)"""
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = resize_longest_side(image, image_size)
        got = resize_longest_side_torch(torch.from_numpy(image), image_size)
        assert got.dtype == torch.uint8 and got.shape == expected.shape
        assert np.array_equal(got.numpy(), expected), (h, w)


@pytest.mark.parametrize("normalize", ["meanstd", "minmax"])
def test_preprocess_batch_on_device_equals_preprocess_image(normalize):
    """The whole batch path (upload, resize, normalise, pad) against preprocess_image, bit for bit;
    on the CPU the default path is preprocess_image itself."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES[:5]]
    cfg = PreprocessConfig(image_size=256, normalize=normalize)
    expected = torch.stack([preprocess_image(im, cfg)[0] for im in images])
    assert torch.equal(preprocess_batch(images, cfg, "cpu", on_device=True), expected)
    assert torch.equal(preprocess_batch(images, cfg, "cpu"), expected)


def test_postprocess_batch_equals_postprocess_masks():
    """One upscale for the batch, one copy back: the same masks as per-image postprocess_masks > 0,
    an image without instances included."""
    sizes, counts = [(96, 128), (131, 77), (64, 64), (200, 51)], [2, 0, 3, 1]
    geos = [Geometry.for_image(s, 128) for s in sizes]
    low = torch.randn(sum(counts), 1, 32, 32, generator=torch.Generator().manual_seed(0))
    got = postprocess_batch(low, counts, geos)
    for g, x, geo, k in zip(got, low.split(counts), geos, counts):
        assert g.dtype == torch.bool and g.shape == (k, *geo.original_size)
        assert torch.equal(g, postprocess_masks(x, geo) > 0)
    with pytest.raises(ValueError, match="masks for counts"):
        postprocess_batch(low, [1, 1], geos[:2])


def _encoder_with_padded_windows() -> ImageEncoderViT:
    """10x10 tokens in 4x4 windows (padded to 12x12), one windowed and one global block; the
    rel-pos tables and the qkv bias (what the padding tokens carry) made non-zero."""
    torch.manual_seed(0)
    enc = ImageEncoderViT(img_size=160, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2,
                          out_chans=32, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, window_size=4, global_attn_indexes=(1,)).eval()
    for m in enc.modules():
        if hasattr(m, "rel_pos_h"):
            torch.nn.init.normal_(m.rel_pos_h, std=0.5)
            torch.nn.init.normal_(m.rel_pos_w, std=0.5)
            torch.nn.init.normal_(m.qkv.bias, std=0.5)
    return enc


@pytest.mark.parametrize("kernel,trim", [("sam", True), ("sdpa", False), ("sdpa", True), ("flex", False),
                                         ("flex", True)])
def test_fast_attention_equals_segment_anything(kernel, trim):
    """Each kernel, with and without window trimming, against segment-anything's Attention and
    Block on windowed (padded) and global blocks; same state-dict keys. The fused kernels sum in
    another order (measured 2e-6 on a scale of 3.4); the trimmed three-step form is exact."""
    enc = _encoder_with_padded_windows()
    fast = copy.deepcopy(enc)
    assert use_fast_attention(fast, kernel, trim) == 2
    seen = []
    fast.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex_attention warns that it is unfused
        ref, got = enc(x), fast(x)
    # Trimmed: qkv sees the 10x10 tokens of each image; untrimmed: 9 padded 4x4 windows each.
    assert seen == ([(2, 10, 10, 64)] if trim else [(18, 4, 4, 64)])
    if kernel == "sam":
        assert torch.equal(got, ref)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert fast.state_dict().keys() == enc.state_dict().keys()


def test_engine_rejects_an_unknown_attention_kernel(tiny_bundle):
    with pytest.raises(ValueError, match="attention must be one of sam, sdpa, flex"):
        TorchEngine(tiny_bundle, attention="fused")


@pytest.fixture(scope="module")
def real_refine_head() -> PromptHead:
    """LiteMedSAM's prompt encoder with the shipped bundle's trained refine decoder."""
    return build_models(load_bundle(None)).refine


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_bucketed_head_equals_unbucketed(which, request):
    """Instance counts padded to a bucket (3 -> 4) and, on the tiny head, chunked beyond the
    largest (5 -> 4 + 1) give each instance the outputs of PromptHead.forward, for the prompt
    combinations the pipeline sends (two on the real head, whose calls cost seconds on a CPU).
    The bound, 1e-5 of the logits' scale, is rounding (matrix products of another batch size;
    measured 1e-6 on the real head); a padding row leaking into an instance would be of order 1."""
    torch.manual_seed(0)
    if which == "tiny":
        head = PromptHead.from_sam(build_sam("tiny")).eval()
    else:
        head = request.getfixturevalue("real_refine_head")
    pe = head.prompt_encoder
    side = pe.input_image_size[0]
    bucketed = BucketedHead(head, (1, 2, 4))
    for n in (3, 5) if which == "tiny" else (3,):
        emb = torch.randn(n, pe.embed_dim, *pe.image_embedding_size)
        boxes = torch.rand(n, 4) * side / 2
        boxes[:, 2:] += boxes[:, :2]
        points = (torch.rand(n, 8, 2) * side, torch.randint(0, 2, (n, 8)))
        mask = torch.randn(n, 1, *head.mask_input_size)
        combos = [{"boxes": boxes}, {"points": points, "mask_input": mask}]
        if which == "tiny":  # the other two modes' prompts, where a call costs nothing
            combos += [{"points": points, "boxes": boxes}, {"boxes": boxes, "mask_input": mask}]
        for prompts in combos:
            with torch.inference_mode():
                ref, got = head(emb, **prompts), bucketed(emb, **prompts)
            for r, g in zip(ref, got):
                assert g.shape == r.shape
                assert float((g - r).abs().max()) <= 1e-5 * max(1.0, float(r.abs().max())), (n, list(prompts))
    assert [bucketed.bucket(k) for k in (1, 3, 4)] == [1, 4, 4]


def test_pipeline_with_bucketed_decoders_gives_the_same_masks(tiny_bundle):
    images = synthetic_images(3, seed=2)
    ref = CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle)).predict(images)
    got = CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle, decoder_buckets=(1, 2, 4))).predict(images)
    assert sum(len(r.boxes) for r in ref) > 0
    for r, g in zip(ref, got):
        assert np.array_equal(r.masks, g.masks)
        np.testing.assert_allclose(g.low_res_logits, r.low_res_logits, atol=1e-5)


def test_speed_latency_mode(tiny_bundle, tmp_path, capsys):
    """--latency: batch 1, per-image p50 <= p95, mean, a p50 per stage; any other batch size is a
    one-line usage error."""
    out = tmp_path / "lat.json"
    assert bench_main(["speed", "--bundle", str(tiny_bundle.root), "--image-dir", "", "--images", "3",
                       "--latency", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    lat = r["latency"]
    assert r["batch_size"] == 1 and lat["images"] == 3
    assert 0 < lat["latency_ms_p50"] <= lat["latency_ms_p95"] and lat["latency_ms_mean"] > 0
    assert set(lat["stage_ms_p50"]) >= {"preprocess", "encode", "box", "refine", "postprocess"}
    assert f"p50 {lat['latency_ms_p50']} ms" in capsys.readouterr().out
    assert bench_main(["speed", "--bundle", str(tiny_bundle.root), "--latency", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--latency times batch 1" in err and len(err.strip().splitlines()) == 1
