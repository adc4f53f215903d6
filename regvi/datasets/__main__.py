"""``python -m regvi.datasets``: list and fetch the catalogued datasets (see :mod:`.catalog`).

Examples::

    python -m regvi.datasets list
    python -m regvi.datasets fetch mop_snareseq2_rna mop_snareseq2_atac   # public source
    python -m regvi.datasets fetch kang2018_ifnb_pbmc   # public source; needs regvi[datasets]
    python -m regvi.datasets fetch --all --source-mirror DIR   # the source files, offline
    python -m regvi.datasets fetch --all --mirror ../shared/data          # a folder or URL
"""

from __future__ import annotations

import argparse
import sys

from regvi.datasets import catalog


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a bad name, checksum or download)."""
    p = argparse.ArgumentParser(
        prog="python -m regvi.datasets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the catalogue, with cache status")
    f = sub.add_parser("fetch", help="fetch datasets into the cache, checked by sha256")
    f.add_argument("names", nargs="*", help="catalogue names (see `list`)")
    f.add_argument("--all", action="store_true", help="every catalogued dataset")
    f.add_argument("--mirror", help=f"URL or folder with the built files (${catalog.ENV_MIRROR})")
    f.add_argument("--source-mirror", help="URL or folder with a recipe's source files")
    f.add_argument("--force", action="store_true", help="fetch again even if cached")
    for s in (p, f):
        s.add_argument(
            "--cache",
            help=f"cache folder (${catalog.ENV_DIR}; default {catalog.cache_dir()})",
            default=argparse.SUPPRESS,
        )
    args = p.parse_args(argv)
    cache = getattr(args, "cache", None)
    if args.command == "list":
        root = catalog.cache_dir(cache)
        for ds in catalog.CATALOG.values():
            state = "cached" if (root / ds.filename).is_file() else "not fetched"
            how = "public source" if ds.build else "mirror only"
            print(f"{ds.name:24s} {state:12s} {how:14s} {ds.description}")
        print(f"cache: {root}")
        return 0
    names = list(catalog.CATALOG) if args.all else args.names
    if not names:
        p.error("fetch: name a dataset or give --all")
    try:
        paths = catalog.fetch(
            names,
            mirror=args.mirror,
            cache=cache,
            force=args.force,
            source_mirror=args.source_mirror,
        )
    except catalog.DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
