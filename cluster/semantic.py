"""Semantic diversity and prompt relevance of a prompt's responses, with a local sentence encoder.

The encoder is WordLlama's 256-d `l2_supercat` model (token embeddings taken from LLM embedding tables, average
pooled; ~16 MB, shipped inside the PyPI wheel, so nothing is downloaded). It is not the policy and not the
training signal, which is what makes it usable for judging PowerFlow's flattening (alpha < 1):
- `semantic_diversity`: mean pairwise cosine distance (1 - cos) between the responses' embeddings; higher means
  the responses say different things, not just use different words (distinct-n measures the words);
- `relevance`: mean cosine similarity between the prompt's embedding and each response's: a quality proxy that
  falls when flattening drifts off topic or into noise.
Empty responses have no embedding and are left out; fewer than two non-empty responses give NaN diversity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SEMANTIC_METRICS = ("semantic_diversity", "relevance")


class SentenceEncoder:
    """WordLlama from the files in its own package (its loader looks for the tokenizer in a directory the wheel
    does not have, then tries the network; pointing its cache at the package directory avoids both)."""

    def __init__(self) -> None:
        import wordllama

        package = Path(wordllama.__file__).parent
        self.model: Any = wordllama.WordLlama.load(cache_dir=package, disable_download=True)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, one row per text (rows of zeros for texts with no tokens)."""
        vectors = np.asarray(self.model.embed(list(texts), norm=False), dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)

    def metrics(self, prompt: str, responses: Sequence[str]) -> dict[str, float]:
        """`semantic_diversity` and `relevance` of one prompt's responses."""
        kept = [r for r in responses if r.strip()]
        if not kept:
            return dict.fromkeys(SEMANTIC_METRICS, math.nan)
        vectors = self.embed([prompt, *kept])
        return {
            "semantic_diversity": semantic_diversity(vectors[1:]),
            "relevance": float(np.mean(vectors[1:] @ vectors[0])),
        }


def semantic_diversity(unit_vectors: np.ndarray) -> float:
    """Mean of 1 - cos over all pairs of rows (NaN for fewer than two rows)."""
    n = len(unit_vectors)
    if n < 2:
        return math.nan
    cos = unit_vectors @ unit_vectors.T
    off_diagonal = (cos.sum() - np.trace(cos)) / (n * (n - 1))
    return float(1.0 - off_diagonal)
