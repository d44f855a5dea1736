"""Near-duplicate matching time: ingest's multi-index hashing search against brute force, on synthetic hashes.

Input: ``--sizes`` sets of random 256-bit hashes (what ingest stores per image), 2% of them planted in pairs (one a
copy of the other at a random distance up to the threshold). Measured per size, on ``--threads`` threads:

- cls-ray: ``cls_ray.data.near_duplicates.find_pairs(method="mih")`` (faiss ``IndexBinaryMultiHash``, exact by
  pigeonhole) plus the connected components (``cluster_labels``): what ingest runs above ``BRUTE_FORCE_MAX``
  hashes (100,000; up to there it runs the brute force below, which is as fast or faster);
- baseline: faiss' brute-force ``IndexBinaryFlat.range_search`` over all pairs, timed on the first
  ``--brute-max`` hashes and scaled by the square of the size above that (an estimate, flagged as such).

Both must find every planted pair; the result prints the seconds, the pairs found and the speed-up.
Real hashes are less uniform than random ones (fuller hash buckets); ``--real CODES.npy`` times a saved N x 32
uint8 array of real hashes as well.

Run: ``.venv/bin/python benchmarks/near_duplicates.py [--sizes 100000 1000000] [--threshold 20]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import machine_description  # noqa: E402


def synthetic(n: int, threshold: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    planted = []
    for k in range(0, n // 50 * 2, 2):
        bits = np.unpackbits(codes[k])
        flip = rng.choice(256, size=int(rng.integers(0, threshold + 1)), replace=False)
        bits[flip] ^= 1
        codes[k + 1] = np.packbits(bits)
        planted.append((k, k + 1))
    return codes, planted


def brute_force(codes: np.ndarray, threshold: int) -> tuple[float, int]:
    import faiss

    start = time.perf_counter()
    index = faiss.IndexBinaryFlat(256)
    index.add(codes)
    lims, _, ids = index.range_search(codes, threshold + 1)
    query = np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64))
    return time.perf_counter() - start, int((query < ids).sum())


def measure(codes: np.ndarray, planted: list[tuple[int, int]], threshold: int, brute_max: int) -> dict:
    from cls_ray.data.near_duplicates import cluster_labels, find_pairs

    start = time.perf_counter()
    i, j = find_pairs(codes, threshold, method="mih")
    labels = cluster_labels(len(codes), i, j)
    mih_s = time.perf_counter() - start
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    missed = sum(1 for p in planted if p not in found)
    n = len(codes)
    sub = min(n, brute_max)
    brute_s, brute_pairs = brute_force(codes[:sub], threshold)
    scale = (n / sub) ** 2
    return {
        "hashes": n,
        "threshold": threshold,
        "cls_ray_s": mih_s,
        "pairs": len(i),
        "clusters": int(np.bincount(labels).__gt__(1).sum()),
        "planted_missed": missed,
        "brute_force_s": brute_s * scale,
        "brute_force_estimated": scale > 1,
        "brute_force_pairs_on_subset": brute_pairs,
        "speedup": brute_s * scale / mih_s,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threshold", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--brute-max", type=int, default=100_000)
    parser.add_argument("--real", help="a saved N x 32 uint8 array of real hashes (numpy .npy)")
    args = parser.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    records = []
    for n in args.sizes:
        codes, planted = synthetic(n, args.threshold)
        records.append({"input": "synthetic", **measure(codes, planted, args.threshold, args.brute_max)})
        print(json.dumps(records[-1]), flush=True)
    if args.real:
        codes = np.load(args.real)
        records.append({"input": args.real, **measure(codes, [], args.threshold, args.brute_max)})
        print(json.dumps(records[-1]), flush=True)
    print(json.dumps({"machine": machine_description(), "threads": args.threads}))
    return records


if __name__ == "__main__":
    main()
