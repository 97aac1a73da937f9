"""``patchcast codecs``: the patch codecs this build can encode and decode."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("codecs", help="list the patch codecs (payload formats) with their parameters",
                       description="List the registered patch codecs: name, lossless or lossy, parameters "
                       "with their defaults, and a one-line description. A request names its codec and "
                       "parameters; a worker decodes any codec listed here.")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from shared.codecs import list_codecs

    rows = []
    for codec in list_codecs():
        params = " ".join(f"{s.key}={s.default}" for s in codec.param_specs) or "-"
        rows.append((codec.name, "lossless" if codec.lossless else "lossy", params, codec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for name, kind, params, description in rows:
        print(f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {params:<{widths[2]}}  {description}")
    return 0
