import copy
import math

import pytest
import torch

from cp_deploy.errors import WeightsError
from cp_deploy.models.centernet import decode_centernet
from cp_deploy.models.keypoints import decode_heatmaps, heatmap_to_image, image_to_heatmap
from cp_deploy.models.registry import build_detector
from cp_deploy.models.sam import build_sam
from cp_deploy.models.weights import load_strict


def test_keypoint_subpixel_decoding():
    """A Gaussian heatmap peaked between pixels decodes to the true sub-pixel location."""
    h = w = 32
    true = torch.tensor([[[10.3, 20.7], [5.0, 5.0]]])  # 1 instance x 2 points (x, y)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    maps = torch.stack([-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5**2) for x, y in true[0]])[None]
    crops = torch.tensor([[100.0, 200.0, 164.0, 264.0]])  # 2 input px per heatmap px
    pts, conf = decode_heatmaps(maps, crops)
    expected = heatmap_to_image(true, crops, 32)
    assert torch.allclose(pts, expected, atol=0.05 * 2)
    assert conf.shape == (1, 2)
    assert torch.allclose(image_to_heatmap(expected, crops, 32), true, atol=1e-5)


def test_centernet_decoding():
    heat = torch.full((1, 1, 8, 8), -10.0)
    heat[0, 0, 3, 5] = 5.0
    size = torch.zeros(1, 2, 8, 8)
    size[0, :, 3, 5] = torch.tensor([math.log(2.0), math.log(4.0)])  # 2x4 cells
    offset = torch.zeros(1, 2, 8, 8)  # sigmoid(0) = half a cell
    (boxes, scores), = decode_centernet({"heatmap": heat, "size": size, "offset": offset}, stride=4)
    # centre (5.5, 3.5) cells = (22, 14) px; 8x16 px
    assert torch.allclose(boxes[0], torch.tensor([18.0, 6.0, 26.0, 22.0]))
    assert scores[0] > 0.99


def test_centernet_ensemble_fuses_maps_and_loads_strictly():
    torch.manual_seed(0)
    single = build_detector("lite0_centernet", {"fpn": 16, "stride": 8}).eval()
    ens = build_detector("lite0_centernet", {"fpn": 16, "stride": 8, "members": 2}).eval()
    # two copies of one member fuse to that member (probabilities averaged, then back to logits)
    load_strict(ens, {f"members.{i}.{k}": v for i in range(2) for k, v in single.state_dict().items()}, "two copies")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = single(x), ens(x)
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
        other = build_detector("lite0_centernet", {"fpn": 16, "stride": 8}).eval()
        ens.members[1].load_state_dict(other.state_dict())
        fused, o = ens(x), other(x)
    mean_p = (torch.sigmoid(a["heatmap"]) + torch.sigmoid(o["heatmap"])) / 2
    assert torch.allclose(torch.sigmoid(fused["heatmap"]), mean_p, atol=1e-5)
    assert torch.allclose(fused["size"], (a["size"] + o["size"]) / 2, atol=1e-6)
    with pytest.raises(WeightsError):  # a single detector's keys do not load into an ensemble
        load_strict(ens, single.state_dict(), "one member")


def test_strict_loading_names_the_keys():
    sam = build_sam("tiny")
    state = sam.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["prompt_encoder.extra"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="missing: mask_decoder.iou_token.weight.*unexpected: prompt_encoder.extra"):
        load_strict(build_sam("tiny"), state, "x.safetensors")


def test_lite0_key_mapping_is_strict():
    import timm

    from cp_deploy.models.efficientnet import LITE0_SHA256, lite0_checkpoint, lite0_imagenet, map_lite0_state
    from cp_deploy.models.weights import read_state_dict

    package = read_state_dict(lite0_checkpoint(), LITE0_SHA256)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_lite0_state(package, target)
    assert len(mapped) == len(target) == 296
    assert torch.equal(mapped["conv_stem.weight"], package["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.weight"], package["_fc.weight"])
    net = lite0_imagenet(True)
    assert torch.equal(net.state_dict()["bn2.running_var"], package["_bn1.running_var"])
    swapped = dict(package)
    keys = list(swapped)
    reordered = {k: swapped[k] for k in [keys[1], keys[0], *keys[2:]]}
    with pytest.raises(WeightsError, match="mapping broke"):
        map_lite0_state(reordered, target)


def test_sdpa_attention_equals_segment_anything_attention():
    """Same parameters and state-dict keys; the rel-pos bias (made non-zero) as SDPA's mask."""
    import copy

    from cp_deploy.models.attention import use_fast_attention
    from cp_deploy.models.sam import build_sam

    torch.manual_seed(0)
    enc = build_sam("tiny").image_encoder
    for m in enc.modules():
        if hasattr(m, "rel_pos_h"):
            torch.nn.init.normal_(m.rel_pos_h, std=0.5)
            torch.nn.init.normal_(m.rel_pos_w, std=0.5)
    fast = copy.deepcopy(enc)
    assert use_fast_attention(fast, "sdpa") == 2
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), enc(x), atol=1e-5, rtol=1e-5)
    assert fast.state_dict().keys() == enc.state_dict().keys()


def test_bf16_engine_agrees_with_fp32(tiny_bundle):
    """Autocast bf16 (LayerNorm and softmax kept fp32 by autocast) against fp32, on the CPU."""
    import numpy as np

    from cp_deploy.engines.torch import TorchEngine
    from cp_deploy.pipeline import CurriculumPipeline
    from export.parity import synthetic_images

    images = synthetic_images(3, seed=4)
    ref = CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle)).predict(images)
    got = CurriculumPipeline(tiny_bundle, TorchEngine(tiny_bundle, precision="bf16")).predict(images)
    for r, g in zip(ref, got):
        if len(r.boxes) and len(g.boxes) == len(r.boxes):
            scale = max(1.0, float(np.abs(r.low_res_logits).max()))
            assert np.abs(g.low_res_logits - r.low_res_logits).max() < 0.1 * scale
        assert (g.mask == r.mask).mean() > 0.97


def test_every_sam_arch_a_bundle_may_name_is_built():
    from cp_deploy.bundle import SAM_ARCHS
    from cp_deploy.models import sam

    assert set(SAM_ARCHS) == {*sam._VIT, "lite_medsam"}


def test_encoder_rewrites_equal_tinyvits_own():
    """LiteMedSAM's encoder as models/sam.py rewrites it for export (q, k and v projected apart,
    4-D layout permutes in the blocks and patch merging) gives the same embeddings as TinyViT's
    own modules on the same shipped weights, and keeps the state dict."""
    import types

    from cp_deploy.models.sam import lite_medsam_checkpoint, load_sam

    ours = load_sam("lite_medsam", None).image_encoder.eval()
    assert lite_medsam_checkpoint()
    theirs = copy.deepcopy(ours)
    restored = set()
    for m in theirs.modules():
        if type(m).__name__ in ("Attention", "TinyViTBlock", "PatchMerging"):
            m.forward = types.MethodType(type(m).forward, m)  # the class's own, unpatched
            restored.add(type(m).__name__)
    assert restored == {"Attention", "TinyViTBlock", "PatchMerging"}
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == (2, 256, 64, 64)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
