"""SAM ViT attention through fused kernels, sharing the original parameters.

segment-anything's ``Attention`` materialises ``q @ k^T``, adds the decomposed relative-position
bias and runs softmax as three separate steps (kernel ``"sam"`` here). Two kernels do the same
arithmetic fused:

* ``"sdpa"``: the bias materialised as ``attn_mask`` of ``scaled_dot_product_attention`` (about
  20% faster for ViT-H in bf16 on an H200; the BxnxLxL mask costs 512 MiB per image in bf16 for
  ViT-H's global blocks);
* ``"flex"``: ``flex_attention`` with a ``score_mod`` that adds the two bias terms, gathered per
  score, so no LxL tensor exists. On CUDA it runs compiled (its fused kernel); on the CPU
  uncompiled flex materialises the scores, which is how the tests check its arithmetic (inductor's
  CPU template cannot lower it inside a compiled encoder: the bias terms are computed in the graph).

:func:`use_fast_attention` swaps the class of each module in place: parameters, state-dict keys
and official checkpoints stay as they are. With ``trim_windows`` the windowed blocks also stop
computing ``qkv`` and ``proj`` for their padding tokens (SAM pads 64x64 tokens to 70x70 for
14x14 windows, 20% more tokens): a padding token's ``qkv`` is the layer's bias (zeros through a
linear layer), so it is filled in instead, and ``proj`` runs after the padding is cropped. The
padding tokens stay keys of their windows, as in SAM, so the result is the same arithmetic.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos, window_unpartition
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

KERNELS = ("sam", "sdpa", "flex")


def flex_rel_pos(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                 w: int, scale: float) -> torch.Tensor:
    """``flex_attention`` with SAM's bias (:func:`rel_pos_terms`) added score by score."""

    def score_mod(score, b, head, q_idx, kv_idx):
        return score + rel_h[b, head, q_idx, kv_idx // w] + rel_w[b, head, q_idx, kv_idx % w]

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


@cache
def _compiled_flex_rel_pos():
    # flex_attention is only fused when compiled. The closure is made inside the compiled function,
    # so a new score_mod per call does not recompile; one graph per shape (windowed, global).
    return torch.compile(flex_rel_pos, dynamic=False)


def rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int, w: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed bias terms for queries ``q`` (BxnxLxc, L = h*w): (BxnxLxh, BxnxLxw),
    ``bias[i, j] = rel_h[i, j // w] + rel_w[i, j % w]`` (``add_decomposed_rel_pos``'s einsums)."""
    b, n = q.shape[:2]
    r_q = q.reshape(b, n, h, w, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, rel_pos_w))
    return rel_h.reshape(b, n, h * w, h), rel_w.reshape(b, n, h * w, w)


class FastAttention(Attention):
    """:class:`Attention` with a selectable kernel (``self.kernel``, one of :data:`KERNELS`)."""

    kernel: str = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """BxHxWx3C ``qkv`` output -> BxHxWxC attention output, before ``proj``."""
        b, h, w, _ = qkv.shape
        n = self.num_heads
        q, k, v = qkv.reshape(b, h * w, 3, n, -1).permute(2, 0, 3, 1, 4).unbind(0)  # b,n,hw,c
        if self.kernel == "sam":
            out = self._sam(q, k, v, h, w)
        elif self.kernel == "flex":
            out = self._flex(q, k, v, h, w)
        else:
            bias = None
            if self.use_rel_pos:
                rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, h, w)
                bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, h * w, h * w).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.view(b, n, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)

    def _sam(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # segment-anything's own three steps, for comparison and the CPU.
        b, n, L, _ = q.shape
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, h, w)
            attn = (attn.view(b, n, L, h, w) + rel_h[..., :, None] + rel_w[..., None, :]).view(b, n, L, L)
        return attn.softmax(dim=-1) @ v

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if not self.use_rel_pos:
            return flex_attention(q, k, v, scale=self.scale)
        rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, h, w)
        # Inside a compiled encoder inductor fuses it anyway; eager on CUDA, the compiled function.
        fused = q.is_cuda and not torch.compiler.is_compiling()
        return (_compiled_flex_rel_pos() if fused else flex_rel_pos)(q, k, v, rel_h, rel_w, w, self.scale)


class TrimmedWindowBlock(Block):
    """A windowed :class:`Block` that runs ``qkv`` and ``proj`` on its real tokens only (see the
    module docstring); its ``attn`` is a :class:`FastAttention`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window_size == 0:
            return super().forward(x)
        shortcut = x
        x = self.norm1(x)
        _, h, w, _ = x.shape
        windows, pad_hw = _partition_with_bias(self.attn.qkv(x), self.window_size, self.attn.qkv.bias)
        x = window_unpartition(self.attn.attend(windows), self.window_size, pad_hw, (h, w))
        x = shortcut + self.attn.proj(x)
        return x + self.mlp(self.norm2(x))


def _partition_with_bias(qkv: torch.Tensor, ws: int, bias: torch.Tensor | None
                         ) -> tuple[torch.Tensor, tuple[int, int]]:
    """``window_partition`` of BxHxWx3C ``qkv`` outputs whose padding tokens hold what ``qkv`` gives
    a zero token (its bias), as if the zero-padded input had gone through the layer."""
    b, h, w, c = qkv.shape
    hp, wp = h + (ws - h % ws) % ws, w + (ws - w % ws) % ws
    if (hp, wp) != (h, w):
        fill = qkv.new_zeros(()) if bias is None else bias.to(qkv.dtype)
        padded = fill.expand(b, hp, wp, c).clone()
        padded[:, :h, :w] = qkv
        qkv = padded
    x = qkv.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
    return x, (hp, wp)


def use_fast_attention(encoder: nn.Module, kernel: str = "sdpa", trim_windows: bool = False) -> int:
    """Switch every segment-anything ``Attention`` in ``encoder`` to :class:`FastAttention` with
    ``kernel`` (and, with ``trim_windows``, every ``Block`` to :class:`TrimmedWindowBlock`);
    returns how many attention modules were switched (0 for encoders without them, such as
    LiteMedSAM's TinyViT). Calling it again changes the kernel and the trimming."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    n = 0
    for m in encoder.modules():
        if isinstance(m, Attention):
            m.__class__ = FastAttention
            m.kernel = kernel
            n += 1
        elif isinstance(m, Block):
            m.__class__ = TrimmedWindowBlock if trim_windows else Block
    return n
