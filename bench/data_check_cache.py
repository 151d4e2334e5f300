"""The data check before a run, cold (every sample decoded) and warm (cache hit: the files are only stat'ed).

``trainer.datacheck.check_datasets`` remembers valid samples by the size and modification time of their files, so
a rerun on unchanged data reads nothing. Prints one JSON object: seconds of the cold check, of the warm check
(median of ``--repeat``), their ratio, and the samples checked. The cache goes to a temporary folder.

    python bench/data_check_cache.py --data /work/shared/data/real_rgbt      # 60 real pairs (flat layout)
    python bench/data_check_cache.py --synthetic 200 --size 480 640          # generated first, MSRS-sized images
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rgbt.dataset import RGBTDataset  # noqa: E402
from trainer.datacheck import check_datasets  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="dataset root (MSRS layout with --split, or flat vi/ir pairs)")
    p.add_argument("--split", default=None, help="split name (default: none, i.e. flat pairs)")
    p.add_argument("--synthetic", type=int, default=0, help="generate this many training scenes instead of --data")
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root, split = (Path(args.data), args.split) if args.data else (Path(tmp) / "data", "train")
        if args.synthetic:
            from rgbt.synthetic import generate_dataset

            generate_dataset(root, n_train=args.synthetic, n_val=0, n_test=0, size=tuple(args.size))
        ds = RGBTDataset(root, split)
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        check_datasets([ds], progress=False, cache=cache)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(args.repeat):
            again = RGBTDataset(root, split)  # a new run lists the folder again (not timed: the check is)
            t0 = time.perf_counter()
            check_datasets([again], progress=False, cache=cache)
            warm.append(time.perf_counter() - t0)
    out = {"samples": len(ds), "cold_seconds": cold, "warm_seconds": statistics.median(warm),
           "cold_over_warm": cold / statistics.median(warm)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
