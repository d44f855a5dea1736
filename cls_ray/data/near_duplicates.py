"""Near-duplicate images: perceptual hashes taken during validation, matched without comparing every pair.

**Hash.** A 256-bit pHash: the image in grayscale, box-filtered to 64x64, the 16x16 low-frequency block of its 2-D
DCT-II, each coefficient compared with the block's median: imagehash's ``phash(hash_size=16)`` steps, and its
result bit for bit on a 64 px image (tested). The box filter is exact (each of the 64x64 pixels is the mean of the
span of input it covers, fractions of a pixel included, in floating point) and follows a power-of-two reduction of
the short side to 64-127 px, which for a JPEG kept as it is is libjpeg's DCT-scaled decode of its luma plane, the
decode validation makes anyway (``images.inspect_image``): no second decode. On that fixed grid a copy at another
size lands where the original does (docs/design.md, "Near-duplicates", has the measured distances). Box filter and
DCT are one small matrix per axis, applied to a validation task's same-sized images together: about 0.03 ms per
224 px JPEG on top of validation, against 0.8 ms for imagehash's own ``phash`` (a Lanczos resize, full scipy
DCTs); docs/benchmarks.md, "Ingest", has the whole-ingest cost.
256 bits rather than imagehash's default 64 because on Fashion-MNIST the 64-bit hash puts 18% of images within 6
bits of a *different* image, inside the range where re-encoded copies land, while at 256 bits resized, re-encoded
and colour-shifted copies separate from distinct images. Crops move the hash too far to be caught: a perceptual
hash is not crop-invariant.

**Matching.** Up to 100,000 hashes, faiss' SIMD brute force (``IndexBinaryFlat.range_search``); above, faiss'
``IndexBinaryMultiHash`` (multi-index hashing): the 256 bits are cut into ``m`` disjoint chunks, each indexed in a
hash table, and a query probes every key within ``nflip`` bits of its own chunk. With ``m = threshold // 2 + 1``
chunks (4 to 16) and ``nflip = threshold // m``, any pair within ``threshold`` bits has some chunk within ``nflip``
bits (pigeonhole), so the search is exact, not approximate; the candidates are verified on the full hash. Either
index grows a block at a time, each block searching the index after joining it, so every pair is compared once
(one search of all against all compares it twice). Pairs become clusters through their connected components
(scipy).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
HASH_BYTES = HASH_BITS // 8
DESCRIPTION = "pHash, 256 bits (imagehash.phash hash_size=16 steps on a 64x64 exact box filter of the grayscale image)"


SIDE = 64
# Rows k < HASH_SIZE of the unnormalised DCT-II matrix (scipy.fftpack.dct's convention): 2 cos(pi k (2n + 1) / 2N)
_DCT = 2.0 * np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * np.arange(SIDE)[None, :] + 1) / (2 * SIDE))


def thumbnail(image: Image.Image) -> np.ndarray:
    """The hash's input: ``image`` in grayscale, reduced by the largest power of two that keeps its short side at
    ``SIDE`` pixels or more (a uint8 array; :func:`hashes` box-filters it to ``SIDE`` x ``SIDE``)."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # palette, CMYK, 16-bit, alpha: as Pillow's own grayscale conversion sees them
    # Grayscale first (one channel to reduce, not three). Powers of two are the scales libjpeg decodes a kept JPEG
    # at (images.inspect_image), so a JPEG and its PNG copy, or copies at twice or half the size, reach the box
    # filter on the same grid.
    gray = image.convert("L") if image.mode != "L" else image
    factor = min(gray.size) // SIDE
    if factor >= 2:
        gray = gray.reduce(1 << (factor.bit_length() - 1))
    return np.asarray(gray)


