"""``grounding_dino``: transformers' ``GroundingDinoForObjectDetection`` behind the detector interface.

The bundle's text prompt is fixed, so it is tokenized and run through the BERT text backbone once,
when the detector is built (and again whenever weights are loaded into it); the features are a
buffer that stands in for the backbone, so every forward pass, and the exported ONNX graph, sees
them as constants. Weights come from a local directory (``from_pretrained(local_files_only=True)``)
or, for tests, are random from a config dict: nothing is ever downloaded.

One patch of transformers: the text masks helper
(``generate_masks_with_special_tokens_and_transfer_map``) uses ``torch.isin`` and ``cummax``,
which the ONNX exporter cannot convert, and ``torch.eye`` on bools, which ONNX Runtime cannot run.
:func:`text_masks` computes the same masks (tested equal) with comparisons only; it is installed
in the transformers module when this module builds a model. transformers (the ``gdino`` extra) is
imported only when a model is built, so the family registers without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cp_deploy.errors import BundleError, MissingExtraError
from cp_deploy.files import atomic_write_bytes
from cp_deploy.models.registry import BuildContext, DetectorFamily, register

GDINO_EXTRA = "pip install 'curriculum-prompting[gdino]'"


def _modeling():
    # Never reach a hub: weights and tokenizer come from local paths only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers.models.grounding_dino import modeling_grounding_dino
    except ImportError as e:
        raise MissingExtraError(f"the grounding_dino detector needs transformers: {GDINO_EXTRA}") from e
    if modeling_grounding_dino.generate_masks_with_special_tokens_and_transfer_map is not text_masks:
        modeling_grounding_dino._original_text_masks = (
            modeling_grounding_dino.generate_masks_with_special_tokens_and_transfer_map)
        modeling_grounding_dino.generate_masks_with_special_tokens_and_transfer_map = text_masks
    return transformers, modeling_grounding_dino


def text_masks(input_ids: torch.Tensor, special_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' per-phrase text self-attention mask and position ids, without ``isin``,
    ``cummax`` or a boolean ``eye`` (see the module docstring). (B, N) ids -> (B, N, N), (B, N)."""
    _, seq_len = input_ids.shape
    device = input_ids.device
    special = (input_ids[..., None] == special_tokens.to(device)).any(-1)
    idx = torch.arange(seq_len, device=device)
    before = special[:, None, :] & (idx[None, :, None] > idx[None, None, :])
    prev_special = torch.where(before, idx[None, None, :], torch.full((), -1, device=device)).amax(-1)
    after = special[:, None, :] & (idx[None, :, None] <= idx[None, None, :])
    next_special = torch.where(after, idx[None, None, :], torch.full((), seq_len, device=device)).amin(-1)
    # A block closed by the first or last token (or by none) is not a phrase.
    valid = (next_special != 0) & (next_special != seq_len - 1) & (next_special != seq_len)
    mask = (next_special[:, :, None] == next_special[:, None, :]) & valid[:, None, :]
    mask = mask | (idx[:, None] == idx[None, :])[None]
    position_ids = torch.where(valid, idx[None] - prev_special - 1, torch.zeros_like(prev_special))
    return mask, position_ids.clamp(min=0).long()


def load_tokenizer(path: str | Path):
    """BERT WordPiece tokenizer from a ``vocab.txt`` file or a local tokenizer directory."""
    transformers, _ = _modeling()
    path = Path(path)
    if path.is_dir():
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not path.is_file():
        raise BundleError(f"grounding_dino tokenizer not found: {path} (a vocab.txt or a tokenizer directory)")
    vocab = {w: i for i, w in enumerate(path.read_text(encoding="utf-8").splitlines())}
    return transformers.BertTokenizerFast(vocab=vocab)


SYNTHETIC_WORDS = ("polyp", "lesion", "tumor", "nodule", "a", "the", "of", "in", "colon", "##s")


