"""``patchcast info``: versions, threads and whether bf16 pays on this CPU."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print versions, torch threads and whether bf16 is faster than fp32 here",
                       description="Print library versions, torch threading, the CPU's bf16 features and a "
                       "measured bf16-vs-fp32 matrix-product speed: precision 'auto' (the worker's "
                       "default) takes bf16 only where it is clearly faster.")
    p.set_defaults(handler=run)


def zoo_summary() -> str:
    """The shipped models by name, with their cards' test accuracy and a specialist's classes."""
    import json

    from shared.models import ZOO_DIR, zoo_names

    parts = []
    for name in zoo_names():
        card_path = ZOO_DIR / f"{name}.json"
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        acc = card.get("test_accuracy")
        what = [f"{acc * 100:.1f} %" if isinstance(acc, float) else "no card"]
        if card.get("class_ids"):
            what.append(f"specialist on classes {','.join(map(str, card['class_ids']))}")
        parts.append(f"zoo:{name} ({'; '.join(what)})")
    return ", ".join(parts) or "empty"


def run(args: argparse.Namespace) -> int:
    import msgpack
    import timm
    import torch
    import torchvision

    import shared.transport  # noqa: F401  (the MQTT client)
    from shared import __version__
    from shared.heap import describe_support
    from shared.machine import machine_info
    from shared.packing import varlen_available
    from shared.precision import MIN_BF16_SPEEDUP, bf16_flags, probe_once, resolve
    from shared.prepack import prepack_available

    support = bf16_flags()
    probe = probe_once()
    measured = ("not measured (bf16 emulated here)" if probe is None else
                f"{probe.speedup:.2f}× fp32 (fp32 {probe.fp32_s * 1e3:.1f} ms, bf16 {probe.bf16_s * 1e3:.1f} ms)")
    machine = machine_info()
    rows = [
        ("patchcast", __version__),
        ("cpu", f"{machine['cpu']} ({machine['cores']} cores)"),
        ("platform", machine["platform"]),
        ("python", machine["python"]),
        ("torch", machine["torch"]),
        ("torchvision", torchvision.__version__),
        ("timm", timm.__version__),
        ("msgpack", ".".join(map(str, msgpack.version))),
        ("torch threads", str(torch.get_num_threads())),
        ("torch interop threads", str(torch.get_num_interop_threads())),
        ("cpu capability", torch.backends.cpu.get_cpu_capability()),
        ("mkldnn (oneDNN)", str(torch.backends.mkldnn.is_available())),
        ("cpu amx_bf16", str(support["amx_bf16"])),
        ("cpu avx512_bf16", str(support["avx512_bf16"])),
        ("bf16 matmul speed", measured),
        ("precision auto", f"{resolve('auto')} (bf16 only at ≥ {MIN_BF16_SPEEDUP}× fp32)"),
        ("bf16 weight prepacking", "available" if prepack_available() else "not available (plain bf16 weights)"),
        ("malloc", describe_support()),
        ("cuda available", str(torch.cuda.is_available())),
        ("cuda devices", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
         or "none"),
        ("flash varlen attention", "in this torch (used by a CUDA worker)" if varlen_available() else
         "not in this torch (a CUDA worker uses padded attention)"),
        ("model zoo", zoo_summary()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
