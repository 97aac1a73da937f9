"""``patchcast config``: validate, show and describe the configuration schema."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="validate a config file, show the effective config, or describe every field",
        description="Configuration is one closed schema: defaults, then a TOML/YAML file, then "
        "PATCHCAST_<SECTION>__<FIELD> environment variables. Unknown keys are errors.")
    p.add_argument("file", nargs="?", help="config file (TOML or YAML); default: built-in defaults")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--validate", action="store_true", help="only check the file; exit 0 when valid")
    g.add_argument("--describe", action="store_true", help="list every field with its default and meaning")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from shared.config import describe, load_config, to_toml

    if args.describe:
        for name, default, help_text in describe():
            print(f"{name:<28} {default:<22} {help_text}" if default else f"\n{name:<28} {help_text}")
        return 0
    cfg = load_config(args.file)
    if args.validate:
        print(f"{args.file or 'defaults'}: valid")
        return 0
    print(to_toml(cfg), end="")
    return 0
