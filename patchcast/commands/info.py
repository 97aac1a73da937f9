"""``patchcast info``: versions, threads and whether bf16 runs on AMX here."""

from __future__ import annotations

import argparse
import platform


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print versions, torch threads and CPU bf16/AMX support",
                       description="Print library versions, torch threading and whether bf16 matrix "
                       "work uses AMX on this CPU (the worker's default precision depends on it).")
    p.set_defaults(handler=run)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support() -> dict[str, bool]:
    flags = cpu_flags()
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "amx_tile": "amx_tile" in flags}


def run(args: argparse.Namespace) -> int:
    import aiomqtt  # noqa: F401
    import msgpack
    import timm
    import torch
    import torchvision

    from shared import __version__

    support = bf16_support()
    rows = [
        ("patchcast", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("timm", timm.__version__),
        ("msgpack", ".".join(map(str, msgpack.version))),
        ("torch threads", str(torch.get_num_threads())),
        ("torch interop threads", str(torch.get_num_interop_threads())),
        ("cpu capability", torch.backends.cpu.get_cpu_capability()),
        ("mkldnn (oneDNN)", str(torch.backends.mkldnn.is_available())),
        ("cpu amx_bf16", str(support["amx_bf16"])),
        ("cpu avx512_bf16", str(support["avx512_bf16"])),
        ("bf16 inference", "yes (AMX)" if support["amx_bf16"] else
         "yes (AVX512-BF16)" if support["avx512_bf16"] else "emulated: fp32 recommended"),
        ("cuda available", str(torch.cuda.is_available())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
