"""The torch engine's reduced precision (``--precision bf16|fp16``, the encoder under autocast)
against its own fp32, on a bundle's real weights and real images, with ``cp-export``'s bounds.

    python -m tools.precision_parity [--bundle B] [--precision bf16] [--device cpu]
        [--images examples/images] [--json out.json]

``tools.gpu_bench`` checks the encoder's embedding on random ViT-H weights (whose near-zero mask
logits flip with any rounding); this is the check that says what a user's masks will do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cp_bench.results import write_json
from cp_deploy.bundle import default_bundle_path, load_bundle
from cp_deploy.engines.torch import TorchEngine
from cp_deploy.files import discover_images, read_image
from cp_deploy.preprocess import to_rgb_uint8
from export.parity import Tolerance, check_parity


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the shipped one)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"], help="the precision to check")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--images", default="examples/images", help="folder of images")
    ap.add_argument("--json", default=None, help="also write the report here")
    a = ap.parse_args(argv)
    bundle = load_bundle(a.bundle or default_bundle_path())
    images = [to_rgb_uint8(read_image(Path(a.images) / p)) for p in discover_images(a.images)]
    ref = TorchEngine(bundle, device=a.device)
    low = TorchEngine(bundle, device=a.device, precision=a.precision)
    rep = check_parity(bundle, ref.models, ref, low, images, Tolerance.for_precision(a.precision))
    print(rep.table())
    out = {"bundle": str(bundle.root), "precision": a.precision, "device": a.device, "images": len(images),
           **rep.to_json()}
    print(f"{a.precision} vs fp32 on {len(images)} images: passed {out['passed']}; {'; '.join(out['failures'])}")
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
