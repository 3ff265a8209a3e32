"""Deduplication: exact duplicates, and near-duplicates by MinHash.

Texts are compared after `normalize_text`: Unicode NFKC, casefold, whitespace runs -> one space.

Near-duplicates use the Jaccard similarity of character k-gram ("shingle") sets,
    J(A, B) = |A ∩ B| / |A ∪ B|,
with k = 5 characters (works for any script, including those written without spaces).
MinHash makes finding similar pairs cheap: for a random hash function h,
    P[min_{a in A} h(a) == min_{b in B} h(b)] = J(A, B),
so each of the P signature entries (P = num_perm hash functions) agrees with probability J.
Locality-sensitive hashing splits the signature into b bands of r rows (b r = P); two texts become
candidates when all r entries of at least one band agree, with probability 1 - (1 - J^r)^b
(r is chosen so that this is >= 0.995 at the threshold). Every candidate is then confirmed with
its exact Jaccard, so an example is only ever removed when a kept example really is within the
threshold, and running dedup again removes nothing (the relation is pairwise and deterministic).

Hash family: h(x) = (a x + c) mod 2^64, top 32 bits, with odd a (multiply-shift hashing);
shingles are hashed by a rolling polynomial over code points, then mixed with splitmix64.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

SHINGLE = 5
_WS = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    return _WS.sub(" ", unicodedata.normalize("NFKC", s).casefold()).strip()


def prompt_text(ex) -> str:
    """The prompt as one string: messages become "role: content" lines."""
    if isinstance(ex.prompt, str):
        return ex.prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in ex.prompt)


def example_text(ex) -> str:
    """What dedup compares: the normalized prompt and completion (a preference pair: both answers)."""
    answers = getattr(ex, "answers", (ex.completion,))
    return normalize_text(prompt_text(ex)) + "".join("\n" + normalize_text(a) for a in answers)


def text_hash(s: str) -> bytes:
    return hashlib.sha1(s.encode("utf-8")).digest()


# ---------------------------------------------------------------------------------------- MinHash
def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, k: int = SHINGLE) -> np.ndarray:
    """Sorted unique 64-bit hashes of the k-character shingles of `text` (the whole text if shorter)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # (n,) code points
    n = cp.shape[0]
    if n < k:
        k = max(n, 1)
        cp = cp if n else np.zeros(1, dtype=np.uint64)
        n = cp.shape[0]
    h = np.zeros(n - k + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):  # h_i = sum_j cp[i+j] * 1000003^(k-1-j)  (mod 2^64)
            h = h * np.uint64(1000003) + cp[j : n - k + 1 + j]
        h = _splitmix64(h + np.uint64(k))
    return np.unique(h)


def minhash_signature(hashes: np.ndarray, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(P,) minima of the P hash functions over one text's shingle hashes (S,)."""
    sig = np.full(a.shape[0], np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, hashes.shape[0], 4096):  # chunks bound memory at (P, 4096) for long texts
            chunk = hashes[None, s : s + 4096]  # (1, S')
            values = (a[:, None] * chunk + c[:, None]) >> np.uint64(32)  # (P, S')
            sig = np.minimum(sig, values.min(axis=1))
    return sig


def _rows_per_band(num_perm: int, threshold: float) -> int:
    """The largest r dividing num_perm whose candidate probability at the threshold is >= 0.995."""
    best = 1
    for r in range(1, num_perm + 1):
        if num_perm % r == 0 and 1 - (1 - threshold**r) ** (num_perm // r) >= 0.995:
            best = r
    return best


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).shape[0]
    return inter / (a.shape[0] + b.shape[0] - inter)


@dataclass
class DedupReport:
    n_in: int = 0
    n_kept: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    pairs: list[tuple[str, str, float]] = field(default_factory=list)  # (removed, kept by, J), first 20


def dedup(examples, near_threshold: float | None = 0.9, num_perm: int = 128, seed: int = 0):
    """Remove exact duplicates (normalized text) and near-duplicates (Jaccard >= near_threshold).

    Keeps the first occurrence; order is preserved. near_threshold=None disables the near pass.
    Returns (kept, DedupReport).
    """
    if near_threshold is not None and not 0.0 < near_threshold <= 1.0:
        raise ValueError(f"near_threshold must be in (0, 1], got {near_threshold}.")
    report = DedupReport(n_in=len(examples))
    texts = [example_text(ex) for ex in examples]
    seen: dict[bytes, int] = {}
    survivors = []
    for i, t in enumerate(texts):
        key = text_hash(t)
        if key in seen:
            report.exact_removed += 1
            if len(report.pairs) < 20:
                report.pairs.append((examples[i].source, examples[seen[key]].source, 1.0))
            continue
        seen[key] = i
        survivors.append(i)

    if near_threshold is not None and survivors:
        rng = np.random.default_rng(seed)
        a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        c = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        r = _rows_per_band(num_perm, near_threshold)
        buckets: dict[tuple[int, bytes], list[int]] = {}
        shingles: dict[int, np.ndarray] = {}
        kept = []
        for i in survivors:
            sh = shingle_hashes(texts[i])
            sig = minhash_signature(sh, a, c)  # (P,)
            keys = [(band, sig[band * r : (band + 1) * r].tobytes()) for band in range(num_perm // r)]
            candidates = dict.fromkeys(j for key in keys for j in buckets.get(key, ()))
            match = next(((j, jv) for j in candidates if (jv := jaccard(sh, shingles[j])) >= near_threshold), None)
            if match is not None:
                report.near_removed += 1
                if len(report.pairs) < 20:
                    report.pairs.append((examples[i].source, examples[match[0]].source, round(match[1], 4)))
                continue
            kept.append(i)
            shingles[i] = sh
            for key in keys:
                buckets.setdefault(key, []).append(i)
        survivors = kept
    report.n_kept = len(survivors)
    return [examples[i] for i in survivors], report
