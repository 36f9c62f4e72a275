"""Cost of the decoded-cache key on a real CIFAR-10 tree, printed as JSON.

The key (``symensemble.data._tree_fingerprint``) lists the tree and stats every image file
(name, size, mtime, ctime) so that an image rewritten in place invalidates the cache. This
times the listing and the key, and the whole cached ``load_cifar10`` call beside them
(median of ``--repeats`` after one warm-up; the listing is served from the page cache).

    python benchmarks/data_fingerprint.py [--data PATH] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from symensemble import data as data_mod


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="class-folder tree [default: $SYMENSEMBLE_DATA]")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = data_mod.Path(args.data) if args.data else data_mod.default_data_root()
    tree = data_mod._find_tree(root)
    if tree is None:
        raise SystemExit(f"no class-folder tree at {root}")
    listing = data_mod._scan_tree(tree)
    files = sum(len(f) for per_class in listing.values() for f in per_class)
    scan = _median_seconds(lambda: data_mod._scan_tree(tree), args.repeats)
    key = _median_seconds(lambda: data_mod._tree_fingerprint(tree, data_mod._scan_tree(tree)), args.repeats)
    load = _median_seconds(lambda: data_mod.load_cifar10(tree), args.repeats)
    print(json.dumps({"tree": str(tree), "files": files, "scan_seconds": round(scan, 4),
                      "scan_and_key_seconds": round(key, 4), "cached_load_seconds": round(load, 4)},
                     indent=2))


if __name__ == "__main__":
    main()
