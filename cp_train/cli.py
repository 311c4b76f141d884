"""``cp-train detector|keypoints|sam-box|sam-refine|all``: fine-tune a bundle's models."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from cp_deploy.bundle import BUNDLE_FILE, EDGE_LABELS, BundleError, StageSpec, default_bundle_path, load_bundle
from cp_deploy.io import InputError
from cp_deploy.models.build import (
    build_models,
    embedding_keypoint_config,
    hrnet_keypoint_config,
    keypoint_entry,
    stage_entry,
)
from cp_deploy.models.keypoints import build_keypoint_net, keypoint_reads
from cp_deploy.models.weights import WeightsError
from cp_deploy.pipeline import CurriculumPipeline, PipelineOptions
from cp_deploy.preprocess import PreprocessConfig
from cp_train import distributed
from cp_train.bundle_io import derive_bundle
from cp_train.data import (
    DEFAULT_CACHE_DIR,
    DataError,
    EmbeddingCache,
    carve_validation,
    check_dataset,
    load_samples,
    read_split,
)
from cp_train.evaluate import evaluate, evaluate_boxes
from cp_train.trainers.loop import CheckpointError, LoopConfig, fit

# sam-refine trains on GT edge points, so it comes before the keypoint net, whose validation
# mDice then runs through the trained refine head.
STAGES = ("detector", "sam-box", "sam-refine", "keypoints")


class UsageError(RuntimeError):
    """Flags that do not go together, or a path that cannot be used; the message says the fix."""


# Mistakes in what the user passed: one line and exit 2, never a traceback.
USER_ERRORS = (UsageError, DataError, CheckpointError, BundleError, WeightsError, InputError)


def train_stage(stage: str, args: argparse.Namespace, base_dir: Path) -> Path:
    """Train one stage on top of the bundle in ``base_dir`` and write ``args.out``."""
    t0 = time.perf_counter()
    base = load_bundle(base_dir)
    names = read_split(args.split)
    val_seed = args.seed if args.val_seed is None else args.val_seed
    train_names, val_names = carve_validation(names, args.val_fraction, val_seed)
    if args.max_images:
        train_names = train_names[: args.max_images]
    cfg = LoopConfig(epochs=args.epochs or DEFAULT_EPOCHS[stage], batch_size=args.batch_size or DEFAULT_BATCH[stage],
                     lr=args.lr or DEFAULT_LR[stage], seed=args.seed, resume=args.resume, ema=args.ema)
    val = load_samples(args.data, val_names, progress=not args.no_progress)
    models = cache = val_emb = None
    if args.val_metric == "sam":  # box validation of a detector needs no SAM at all
        models = build_models(base)
        cache = EmbeddingCache(args.cache_dir, base, models.image_encoder)
        with torch.no_grad():
            val_emb = cache.fill(val, progress=not args.no_progress)
    work = Path(args.work_dir or f"{args.out}-work")
    edge_label = EDGE_LABELS[base.prompt.edge_label]

    prompt = None
    if stage == "detector":
        state, entry, prompt = _train_detector(args, base, models, train_names, val, val_emb, cache, cfg, work)
        replace = {"detector": (entry, state)}
    else:
        from cp_train.trainers.sam import instance_targets, make_sam_epoch

        train = load_samples(args.data, train_names, progress=not args.no_progress)
        emb = None
        if not (stage == "keypoints" and keypoint_reads(args.keypoint_arch or base.keypoints.arch) == "image"):
            with torch.no_grad():  # a keypoint net on image crops needs no training embeddings
                emb = cache.fill(train, progress=not args.no_progress)
        low = models.box.mask_input_size[0]
        targets = instance_targets(train, base.preprocess.image_size, low)
        if stage in ("sam-box", "sam-refine"):
            head_name = "box" if stage == "sam-box" else "refine"
            head = getattr(models, head_name)
            opts = PipelineOptions(prompts="box") if head_name == "box" else PipelineOptions(prompts="curriculum")

            def validate(model):
                setattr(models, head_name, model)
                gt_points = head_name == "refine" and args.refine_points == "gt"
                return evaluate(base, models, val, val_emb, opts, gt_boxes=True, gt_points=gt_points)

            source = None
            if head_name == "refine" and args.refine_train_points == "predicted":
                from cp_deploy.engines.torch import TorchEngine
                from cp_train.trainers.sam import predicted_points

                pipe = CurriculumPipeline(base, TorchEngine(base, models=models), PipelineOptions(prompts="curriculum"))
                source = predicted_points(pipe, train, targets, emb)
            fn = make_sam_epoch(head_name, targets, emb, cfg.batch_size, args.seed, box_head=models.box.eval(),
                                edge_label=edge_label, point_jitter=args.point_jitter, point_source=source)
            state = fit(stage, head, list(head.parameters()), fn, validate, cfg, work)
            replace = {head_name: (None, state)}
        else:
            state, entry = _train_keypoints(args, base, models, train, targets, emb, val, val_emb, cfg, work)
            replace = {"keypoints": (entry, state)}
    meta = {f"trained_{stage}": {"data": str(Path(args.data).name), "split": Path(args.split).name,
                                  "train_images": len(train_names), "val_images": len(val_names),
                                  "epochs": cfg.epochs, "seconds": round(time.perf_counter() - t0)}}
    if distributed.is_main():
        derive_bundle(base, args.out, replace, metadata={"trained": True, **meta}, prompt=prompt)
        print(f"[{stage}] wrote bundle {args.out} in {time.perf_counter() - t0:.0f} s")
    distributed.barrier()  # the next stage, on every rank, starts from this bundle
    return Path(args.out)


def _train_detector(args, base, models, train_names, val, val_emb, cache, cfg, work):
    """Grounding DINO or the EfficientNet-Lite0 CenterNet on the image, or the CenterNet head on the
    embedding."""
    import copy

    from cp_train.trainers.detector import box_batches, embedding_batches, image_batches, make_train_epoch, set_loss

    spec = copy.copy(base)
    frozen: list = []
    loss = None
    if args.detector_arch == "grounding_dino":
        net, det_cfg, pre = _grounding_dino(args, base, models)
        train = load_samples(args.data, train_names, max_side=pre.image_size, progress=not args.no_progress)
        batch_fn = box_batches(train, pre)
        loss = set_loss
        entry = stage_entry("grounding_dino", det_cfg, "image", pre.to_dict())
        spec.detector = StageSpec("grounding_dino", det_cfg, "image", None, None, pre)
    elif args.detector_arch == "lite0_centernet":
        from cp_deploy.models.efficientnet import Lite0CenterNet

        det_cfg = {"fpn": 64, "stride": 8}
        pre = PreprocessConfig(image_size=args.detector_size, normalize="meanstd")
        net = Lite0CenterNet(**det_cfg, pretrained=True)
        # By default the stem and first two stages stay frozen: generic ImageNet edges and
        # textures, and half the backward pass on a CPU.
        frozen = [net.backbone.conv_stem, net.backbone.bn1, *net.backbone.blocks[: args.detector_freeze]
                  ] if args.detector_freeze else []
        for m in frozen:
            m.requires_grad_(False)
        train = load_samples(args.data, train_names, max_side=args.detector_size, progress=not args.no_progress)
        batch_fn = image_batches(train, pre, det_cfg["stride"], workers=args.workers)
        entry = stage_entry("lite0_centernet", det_cfg, "image", pre.to_dict())
        spec.detector = StageSpec("lite0_centernet", det_cfg, "image", None, None, pre)
    else:
        from cp_deploy.models.detector import EmbeddingCenterNet

        channels, side = val_emb.shape[1], val_emb.shape[-1]
        det_cfg = {"in_channels": channels, "hidden": 64, "stride": base.preprocess.image_size // side}
        net = EmbeddingCenterNet(**det_cfg)
        train = load_samples(args.data, train_names, progress=not args.no_progress)
        with torch.no_grad():
            emb = cache.fill(train, progress=not args.no_progress)
        batch_fn = embedding_batches(train, emb, base.preprocess)
        entry = stage_entry("embedding_centernet", det_cfg, "embedding")
        spec.detector = StageSpec("embedding_centernet", det_cfg, "embedding", None, None, None)

    device = torch.device(args.device)
    net.to(device)

    def validate(model):
        if args.val_metric == "boxes":
            return evaluate_boxes(spec, model, val, device)
        models.detector = model
        return evaluate(spec, models, val, val_emb, PipelineOptions(prompts="box"), device=device)

    epoch_fn = make_train_epoch(len(train), batch_fn, cfg.batch_size, args.seed, loss, device, args.giou)

    def train_epoch(model, opt, epoch):
        for m in frozen:
            m.eval()  # keep ImageNet BatchNorm statistics in the frozen stages
        return epoch_fn(model, opt, epoch)

    params = [p for p in net.parameters() if p.requires_grad]
    state = fit("detector", net, params, train_epoch, validate, cfg, work)
    net.load_state_dict(state)
    tuned = tune_detection(spec, models, net, val, val_emb, work, device, args.val_metric)
    return {k: v.cpu() for k, v in state.items()}, entry, tuned


def _grounding_dino(args, base, models):
    """Grounding DINO to fine-tune: from the local weights directory ``--gdino-weights``, or the
    base bundle's own when it has one; returns (net, bundle config with absolute paths, preprocess)."""
    from cp_deploy.models.detector import build_detector

    if args.gdino_weights:
        det_cfg = {"pretrained": str(Path(args.gdino_weights).resolve())}
        pre = PreprocessConfig(image_size=args.detector_size, normalize="meanstd")
        return build_detector("grounding_dino", det_cfg, base.prompt.text), det_cfg, pre
    if base.detector.arch != "grounding_dino":
        raise UsageError(f"{base.root}: the --base bundle has no Grounding DINO; pass --gdino-weights DIR (a local "
                         "Grounding DINO directory, e.g. grounding-dino-tiny) or a --base bundle with one")
    det_cfg = dict(base.detector.config)
    for key in ("tokenizer", "pretrained"):
        if det_cfg.get(key) is not None:
            det_cfg[key] = str((base.root / det_cfg[key]).resolve())
    return models.detector, det_cfg, base.detector.preprocess or base.preprocess


