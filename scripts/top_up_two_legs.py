"""A top-up through a lossy codec as the service sends it: two legs, two codec payloads.

``patchcast eval --through-codec`` and ``scripts/frontier_losses.py`` give the server a top-up's larger
selection as *one* codec payload. A device sends it in two (docs/service.md, *The server's top-up*): the
first rule's patches, then, when the server asks, the rest of the second rule's as a payload of their
own. With a lossy codec (``jpeg-mosaic``) the two ways decode to slightly different pixels. This
script runs the server on both at one operating point, on the same images with the same thresholds,
and prints both accuracies: the offline figure (one payload) and what the service should measure (two).

    python scripts/top_up_two_legs.py reports/eval-imagenette --first topk-25 --second topk-75 \\
        --eta 0.651 --eta2 0.700 --codec-param q=90

``eval_dir`` is an exact-pixel eval of the same edge, data and grid (its cache gives the edge's logits
and the rules' masks, which do not depend on the codec); the server's passes are run here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from frontier_losses import edge_uncertainty, find_cache, load, min_entropy, selection_masks

from patchcast.eval.passes import codec_round_trip, server_on_masks
from patchcast.progress import phase_bars
from shared import datasets
from shared.codecs import get_codec
from shared.errors import PatchCastError
from shared.models import build_model
from shared.subset import embed_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="an exact-pixel patchcast eval --out folder (or its cache)")
    ap.add_argument("--data", default="imagenette2/val.tar", help="the images that eval ran on")
    ap.add_argument("--edge", default="zoo:imagenette-edge", help="the eval's edge (its preprocessing: the pixels)")
    ap.add_argument("--server", default="zoo:imagenette-server")
    ap.add_argument("--first", default="topk-25", help="the rule of the first leg (a cached selection)")
    ap.add_argument("--second", default="topk-75", help="the offered rule, a superset of the first on every image")
    ap.add_argument("--eta", type=float, default=0.651, help="the edge's min-entropy gate")
    ap.add_argument("--eta2", type=float, default=0.700, help="the server's min-entropy on the first leg "
                    "at which it asks for more")
    ap.add_argument("--codec", default="jpeg-mosaic")
    ap.add_argument("--codec-param", action="append", default=[], metavar="NAME=INT", help="e.g. q=90")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16384, help="server tokens per padded group")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        params = dict((k, int(v)) for k, v in (p.split("=", 1) for p in args.codec_param))
        codec = get_codec(args.codec)
        resolved = codec.resolve_params(params)
    except (ValueError, PatchCastError) as exc:  # bad NAME=INT, an unknown codec or parameter
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    cache = find_cache(args.eval_dir)
    passes = load(cache)
    first, second = (selection_masks(cache, r, passes.num_patches) for r in (args.first, args.second))
    if (first & ~second).any():
        raise SystemExit(f"{args.second} is not a superset of {args.first} on every image")
    send = np.flatnonzero(edge_uncertainty(passes, "min_entropy") >= args.eta)
    ds = datasets.load(args.data)
    if len(ds) != len(passes.labels):
        raise SystemExit(f"{args.data} has {len(ds)} images, the cache {len(passes.labels)}")
    edge_pre = build_model(args.edge, role="edge").preprocess
    server = build_model(args.server, role="server")
    model = server.model.eval()
    u_first = np.zeros(len(ds), dtype=np.float32)
    ok: dict[str, np.ndarray] = {k: np.zeros(len(ds), dtype=bool) for k in ("first", "one_payload", "two_payloads")}
    same = 0

    def server_ok(pixels: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = embed_all(model, datasets.normalize(torch.from_numpy(pixels), server.preprocess))
        logits = server_on_masks(model, tokens, masks, args.max_tokens, False)
        return logits.argmax(1) == labels, logits

    with torch.inference_mode(), phase_bars({"server": "server: first leg, one payload, two payloads"}) as report:
        for s in range(0, len(send), args.batch):
            rows = send[s:s + args.batch]
            px, _ = datasets.to_tensor_batch([ds.samples[i] for i in rows], edge_pre)
            pixels, labels = px.numpy(), passes.labels[rows]
            leg1 = codec_round_trip(pixels, first[rows], server.patch_size, codec, resolved)
            ok["first"][rows], logits = server_ok(leg1, first[rows], labels)
            u_first[rows] = min_entropy(logits)
            one = codec_round_trip(pixels, second[rows], server.patch_size, codec, resolved)
            two = codec_round_trip(leg1, second[rows] & ~first[rows], server.patch_size, codec, resolved)
            ok["one_payload"][rows], logits_one = server_ok(one, second[rows], labels)
            ok["two_payloads"][rows], logits_two = server_ok(two, second[rows], labels)
            same += int((logits_one.argmax(1) == logits_two.argmax(1)).sum())
            report("server", min(s + args.batch, len(send)), len(send), "")
    sent = np.zeros(len(ds), dtype=bool)
    sent[send] = True
    asked = sent & (u_first >= args.eta2)
    kept = first.sum(1)[sent].sum() + (second.sum(1) - first.sum(1))[asked].sum()
    server_acc = float(passes.server_ok.mean())
    figures: dict[str, Any] = {
        "images": len(ds), "sent": float(sent.mean()), "asked": float(asked.mean()),
        "cost": float(kept / (len(ds) * passes.num_patches)), "server_accuracy": server_acc,
        "codec": args.codec, "codec_params": resolved, "first": args.first, "second": args.second,
        "eta": args.eta, "eta2": args.eta2, "asked_same_label": same / max(len(send), 1)}
    print(f"{len(ds):,} images; {sent.mean():.1%} sent with {args.first}, {asked.mean():.1%} topped up to "
          f"{args.second}; comm cost {figures['cost']:.4f}; {args.codec} {resolved}")
    for name in ("one_payload", "two_payloads"):
        right = np.where(asked, ok[name], np.where(sent, ok["first"], passes.edge_ok))
        figures[name] = float(right.mean())
        print(f"  the second rule's patches as {name.replace('_', ' ')}: {right.mean() * 100:.2f} % "
              f"({(right.mean() - server_acc) * 100:+.2f} points against the server on whole images)")
    differ = int((ok["one_payload"] != ok["two_payloads"])[asked].sum())
    figures["asked_right_differs"] = differ
    print(f"  topped-up images right in one way and wrong in the other: {differ} of {int(asked.sum())}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PatchCastError as exc:  # an unknown model or codec, a missing data file: said, not a traceback
        sys.exit(f"error: {exc.message}")