def write_synthetic_vocab(path: str | Path, size: int, words: tuple[str, ...] = SYNTHETIC_WORDS) -> Path:
    """A WordPiece ``vocab.txt`` for random-weight models (tests, speed checks): [CLS], [SEP], '.'
    and '?' at the ids Grounding DINO's text masks hard-code (101, 102, 1012, 1029, as in
    bert-base-uncased), then ``words``, and fillers up to ``size`` entries."""
    if size < 1030:
        raise ValueError("the vocab needs at least 1030 entries (Grounding DINO's special ids reach 1029)")
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"[filler{i}]" for i in range(len(vocab), 1012)] + ["."]
    vocab += [f"[filler{i}]" for i in range(len(vocab), 1029)] + ["?"]
    vocab += [f"[filler{i}]" for i in range(len(vocab), size)]
    path = Path(path)
    atomic_write_bytes(path, ("\n".join(vocab) + "\n").encode("utf-8"))
    return path


def caption(text: str) -> str:
    """The prompt as Grounding DINO was trained on it: lower case, ending in a full stop."""
    text = text.strip().lower()
    return text if text.endswith(".") else text + "."


class _EncodedText(nn.Module):
    """Stands in for the BERT text backbone: returns the prompt's features encoded once."""

    def __init__(self, bert: nn.Module, tokens: int) -> None:
        super().__init__()
        self.bert = bert
        self.register_buffer("features", torch.zeros(1, tokens, bert.config.hidden_size), persistent=False)
        self.encodes = 0

    def forward(self, input_ids: torch.Tensor, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.features.expand(input_ids.shape[0], -1, -1))


class GroundingDinoDetector(nn.Module):
    """Grounding DINO with a fixed text prompt. ``forward(images)`` -> ``logits`` (B, queries,
    phrase tokens: the query-token similarities of the prompt's own words, without [CLS], [SEP]
    and the full stop) and ``boxes`` (B, queries, 4: xyxy in input pixels)."""

    def __init__(self, text: str, tokenizer: str | Path | None = None, pretrained: str | Path | None = None,
                 model_config: dict | None = None) -> None:
        super().__init__()
        transformers, _ = _modeling()
        if pretrained is not None:
            if not Path(pretrained).is_dir():
                raise BundleError(f"grounding_dino pretrained directory not found: {pretrained}")
            model = transformers.GroundingDinoForObjectDetection.from_pretrained(str(pretrained),
                                                                                 local_files_only=True)
        elif model_config is not None:
            model = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig(**model_config))
        else:
            raise ValueError("grounding_dino needs 'pretrained' (a local weights directory) or 'model_config'")
        tok = load_tokenizer(tokenizer if tokenizer is not None else pretrained)
        self.text = caption(text)
        enc = tok(self.text, return_tensors="pt")
        limit = model.config.max_text_len
        if enc["input_ids"].shape[1] > limit:
            raise ValueError(f"prompt.text {text!r} is {enc['input_ids'].shape[1]} tokens long; this Grounding "
                              f"DINO takes at most max_text_len = {limit} tokens: shorten the prompt")
        ids = enc["input_ids"]
        # [CLS], [SEP], '.' and '?' delimit phrases; a vocab without '?' maps it to [UNK], a word.
        delimiters = [i for i in tok.convert_tokens_to_ids([".", "?"]) if i != tok.unk_token_id]
        specials = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, *delimiters}
        phrase = [i for i, t in enumerate(ids[0].tolist()) if t not in specials]
        if not phrase:
            raise ValueError(f"prompt.text {text!r} has no words to ground")
        self.model = model
        self.register_buffer("input_ids", ids, persistent=False)
        self.register_buffer("attention_mask", enc["attention_mask"], persistent=False)
        self.register_buffer("token_type_ids", enc.get("token_type_ids", torch.zeros_like(ids)), persistent=False)
        self.register_buffer("phrase_index", torch.tensor(phrase), persistent=False)
        base = model.model
        base.text_backbone = _EncodedText(base.text_backbone, ids.shape[1])
        # The prompt is fixed, so fine-tuning never changes BERT: only what follows it.
        base.text_backbone.bert.requires_grad_(False)
        self.encode_text()
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.encode_text())

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def encode_text(self) -> None:
        """Run BERT on the prompt, exactly as ``GroundingDinoModel.forward`` would, and keep it."""
        cached = self.model.model.text_backbone
        masks, position_ids = text_masks(self.input_ids, self.model.model.special_tokens)
        was = cached.bert.training
        cached.bert.eval()
        out = cached.bert(self.input_ids, masks[:, None], self.token_type_ids, position_ids, return_dict=True)
        cached.bert.train(was)
        cached.features = out.last_hidden_state.detach().to(cached.features.dtype)
        cached.encodes += 1

    def _run(self, images: torch.Tensor, labels: list[dict] | None = None):
        b = images.shape[0]
        return self.model(pixel_values=images, input_ids=self.input_ids.expand(b, -1),
                          attention_mask=self.attention_mask.expand(b, -1),
                          token_type_ids=self.token_type_ids.expand(b, -1), labels=labels, return_dict=True)

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Raw outputs; with ``boxes`` (training, see :meth:`loss`) ``{"loss": ...}`` instead, so
        that DistributedDataParallel sees the loss computed inside ``forward``."""
        if boxes is not None:
            return {"loss": self.loss(images, boxes)}
        out = self._run(images)
        h, w = images.shape[-2:]
        cx, cy, bw, bh = out.pred_boxes.unbind(-1)
        boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        return {"logits": out.logits.index_select(-1, self.phrase_index), "boxes": boxes}

    def loss(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """transformers' own set loss (Hungarian matching, focal class + L1 + GIoU) against
        per-image Kx4 xyxy boxes in input pixels; every box is the prompt's one class."""
        h, w = images.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=images.dtype, device=images.device)
        labels = []
        for b in boxes:
            b = b.to(images.device, images.dtype) / scale
            cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                  b[:, 3] - b[:, 1]], -1)
            labels.append({"class_labels": torch.zeros(len(b), dtype=torch.long, device=images.device),
                           "boxes": cxcywh})
        return self._run(images, labels).loss