@functools.lru_cache(maxsize=256)
def _projection(n: int) -> np.ndarray:
    """``(HASH_SIZE, n)``: the box filter from ``n`` pixels to ``SIDE`` (each output pixel the exact mean of the
    span of input it covers, fractions of a pixel included) followed by the low rows of the DCT."""
    edges = np.arange(SIDE + 1) * (n / SIDE)
    pixel = np.arange(n)[None, :]
    overlap = np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel)
    box = np.clip(overlap, 0.0, None) * (SIDE / n)
    return (_DCT @ box).astype(np.float32)


def hashes(thumbnails: Sequence[np.ndarray]) -> list[bytes]:
    """The 32-byte pHashes of several :func:`thumbnail` results. Box filter and DCT are one matrix per axis (the
    16x16 low block of the DCT of the ``SIDE`` x ``SIDE`` box-filtered image is ``P_h X P_w^T``), and same-sized
    images go through numpy together: on images this small numpy's per-call overhead costs more than the
    arithmetic, so a validation task hashes its files in one go (docs/benchmarks.md, "Ingest"). Each hash is the
    one :func:`perceptual_hash` gives that image alone (numpy multiplies a stack matrix by matrix)."""
    out = [b""] * len(thumbnails)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, pixels in enumerate(thumbnails):
        by_shape.setdefault(pixels.shape, []).append(k)
    for (height, width), index in by_shape.items():
        stack = np.stack([thumbnails[k] for k in index]).astype(np.float32)
        low = (_projection(height) @ stack @ _projection(width).T).reshape(len(index), HASH_BITS)
        # np.median's own value (the mean of the two middle values), without its Python-level overhead
        middle = np.partition(low, (HASH_BITS // 2 - 1, HASH_BITS // 2), axis=1)
        median = (middle[:, HASH_BITS // 2 - 1] + middle[:, HASH_BITS // 2]) / 2
        for k, row in zip(index, np.packbits(low > median[:, None], axis=1), strict=True):
            out[k] = row.tobytes()
    return out


def perceptual_hash(image: Image.Image) -> bytes:
    """The 32-byte pHash of a decoded image (see the module docstring)."""
    return hashes([thumbnail(image)])[0]


def preload() -> None:
    """Import what matching needs (faiss, scipy's csgraph); safe to run in a background thread."""
    import faiss  # noqa: F401
    import scipy.sparse.csgraph  # noqa: F401


def _index_shape(threshold: int) -> tuple[int, int, int]:
    """``(chunks, bits per chunk, nflip)`` of an exact multi-index hash search within ``threshold`` bits."""
    chunks = min(16, max(4, threshold // 2 + 1))
    return chunks, HASH_BITS // chunks, threshold // chunks


_BIT_ORDER = np.random.default_rng(0).permutation(HASH_BITS)


def _shuffle_bits(codes: np.ndarray) -> np.ndarray:
    """``codes`` with their bits in a fixed random order. Hamming distances are unchanged, but multi-index hashing's
    chunks no longer hold runs of neighbouring DCT coefficients: a pHash has a few bits that are nearly constant
    across images (the coefficients next to the DC term), and a chunk holding them fills few buckets. On the
    first 60,000 Fashion-MNIST hashes the shuffled search took 1.3-1.8 s against 1.8-2.4 s unshuffled."""
    return np.packbits(np.unpackbits(codes, axis=1)[:, _BIT_ORDER], axis=1)


BRUTE_FORCE_MAX = 100_000
"""Up to this many hashes faiss' SIMD brute force is as fast as multi-index hashing or faster (both searching each
pair once: 1.3 s against 2.0 s for 70,000 real hashes, 3.1 s against 2.9 s for 100,000 random ones, 11 s against
5.2 s for 200,000); above it the brute force grows with the square of the count."""


SEARCH_BLOCK = 4096
"""Hashes added to the index, and searched, at a time (:func:`find_pairs`)."""


def find_pairs(
    codes: np.ndarray, threshold: int, method: str = "auto", threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``(i, j)``, ``i < j``, of rows of ``codes`` (N x 32 uint8 hashes) within ``threshold`` bits.

    ``method``: ``mih`` (multi-index hashing), ``flat`` (brute force), or ``auto`` (flat up to
    :data:`BRUTE_FORCE_MAX` hashes). Both are exact. Returns two int64 arrays ``(i, j)``, sorted by ``(i, j)``.
    """
    import faiss

    n = len(codes)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if threads:
        faiss.omp_set_num_threads(threads)
    if method == "auto":
        method = "flat" if n <= BRUTE_FORCE_MAX else "mih"
    if method == "flat":
        index = faiss.IndexBinaryFlat(HASH_BITS)
    elif method == "mih":
        chunks, bits, nflip = _index_shape(threshold)
        index = faiss.IndexBinaryMultiHash(HASH_BITS, chunks, bits)
        index.nflip = nflip
    else:
        raise ValueError(f"find_pairs: unknown method {method!r} (auto, mih or flat)")
    # Each pair once: a block of hashes joins the index, then searches it, so it meets the blocks before it and
    # itself, never the ones after it (those meet it when their turn comes): half the comparisons of one search
    # of all hashes against all.
    found_i, found_j = [], []
    for start in range(0, n, SEARCH_BLOCK):
        block = codes[start : start + SEARCH_BLOCK]
        if method == "mih":
            block = _shuffle_bits(block)
        index.add(block)
        # faiss' binary range search returns distances strictly below the radius
        lims, _, ids = index.range_search(block, threshold + 1)
        query = start + np.repeat(np.arange(len(block), dtype=np.int64), np.diff(lims).astype(np.int64))
        ids = ids.astype(np.int64)
        keep = ids < query
        found_i.append(ids[keep])
        found_j.append(query[keep])
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    order = np.lexsort((j, i))
    return i[order], j[order]


def cluster_labels(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph over ``n`` items: a label per item (singletons included)."""
    if len(i) == 0:  # no pair: every item alone
        return np.arange(n)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def clusters(paths: list[str], phashes: list[bytes], threshold: int) -> tuple[list[list[str]], int]:
    """Clusters (two or more paths, each sorted; clusters sorted by first path) of near-duplicate ``paths`` and the
    number of pairs found."""
    if not paths:
        return [], 0
    codes = np.frombuffer(b"".join(phashes), dtype=np.uint8).reshape(len(paths), HASH_BYTES)
    i, j = find_pairs(codes, threshold)
    labels = cluster_labels(len(paths), i, j)
    members: dict[int, list[str]] = {}
    for k in np.unique(np.concatenate([i, j])).tolist():  # only images in a pair are in a cluster
        members.setdefault(int(labels[k]), []).append(paths[k])
    out = sorted((sorted(m) for m in members.values()), key=lambda m: m[0])
    return out, len(i)


def describe(
    found: list[list[str]],
    pairs: int,
    mode: str,
    threshold: int,
    label_of: dict[str, str],
    split_of: dict[str, str],
    dropped: list[str],
    limit: int = 200,
) -> dict[str, Any]:
    """The manifest's ``near_duplicates``: settings, counts, and the clusters that span classes or splits (the ones
    that matter: a leak or a possible label error), at most ``limit`` of them listed."""
    notable = []
    for cluster in found:
        classes = sorted({label_of[p] for p in cluster})
        splits = sorted({split_of[p] for p in cluster if p in split_of})
        if len(classes) > 1 or len(splits) > 1:
            notable.append({"paths": cluster, "classes": classes, "splits": splits})
    return {
        "mode": mode,
        "threshold": threshold,
        "hash": DESCRIPTION,
        "pairs": pairs,
        "clusters": len(found),
        "images": sum(len(c) for c in found),
        "spanning_classes": sum(1 for c in notable if len(c["classes"]) > 1),
        "spanning_splits": sum(1 for c in notable if len(c["splits"]) > 1),
        "notable": notable[:limit],
        "notable_listed": min(limit, len(notable)),
        "dropped": dropped,
    }
