"""Model families: one spec per detector or keypoint architecture, looked up by a bundle's ``arch``.

A family knows how to build its net from a bundle config, what the net reads (the preprocessed
image or the SAM embedding), for detectors its exported outputs, decode and training loss, and how
its members ensemble. Deploy, export and training look families up here and never switch on an
arch name. The built-in families live in :mod:`cp_deploy.models.families` and register themselves
when that package is imported, which the lookups below do on first use; a family defined anywhere
else registers by calling :func:`register` when its module is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch
    from torch import nn

READS = ("image", "embedding")
BUILTIN_FAMILIES = "cp_deploy.models.families"


@dataclass(frozen=True)
class BuildContext:
    """What a family may need beyond its config."""

    prompt_text: str = "polyp"
    root: Path | None = None  # the bundle folder, against which relative paths in a config resolve


@dataclass(frozen=True)
class DetectorFamily:
    """A detector architecture. ``build(config, ctx)`` gives one net whose ``forward`` maps a batch
    of what it ``reads`` to a dict of raw tensors named by ``output_names`` (the exported graph's
    outputs, in order); ``decode(raw, config)`` turns them into per-image (Kx4 xyxy boxes in the
    detector input's pixels, K scores), best first, outside the net so that every engine shares it.
    ``loss(net, inputs, boxes, **options)`` is the training loss against per-image Kx4 xyxy boxes in
    input pixels (options are family-specific, e.g. CenterNet's ``giou`` weight).
    ``default_config(**kw)`` takes keywords such as ``channels``, ``stride`` and ``image_size`` and
    ignores those it does not use, so that callers can pass one set to any family."""

    name: str
    reads: str
    output_names: tuple[str, ...]
    build: Callable[[dict, BuildContext], nn.Module]
    decode: Callable[[dict[str, torch.Tensor], dict], list[tuple[torch.Tensor, torch.Tensor]]]
    loss: Callable[..., torch.Tensor]
    default_config: Callable[..., dict]
    ensemble: Callable[[list[nn.Module]], nn.Module] | None = None  # members -> one net, same outputs
    # (net, flips) -> one net averaging its outputs over the input and its flipped views (the
    # config's ``flips``: "h", "v", "hv"), same outputs
    flip_views: Callable[[nn.Module, tuple[str, ...]], nn.Module] | None = None
    text_prompted: bool = False  # its graph bakes in prompt.text
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeypointFamily:
    """A top-down keypoint architecture: ``build(config, ctx)`` gives a net with
    ``forward(features, rois) -> Nx8xHxW`` heatmap logits, decoded by
    :func:`cp_deploy.models.keypoints.decode_heatmaps`."""

    name: str
    reads: str
    build: Callable[[dict, BuildContext], nn.Module]
    default_config: Callable[..., dict]
    ensemble: Callable[[list[nn.Module]], nn.Module] | None = None
    aliases: tuple[str, ...] = ()


Family = TypeVar("Family", DetectorFamily, KeypointFamily)

_DETECTORS: dict[str, DetectorFamily] = {}
_KEYPOINTS: dict[str, KeypointFamily] = {}
_ALIASES: dict[type, dict[str, str]] = {DetectorFamily: {}, KeypointFamily: {}}


def register(family: Family) -> Family:
    """Add ``family`` (a :class:`DetectorFamily` or :class:`KeypointFamily`) under its name and
    aliases; registering the same name again replaces it (a reloaded module)."""
    if family.reads not in READS:
        raise ValueError(f"family {family.name!r}: reads must be one of {', '.join(READS)}, got {family.reads!r}")
    table = _DETECTORS if isinstance(family, DetectorFamily) else _KEYPOINTS
    aliases = _ALIASES[type(family)]
    for name in (family.name, *family.aliases):
        owner = aliases.get(name) or (name if name in table else None)
        if owner not in (None, family.name):
            raise ValueError(f"family name {name!r} is taken by {owner!r}")
    table[family.name] = family
    aliases.update({a: family.name for a in family.aliases})
    return family


def _load_builtin() -> None:
    # Imported by name, not at the top: the families import this module to register themselves,
    # and consumers that only read a family's fields (the manifest check) stay free of torch.
    importlib.import_module(BUILTIN_FAMILIES)


def _lookup(table: dict[str, Family], kind: type, name: str, what: str) -> Family:
    _load_builtin()
    family = table.get(_ALIASES[kind].get(name, name))
    if family is None:
        aliases = [f"{a} (= {n})" for a, n in _ALIASES[kind].items()]
        raise ValueError(f"unknown {what} arch {name!r}; known: {', '.join([*table, *aliases])}")
    return family


def detector_family(name: str) -> DetectorFamily:
    """The detector family called ``name`` (or one of its aliases); ValueError listing the known."""
    return _lookup(_DETECTORS, DetectorFamily, name, "detector")


def keypoint_family(name: str) -> KeypointFamily:
    """The keypoint family called ``name`` (or one of its aliases); ValueError listing the known."""
    return _lookup(_KEYPOINTS, KeypointFamily, name, "keypoint")


def detector_families() -> dict[str, DetectorFamily]:
    """Every registered detector family by name, in registration order."""
    _load_builtin()
    return dict(_DETECTORS)


def keypoint_families() -> dict[str, KeypointFamily]:
    """Every registered keypoint family by name, in registration order."""
    _load_builtin()
    return dict(_KEYPOINTS)


def from_config(net: Callable[..., nn.Module]) -> Callable[[dict, BuildContext], nn.Module]:
    """A family's ``build`` for a net whose constructor takes the config's keys and no context."""
    return lambda config, ctx: net(**config)


def _build(family: DetectorFamily | KeypointFamily, config: dict, ctx: BuildContext) -> nn.Module:
    cfg = dict(config)
    cfg.pop("flips", None)  # test-time views wrap the net once its weights are in: with_flips
    members = int(cfg.pop("members", 1))  # > 1: an ensemble, its weights prefixed members.I.
    if members <= 1:
        return family.build(cfg, ctx)
    if family.ensemble is None:
        raise ValueError(f"{family.name} has no ensembles; remove 'members' ({members}) from its config")
    return family.ensemble([family.build(cfg, ctx) for _ in range(members)])


def build_detector(arch: str, config: dict, ctx: BuildContext = BuildContext()) -> nn.Module:
    """A detector from its bundle entry (``arch`` and ``config``; ``members`` > 1 in the config
    builds the family's ensemble)."""
    return _build(detector_family(arch), config, ctx)


def with_flips(arch: str, net: nn.Module, config: dict) -> nn.Module:
    """``net`` (its weights loaded) averaged over the test-time flips of the config's ``flips``
    (the net itself where there are none); a family without flip views is a ValueError."""
    flips = tuple(config.get("flips") or ())
    if not flips:
        return net
    family = detector_family(arch)
    if family.flip_views is None:
        raise ValueError(f"{family.name} has no test-time flips; remove 'flips' from its config")
    return family.flip_views(net, flips)


def build_keypoint_net(arch: str, config: dict, ctx: BuildContext = BuildContext()) -> nn.Module:
    """A keypoint net from its bundle entry (``arch`` and ``config``; ``members`` > 1 in the config
    builds the family's ensemble)."""
    return _build(keypoint_family(arch), config, ctx)


def decode_detections(arch: str, raw: dict[str, torch.Tensor], config: dict
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The decode of detector ``arch`` (with its bundle ``config``): raw outputs -> per image
    (Kx4 xyxy boxes in the detector's input pixels, K scores), best first."""
    return detector_family(arch).decode(raw, config)
