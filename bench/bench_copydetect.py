"""Copy detection on real photos: dinoforge's copy descriptor against the hashes and CNN dedup tools.

References = originals (the ``bench`` side of the photo pool, :mod:`dinoforge.curate.photopool`, at most one
image per twin group) plus extra references that have no query. Queries = copies of the originals made with the edit families of
:mod:`dinoforge.curate.edits` (assigned round-robin, so every family gets the same share), plus distractor
queries: edited versions of held-out photos that are not references (some of them the other strip of a
reference wallpaper, the hardest distractors). Every method scores every (query, reference) pair on the same
images; :mod:`dinoforge.curate.copyeval` turns the scores into muAP and recall at precision 0.90, overall
and per family. Methods:

* ``dinoforge``: the copy descriptor (cosine similarity); left out, with a message, when there is no head;
* ``gem-raw``: the same frozen MobileNetV2 GeM features without the learned projection (ablation);
* ``phash`` / ``dhash``: imagehash 64-bit hashes; ``pdq``: Meta's PDQ 256-bit hash (score = -Hamming);
* ``imagededup-cnn``: imagededup's CNN mode with a ``CustomModel`` wrapping the local MobileNetV2 (global
  average pool, imagededup's own 256 -> 224 centre-crop transform; cosine similarity).

Then the dedup check: the pool of references, the copy queries and the distractors goes through the curation
dedup step with the descriptor's calibrated threshold and grouping rule (:mod:`dinoforge.curate.linkage`),
scored against the injected groups; and the same step along a list of thresholds (``--curve``, with
``--curve-k`` neighbours and ``--curve-linkage``) for the descriptor and for gem-raw: operating curves
measured on the benchmark itself, which show what a threshold calibrated elsewhere leaves on the table.

    nice -n 19 python bench/bench_copydetect.py --photos runs/photos --out runs/bench_copydetect
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dinoforge.core.index.vectors import l2_normalize
from dinoforge.core.runtime import init_runtime
from dinoforge.curate import edits
from dinoforge.curate.copydetect import score_dedup
from dinoforge.curate.copyeval import evaluate
from dinoforge.curate.copynet import DEFAULT_HEAD, CopyDescriptor, RawFeatures, load_mobilenet
from dinoforge.curate.dedup_tool import group_vectors
from dinoforge.curate.linkage import LINKAGES, Linkage
from dinoforge.curate.photopool import photo_pool
from dinoforge.curate.state import RunState, fingerprint

Scorer = Callable[[list[Image.Image], list[Image.Image]], np.ndarray]


def build_sets(args: argparse.Namespace) -> dict[str, Any]:
    """References, queries, ground truth and families (deterministic for ``args.seed``)."""
    pool = [p for p in photo_pool(args.photos) if p.split == "bench"]
    rng = np.random.default_rng(args.seed)
    chosen, groups = [], set()
    for i in rng.permutation(len(pool)):  # one image per twin group: a twin is neither a copy nor a distractor
        if pool[i].group not in groups:
            chosen.append(pool[i])
            groups.add(pool[i].group)
    need = args.originals + args.extra_refs + args.distractors
    if need > len(chosen):
        raise SystemExit(f"the bench side holds {len(chosen)} distinct photos, {need} asked for")
    chosen = chosen[:need]
    refs = chosen[:args.originals + args.extra_refs]
    sources = chosen[args.originals + args.extra_refs:]
    names = list(edits.FAMILIES)
    ref_images = [p.load() for p in refs]
    queries, truth, families = [], [], []
    for i in range(args.originals):
        for j in range(args.queries_per_original):
            family = names[(i * args.queries_per_original + j) % len(names)]
            queries.append(edits.apply(family, ref_images[i], rng))
            truth.append(i)
            families.append(family)
    for j, src in enumerate(sources):
        family = names[j % len(names)]
        queries.append(edits.apply(family, src.load(), rng))
        truth.append(-1)
        families.append(family)
    return {"refs": ref_images, "ref_ids": [p.id for p in refs], "queries": queries,
            "truth": np.asarray(truth), "families": families}


def cosine_pair(embed_q: Callable[[list[Image.Image]], np.ndarray],
                embed_r: Callable[[list[Image.Image]], np.ndarray]) -> Scorer:
    """Score = cosine similarity of the embeddings (queries and references embedded by their own function)."""
    def score(queries: list[Image.Image], refs: list[Image.Image]) -> np.ndarray:
        q, r = embed_q(queries), embed_r(refs)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        return q @ r.T
    return score


def hamming(bits: Callable[[Image.Image], np.ndarray]) -> Scorer:
    """Score = minus the Hamming distance of the bit vectors ``bits(image)``."""
    def score(queries: list[Image.Image], refs: list[Image.Image]) -> np.ndarray:
        q = np.stack([bits(im) for im in queries]).astype(np.float32)  # [Q, B]
        r = np.stack([bits(im) for im in refs]).astype(np.float32)  # [R, B]
        return -(q @ (1 - r).T + (1 - q) @ r.T)
    return score


def imagededup_cnn(folder: Path) -> Scorer:
    """imagededup's CNN encoder around the local MobileNetV2 (no download), batched over files in ``folder``
    (written as PNG, lossless, so the queries' own JPEG artefacts are kept)."""
    import torch
    from imagededup.methods import CNN
    from imagededup.utils import CustomModel
    from torchvision import transforms

    net = torch.nn.Sequential(load_mobilenet(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    tf = transforms.Compose([transforms.Resize((256, 256)), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    cnn = CNN(verbose=False, model_config=CustomModel(name="mobilenet_v2_local", model=net, transform=tf))

    def embed(images: list[Image.Image], part: str) -> np.ndarray:
        where = folder / part
        where.mkdir(parents=True, exist_ok=True)
        names = [f"{i:05d}.png" for i in range(len(images))]
        for name, im in zip(names, images, strict=True):
            im.save(where / name, compress_level=1)
        codes = cnn.encode_images(image_dir=where)
        return np.stack([codes[name] for name in names])

    return cosine_pair(lambda q: embed(q, "queries"), lambda r: embed(r, "refs"))


def methods(args: argparse.Namespace, desc: CopyDescriptor | None, raw: tuple[np.ndarray, np.ndarray],
            out: Path) -> dict[str, Scorer]:
    """Every method that can run here; a missing baseline package is reported, not fatal. ``raw`` holds the
    frozen backbone's features of the queries and references (computed once for the descriptor and its
    ablation). Without a trained head there is no ``dinoforge`` column (said on stderr)."""
    scorers: dict[str, Scorer] = {"gem-raw": cosine_pair(lambda q: raw[0], lambda r: raw[1])}
    if desc is not None:
        scorers["dinoforge"] = lambda q, r: desc.project(raw[0]) @ desc.project(raw[1]).T
    else:
        print(f"no copy head ({args.head or DEFAULT_HEAD}): the dinoforge column is left out; gem-raw and the "
              "baselines run", file=sys.stderr)
    try:
        import imagehash

        scorers["phash"] = hamming(lambda im: imagehash.phash(im).hash.reshape(-1))
        scorers["dhash"] = hamming(lambda im: imagehash.dhash(im).hash.reshape(-1))
    except ImportError:
        print("imagehash is not installed: pip install -e '.[copybench]' (pHash and dHash skipped)", file=sys.stderr)
    try:
        import pdqhash

        scorers["pdq"] = hamming(lambda im: pdqhash.compute(np.ascontiguousarray(np.asarray(im.convert("RGB"))))[0])
    except ImportError:
        print("pdqhash is not installed: pip install -e '.[copybench]' (PDQ skipped)", file=sys.stderr)
    try:
        scorers["imagededup-cnn"] = imagededup_cnn(out / "imagededup")
    except ImportError:
        print("imagededup is not installed: pip install -e '.[copybench]' (its CNN mode skipped)", file=sys.stderr)
    return {k: v for k, v in scorers.items() if not args.methods or k in args.methods}


def dedup_check(sets: dict[str, Any], threshold: float, vectors: tuple[np.ndarray, np.ndarray],
                out: Path, k: int = 16, linkage: Linkage = "kept") -> dict[str, Any]:
    """The curation dedup step on references + queries (unit ``vectors``: references, queries) at
    ``threshold`` with ``k`` neighbours per image (``dinoforge dedup --k``) and ``linkage``, scored against
    the injected groups; its run lives under ``out``."""
    refs_v, queries_v = vectors
    n_ref = len(sets["ref_ids"])
    ids = list(sets["ref_ids"]) + [f"query-{i:05d}" for i in range(len(queries_v))]
    truth = sets["truth"]
    originals = set(truth[truth >= 0].tolist())
    group = [i if i in originals else -1 for i in range(n_ref)] + truth.tolist()
    role = ["original"] * n_ref + ["copy" if t >= 0 else "distractor" for t in truth]
    out.mkdir(parents=True, exist_ok=True)
    truth_path = out / "dedup_truth.parquet"
    pq.write_table(pa.table({"id": ids, "group": group, "role": role}), truth_path)
    state = RunState(out, init_runtime("cpu"))
    started = time.perf_counter()
    group_vectors(state, np.concatenate([refs_v, queries_v]), ids, threshold, k, f"bench-{time.time()}", linkage)
    removed = pq.read_table(state.path("dedup", "removed.parquet")).column("id").to_pylist()
    scores = score_dedup(removed, truth_path)
    return {**scores, "threshold": threshold, "k": k, "linkage": linkage, "pool": len(ids),
            "injected_copies": int((truth >= 0).sum()), "seconds": round(time.perf_counter() - started, 1)}


def cached(path: Path, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """``compute()`` and its seconds, stored under ``path`` so that a rerun (a new head, a method added) only
    computes what is missing."""
    if path.with_suffix(".npy").is_file():
        return np.load(path.with_suffix(".npy")), float(path.with_suffix(".s").read_text())
    started = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".npy"), value)
    path.with_suffix(".s").write_text(f"{seconds:.3f}\n")
    return value, seconds


def table(results: dict[str, Any]) -> str:
    """Markdown, one column per method: overall muAP, R@P90 and seconds, then muAP per edit family."""
    names = list(results)
    metrics = {n: results[n]["metrics"] for n in names}
    families = list(metrics[names[0]]["families"])
    rows = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
            "| **muAP overall** | " + " | ".join(f"**{metrics[n]['overall']['muap']:.3f}**" for n in names) + " |",
            "| R@P90 overall | " + " | ".join(f"{metrics[n]['overall']['recall_at_p90']:.3f}" for n in names) + " |",
            "| seconds | " + " | ".join(f"{results[n]['seconds']:.0f}" for n in names) + " |"]
    rows += [f"| {f} | " + " | ".join(f"{metrics[n]['families'][f]['muap']:.3f}" for n in names) + " |"
             for f in families]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default="runs/photos", help="output folder of dinoforge photos")
    parser.add_argument("--out", default="runs/bench_copydetect")
    parser.add_argument("--originals", type=int, default=250)
    parser.add_argument("--extra-refs", type=int, default=50)
    parser.add_argument("--distractors", type=int, default=80)
    parser.add_argument("--queries-per-original", type=int, default=4)
    parser.add_argument("--head", help="descriptor head file (default: the shipped one, when there is one)")
    parser.add_argument("--size", type=int, default=224, help="backbone input side without a head")
    parser.add_argument("--curve", type=float, nargs="*", default=[0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.60, 0.70, 0.80, 0.90],
                        help="cosine thresholds of the dedup curves of gem-raw and the descriptor (operating "
                        "curves on the benchmark itself, not a calibration)")
    parser.add_argument("--curve-k", type=int, default=16, help="neighbours per image on the curves (dinoforge "
                        "dedup --k; 1 joins each image only to its most similar one)")
    parser.add_argument("--curve-linkage", choices=LINKAGES, default="kept", help="grouping rule on the curves")
    parser.add_argument("--methods", nargs="*", help="run only these methods")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sets = build_sets(args)
    desc = CopyDescriptor(args.head) if args.head or DEFAULT_HEAD.is_file() else None
    backbone = desc.raw if desc is not None else RawFeatures(args.size)
    cache = out / "cache" / fingerprint(args.photos, args.originals, args.extra_refs, args.distractors,
                                        args.queries_per_original, args.seed, backbone.size)
    both, backbone_seconds = cached(cache / "raw", lambda: np.concatenate([backbone(sets["queries"]),
                                                                          backbone(sets["refs"])]))
    raw = (both[:len(sets["queries"])], both[len(sets["queries"]):])
    results: dict[str, Any] = {}
    for name, scorer in methods(args, desc, raw, out).items():
        if name in ("dinoforge", "gem-raw"):  # cheap projections of the shared backbone pass: never cached
            started = time.perf_counter()
            scores, seconds = scorer(sets["queries"], sets["refs"]), time.perf_counter() - started + backbone_seconds
        else:
            scores, seconds = cached(cache / name, lambda s=scorer: s(sets["queries"], sets["refs"]))
        results[name] = {"seconds": seconds, "metrics": evaluate(scores, sets["truth"], sets["families"])}
        print(f"{name}: muAP {results[name]['metrics']['overall']['muap']:.3f}", flush=True)
    summary = {"queries": len(sets["queries"]), "references": len(sets["refs"]), "emoji": edits.emoji_source(),
               "results": results, "head": desc.meta if desc is not None else None}
    if desc is not None and "dinoforge" in results:
        summary["dedup"] = dedup_check(sets, desc.threshold, (desc.project(raw[1]), desc.project(raw[0])),
                                       out / "dedup_run", linkage=desc.linkage)
        print("dedup:", json.dumps(summary["dedup"]))
    curves = {"gem-raw": [l2_normalize(raw[1]), l2_normalize(raw[0])]}
    if desc is not None:
        curves["dinoforge"] = [desc.project(raw[1]), desc.project(raw[0])]
    tag = f"k{args.curve_k}_{args.curve_linkage}"
    summary["dedup_curves"] = {name: [dedup_check(sets, t, (v[0], v[1]), out / f"dedup_{name}_{tag}_{t:.2f}",
                                                  args.curve_k, args.curve_linkage) for t in args.curve]
                               for name, v in curves.items()}
    for name, curve in summary["dedup_curves"].items():
        for point in curve:
            print(f"dedup {name} at {point['threshold']:.2f}, k={args.curve_k}, {args.curve_linkage}: "
                  f"recall {point['recall']:.3f} "
                  f"precision {point['precision']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