def _train_keypoints(args, base, models, train, targets, emb, val, val_emb, cfg, work):
    """The keypoint net of ``--keypoint-arch``: the base bundle's own net fine-tuned when it has
    that arch and config, else a new one; ``hrnet`` trains on crops of the image."""
    import copy

    from cp_train.trainers.sam import image_reader, instance_targets, make_keypoint_epoch

    old = base.keypoints
    arch = args.keypoint_arch or old.arch
    if arch == "hrnet":
        kp_cfg = dict(old.config) if old.arch == "hrnet" else hrnet_keypoint_config()
        kp_cfg.pop("members", None)  # from an ensemble base, train one fresh member
        kp_cfg.update({k: v for k, v in (("backbone", args.keypoint_backbone), ("crop_size", args.keypoint_crop)) if v})
        size = args.keypoint_size or (old.preprocess or base.preprocess).image_size
    else:
        size = base.preprocess.image_size
        kp_cfg = old.config if old.arch == arch else embedding_keypoint_config(
            val_emb.shape[1], base.preprocess.image_size // val_emb.shape[-1])
    entry = keypoint_entry(arch, kp_cfg, size)
    spec = copy.copy(base)
    if old.arch == arch and old.config == kp_cfg and args.keypoint_init == "base":
        net = models.keypoints  # fine-tune the base's own weights
    else:
        net = build_keypoint_net(arch, kp_cfg)
    pre = PreprocessConfig.from_dict(entry["preprocess"]) if "preprocess" in entry else None
    spec.keypoints = StageSpec(arch, kp_cfg, entry["reads"], None, None, pre)
    if args.keypoint_backbone_checkpoint:
        from cp_deploy.models.hrnet import load_backbone

        load_backbone(net, args.keypoint_backbone_checkpoint)
    elif net is not models.keypoints and kp_cfg.get("backbone") == "efficientnet_lite0":
        from cp_deploy.models.efficientnet import load_lite0_features

        load_lite0_features(net.backbone)  # ImageNet weights from the pip package, as the detector's
    kp = spec.keypoints
    features = emb
    if kp.reads == "image":
        low = models.box.mask_input_size[0]
        targets = instance_targets(train, kp.preprocess.image_size, low)
        features = image_reader(train, kp.preprocess)

    def validate(model):
        models.keypoints = model
        return evaluate(spec, models, val, val_emb, PipelineOptions(prompts="curriculum"), gt_boxes=True)

    fn = make_keypoint_epoch(targets, features, cfg.batch_size, args.seed, float(kp.config["margin"]),
                             sigma=float(kp.config.get("sigma", 1.5)))
    return fit("keypoints", net, list(net.parameters()), fn, validate, cfg, work), entry


def tune_detection(spec, models, net, val, val_emb, work: Path, device: torch.device | str = "cpu",
                   metric: str = "sam") -> dict:
    """Pick the score threshold and the minimum instance count on the validation split (never on
    test data) by the mDice of the box pass (``metric`` "sam") or of the boxes themselves
    ("boxes"); logged to WORK/detector/tuning.jsonl."""
    import dataclasses

    net.eval()
    if models is not None:
        models.detector = net
    best, rows = None, []
    grid = [{"score_threshold": t, "min_instances": m, "max_instances": k}
            for k in (1, 5) for m in (0, 1) for t in (0.2, 0.3, 0.4)]
    for g in grid:
        spec.prompt = dataclasses.replace(spec.prompt, **g)
        if metric == "boxes":
            r = evaluate_boxes(spec, net, val, device)
        else:
            r = evaluate(spec, models, val, val_emb, PipelineOptions(prompts="box"), device=device)
        rows.append({**g, **r})
        if distributed.is_main():
            print(f"[detector] val {g}: mDice {r['mDice']:.4f}", flush=True)
        if best is None or r["mDice"] > best[1]:
            best = (g, r["mDice"])
    if distributed.is_main():
        (work / "detector" / "tuning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return best[0]


DEFAULT_EPOCHS = {"detector": 8, "sam-box": 3, "keypoints": 6, "sam-refine": 3}
DEFAULT_BATCH = {"detector": 16, "sam-box": 4, "keypoints": 16, "sam-refine": 4}
DEFAULT_LR = {"detector": 5e-4, "sam-box": 1e-4, "keypoints": 1e-3, "sam-refine": 1e-4}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cp-train", description="Fine-tune the curriculum's four models into a bundle.")
    p.add_argument("stage", choices=[*STAGES, "all"], help="what to train ('all': the four in order)")
    p.add_argument("--data", required=True, help="dataset folder with images/ and masks/")
    p.add_argument("--split", required=True, help="file of training names (validation is carved from it)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--base", default=None, help="bundle to start from (default: the shipped default bundle)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default per stage: " +
                   ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 16 detector/keypoints, 4 SAM)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-4 for SAM heads)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of --split held out for validation")
    p.add_argument("--max-images", type=int, default=0, help="train on at most this many images (0: all)")
    p.add_argument("--detector-arch", default="lite0_centernet",
                   choices=["lite0_centernet", "embedding_centernet", "grounding_dino"],
                   help="detector: EfficientNet-Lite0 on the image, a head on the SAM embedding, or Grounding "
                   "DINO prompted with the bundle's prompt.text")
    p.add_argument("--gdino-weights", default=None,
                   help="local Grounding DINO directory (config.json, weights, tokenizer) to fine-tune from; "
                   "default: the --base bundle's Grounding DINO")
    p.add_argument("--detector-size", type=int, default=256, help="detector input size (longest side)")
    p.add_argument("--detector-freeze", type=int, default=2,
                   help="lite0_centernet: backbone stages kept frozen at their ImageNet weights, after the stem "
                        "(0: train all)")
    p.add_argument("--val-metric", default="sam", choices=["sam", "boxes"],
                   help="detector validation and threshold tuning: mDice of SAM's box pass (sam), or Dice of "
                        "the boxes against the GT boxes (boxes: needs no SAM weights, for image-reading detectors)")
    p.add_argument("--giou", type=float, default=0.0,
                   help="CenterNet detectors: weight of a GIoU loss on the decoded centre-cell boxes, next to "
                        "the L1 on log size and offset (0: off)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="validate and keep an exponential moving average of the weights with this decay per "
                        "step, e.g. 0.99 (0: the raw weights)")
    p.add_argument("--device", default="cpu", help="detector stage: cpu, cuda or cuda:N (other stages: cpu)")
    p.add_argument("--workers", type=int, default=1,
                   help="threads that augment the detector's training images (more keep a GPU fed)")
    p.add_argument("--point-jitter", type=float, default=0.02,
                   help="sam-refine: Gaussian noise on the training edge points, as a fraction of the box side "
                        "(match it to the keypoint net's error)")
    p.add_argument("--refine-train-points", default="gt", choices=["gt", "predicted"],
                   help="sam-refine training: ground-truth edge points, or the base bundle's keypoint net's points "
                        "on each jittered box (the errors the deployed curriculum sees), both plus --point-jitter")
    p.add_argument("--refine-points", default="gt", choices=["gt", "predicted"],
                   help="sam-refine validation: ground-truth edge points, or those of the base bundle's keypoint "
                        "net (what the deployed curriculum sees; needs a trained keypoint net)")
    p.add_argument("--keypoint-arch", default=None, choices=["embedding_heatmap", "hrnet"],
                   help="keypoint net: a heatmap head on the SAM embedding, or the top-down net on image crops "
                        "(HRNet, or another timm backbone such as efficientnet_lite0); default: the base bundle's")
    p.add_argument("--keypoint-backbone", default=None,
                   help="timm backbone for --keypoint-arch hrnet (default hrnet_w32; hrnet_w18_small is small; "
                        "efficientnet_lite0 starts from the pip package's ImageNet weights)")
    p.add_argument("--keypoint-backbone-checkpoint", default=None,
                   help="local timm HRNet checkpoint (e.g. ImageNet) to start the hrnet backbone from")
    p.add_argument("--keypoint-init", default="base", choices=["base", "fresh"],
                   help="keypoint net with the base bundle's arch and config: fine-tune the base's weights (base), "
                        "or start afresh (backbone from ImageNet where it has such weights), e.g. for another "
                        "ensemble member")
    p.add_argument("--keypoint-crop", type=int, default=None,
                   help="hrnet crop side in pixels, a multiple of 32 (default 256; heatmaps are 1/4 of it)")
    p.add_argument("--keypoint-size", type=int, default=None,
                   help="hrnet input size (longest side) the crops are taken from (default: the SAM's)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                   help="embedding cache folder")
    p.add_argument("--work-dir", default=None, help="checkpoints and logs (default: OUT-work)")
    p.add_argument("--resume", action="store_true", help="continue each stage from its last saved epoch")
    p.add_argument("--seed", type=int, default=0, help="random seed (also of the validation split, unless --val-seed)")
    p.add_argument("--val-seed", type=int, default=None,
                   help="seed of the carved validation split alone, e.g. to train ensemble members with different "
                        "--seed on the same split")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Also the entry point of every rank under ``torchrun --nproc-per-node N``: ``--batch-size``
    is then per rank (the global batch is N times it)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    created = distributed.init_from_env()
    try:
        return _run(args)
    except USER_ERRORS as e:
        print(f"cp-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if created:
            distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    if not distributed.is_main():
        args.no_progress = True
    base = Path(args.base) if args.base else default_bundle_path()
    if not (base / BUNDLE_FILE).is_file():
        fix = "pass --base a bundle directory" if args.base else "reinstall the package or pass --base a bundle"
        raise UsageError(f"{base}: no {BUNDLE_FILE} there, so it is not a bundle; {fix}")
    base_bundle = load_bundle(base)  # checks the rest of the bundle before any work starts
    stages = STAGES if args.stage == "all" else (args.stage,)
    hrnet_flags = [f"--keypoint-{k.replace('_', '-')}" for k in ("backbone", "backbone_checkpoint", "crop", "size")
                   if getattr(args, f"keypoint_{k}")]
    if hrnet_flags and "keypoints" in stages and (args.keypoint_arch or base_bundle.keypoints.arch) != "hrnet":
        raise UsageError(f"{', '.join(hrnet_flags)} need --keypoint-arch hrnet; add it or drop them")
    if args.val_metric == "boxes" and (stages != ("detector",) or args.detector_arch != "lite0_centernet"):
        raise UsageError("--val-metric boxes is for the detector stage with --detector-arch lite0_centernet; "
                         "drop it for the other stages")
    if args.device != "cpu" and stages != ("detector",):
        raise UsageError("--device other than cpu is for the detector stage only, so far; use --device cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    _check_inputs(args)
    for stage in stages:
        base = train_stage(stage, args, base)
    if distributed.is_main():
        print(json.dumps({"bundle": str(args.out), "stages": list(stages)}))
    return 0


def _check_inputs(args: argparse.Namespace) -> None:
    """The split, the dataset and the output folders, checked before any model is built or
    embedding computed, so a typo costs a second and not a stage."""
    names = read_split(args.split)
    check_dataset(args.data, names, args.split)
    val_seed = args.seed if args.val_seed is None else args.val_seed
    train_names, _ = carve_validation(names, args.val_fraction, val_seed)
    if not train_names:
        raise DataError(f"{args.split}: its {len(names)} name(s) all go to validation (--val-fraction "
                        f"{args.val_fraction}); list more images or lower --val-fraction")
    outputs = [(Path(args.out), "--out"), (Path(args.work_dir or f"{args.out}-work"), "--work-dir")]
    if args.val_metric == "sam":  # box validation of a detector reads no embeddings
        outputs.append((Path(args.cache_dir), "--cache-dir"))
    for path, flag in outputs:
        _check_writable(path, flag)
    for given, flag, is_kind, kind in ((args.gdino_weights, "--gdino-weights", Path.is_dir, "folder"),
                                       (args.keypoint_backbone_checkpoint, "--keypoint-backbone-checkpoint",
                                        Path.is_file, "file")):
        if given and not is_kind(Path(given)):
            raise UsageError(f"{given}: no such {kind}; pass {flag} an existing local {kind}")


def _check_writable(path: Path, flag: str) -> None:
    """``path`` is a folder that can be written, or can be created where its nearest existing
    ancestor is a writable folder."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{path}: cannot be a folder, {probe} is a file; pass {flag} another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot be written ({probe} is read-only for this user); pass {flag} a "
                         "writable folder")


if __name__ == "__main__":
    sys.exit(main())
