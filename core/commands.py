"""Core subcommands: ``info``, ``convert``, ``init``, ``photos``, ``parity``.

Only argparse is imported at registration time."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the core subcommands to the ``dinoforge`` parser."""
    p = subparsers.add_parser("info", help="print a model artifact's card (or a checkpoint's inferred architecture)")
    p.add_argument("path", type=Path, help="artifact directory or checkpoint file")
    p.add_argument("--json", action="store_true", help="print the full model.json")
    p.set_defaults(func=_info)

    p = subparsers.add_parser("convert", help="turn an official DINOv2 .pth or a timm checkpoint into an artifact")
    p.add_argument("src", type=Path, help=".pth / .pt / .bin / .safetensors checkpoint")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--arch", help="registered architecture for what shapes cannot tell (e.g. vitb14)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: width / 64, the official head width)")
    p.add_argument("--patch-size", type=int, help="patch size (checked against the patch kernel)")
    p.add_argument("--name", help="model name stored in the card (default: the file stem)")
    p.add_argument("--image-size", type=int, default=224, help="preprocessing crop size (default 224)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("init", help="write a randomly initialised backbone as an artifact")
    p.add_argument("arch", help="registered architecture (vits14, vitb14_reg4, test, ...)")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to create")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an architecture field, e.g. --set patch_size=4 --set img_size=28")
    p.add_argument("--preprocess", dest="preprocess", action="append", default=[], metavar="KEY=VALUE",
                   help="preprocessing contract field, e.g. --preprocess mode=resize --preprocess size=28")
    p.add_argument("--name", help="model name stored in the card (default: ARCH-random)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=_init)

    p = subparsers.add_parser("photos", help="gather the installed real photos into a training collection",
                              description="Decode every image of the known installed packages (docs/distill.md), "
                                          "drop exact duplicates, shrink, and write OUT/images, OUT/manifest.csv "
                                          "(source and licence per file) and OUT/report.json; open it as photos:OUT.")
    p.add_argument("out", type=Path, help="collection folder")
    p.add_argument("--short-side", type=int, default=512, help="shorter side of the stored copies (default 512)")
    p.set_defaults(func=_photos)

    p = subparsers.add_parser("parity", help="check dinoforge against official DINOv2 golden fixtures")
    p.add_argument("paths", type=Path, nargs="+", help="fixture directories or .pt files")
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.add_argument("--tol-scale", type=float, default=1.0, help="multiply every float tolerance (default 1)")
    p.add_argument("--failures-only", action="store_true", help="print only failing checks")
    p.set_defaults(func=_parity)


def _photos(args: argparse.Namespace) -> int:
    import json

    from dinoforge.core.data.photos import build_photos
    from dinoforge.core.errors import DataError

    if args.short_side <= 0:
        raise DataError(f"--short-side must be positive, got {args.short_side}")
    print(json.dumps(build_photos(args.out, short_side=args.short_side), indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from dinoforge.core.artifact import is_artifact, read_card
    from dinoforge.core.checkpoint import load_backbone

    if args.path.is_dir() or is_artifact(args.path):
        card = read_card(args.path)
        if args.json:
            print(json.dumps(card.model_dump(mode="json"), indent=2))
            return 0
        a, p, prov = card.architecture, card.preprocessing, card.provenance
        print(f"name:           {card.name}")
        print(f"architecture:   ViT D={a.embed_dim} depth={a.depth} heads={a.num_heads} patch={a.patch_size} "
              f"ffn={a.ffn} registers={a.num_register_tokens} pos-grid={a.grid_size}x{a.grid_size}")
        print(f"parameters:     {card.num_parameters:,}")
        print(f"embedding dims: {card.embedding_dims} (default pooling {card.default_pooling})")
        print(f"preprocessing:  {p.mode} size={p.size} resize={p.resize_size} {p.interpolation} "
              f"mean={list(p.mean)} std={list(p.std)}")
        print(f"heads:          {', '.join(f'{k} (K={h.out_dim})' for k, h in card.heads.items()) or 'none'}")
        print(f"provenance:     source={prov.source} parent={prov.parent_sha256 or '-'} recipe={prov.recipe or '-'}")
        if prov.metrics:
            print("metrics:        " + ", ".join(f"{k}={v:.4g}" for k, v in prov.metrics.items()))
        print(f"weights sha256: {card.weights_sha256}")
        return 0
    loaded = load_backbone(args.path)
    print(f"checkpoint format: {loaded.source_format}")
    print(loaded.backbone.config.model_dump_json(indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.checkpoint import load_backbone
    from dinoforge.core.preprocess import PreprocessConfig

    loaded = load_backbone(args.src, num_heads=args.num_heads, patch_size=args.patch_size, arch=args.arch)
    cfg = loaded.backbone.config
    size = args.image_size
    pre = PreprocessConfig(size=size, resize_size=round(size * 256 / 224), patch_size=cfg.patch_size)
    prov = Provenance(source=f"{loaded.source_format}-checkpoint", parent_sha256=loaded.sha256,
                      parent=str(args.src.name), details={"converted_from": str(args.src)})
    out = save_artifact(args.out, loaded.backbone, name=args.name or args.src.stem, provenance=prov,
                        preprocessing=pre, overwrite=args.overwrite)
    print(f"wrote {out} ({loaded.source_format} checkpoint, D={cfg.embed_dim}, depth={cfg.depth}, "
          f"heads={cfg.num_heads}, registers={cfg.num_register_tokens})")
    return 0


def _init(args: argparse.Namespace) -> int:
    import torch

    from dinoforge.core.artifact import Provenance, save_artifact
    from dinoforge.core.backbone import BackboneConfig, build_backbone, get_arch
    from dinoforge.core.config import apply_overrides, build_config
    from dinoforge.core.preprocess import PreprocessConfig

    arch = build_config(BackboneConfig, apply_overrides(get_arch(args.arch).model_dump(), args.overrides),
                        source="--set")
    pre_defaults = {"patch_size": arch.patch_size}
    pre = build_config(PreprocessConfig, apply_overrides(pre_defaults, args.preprocess), source="--preprocess")
    torch.manual_seed(args.seed)
    model = build_backbone(arch)
    prov = Provenance(source="random-init", details={"arch": args.arch, "seed": args.seed})
    out = save_artifact(args.out, model, name=args.name or f"{args.arch}-random", provenance=prov,
                        preprocessing=pre, overwrite=args.overwrite)
    print(f"wrote {out} ({args.arch}, {sum(p.numel() for p in model.parameters()):,} parameters, seed {args.seed})")
    return 0


def _parity(args: argparse.Namespace) -> int:
    from dinoforge.core.parity import Tolerances, run_parity

    report = run_parity(list(args.paths), tolerances=Tolerances(scale=args.tol_scale))
    print(report.table(only_failures=args.failures_only))
    if args.json:
        report.write_json(args.json)
    return 0 if report.passed else 1