def decode_grounding_dino(raw: dict[str, torch.Tensor], max_candidates: int = 50
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw outputs -> per image (Kx4 xyxy boxes in input pixels, K scores), best first. A query's
    score is its best phrase token's sigmoid similarity, as in Grounding DINO's own inference."""
    scores = torch.sigmoid(raw["logits"].float()).amax(-1)
    k = min(max_candidates, scores.shape[1])
    top, idx = scores.topk(k, dim=1)
    return [(raw["boxes"][i].float()[idx[i]], top[i]) for i in range(len(scores))]


def default_config(pretrained: str | Path | None = None, tokenizer: str | Path | None = None,
                   model_config: dict | None = None, **_) -> dict:
    """A local weights directory (``pretrained``, which holds its tokenizer unless ``tokenizer``
    names one), or a random model of ``model_config`` (a ``GroundingDinoConfig`` as a dict)."""
    cfg = {"pretrained": pretrained, "tokenizer": tokenizer, "model_config": model_config}
    return {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items() if v is not None}


def build(config: dict, ctx: BuildContext) -> nn.Module:
    cfg = dict(config)
    for key in ("tokenizer", "pretrained"):
        if cfg.get(key) is not None and ctx.root is not None:
            cfg[key] = Path(ctx.root) / cfg[key]  # an absolute path stays as it is
    return GroundingDinoDetector(ctx.prompt_text, **cfg)


def set_loss(net: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """transformers' set loss, computed inside ``forward`` (see :meth:`GroundingDinoDetector.forward`)."""
    return net(images, boxes)["loss"]


FAMILY = register(DetectorFamily(
    name="grounding_dino",
    reads="image",
    output_names=("logits", "boxes"),
    build=build,
    decode=lambda raw, config: decode_grounding_dino(raw),
    loss=set_loss,
    default_config=default_config,
    text_prompted=True,
))
