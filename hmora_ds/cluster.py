"""K-means pre-clustering of the training prompts: stage 1 of HiMoLE's two-stage training.

HiMoLE embeds every training prompt with a sentence encoder, clusters the embeddings with
K-means into ``N`` groups, and trains group ``g`` of LoRA experts on cluster ``g`` before the
global fine-tuning stage. ``N`` is either fixed or chosen by the silhouette coefficient over a
range of candidates (the authors' rebuttal: "We selected the optimal k based on the Silhouette
Coefficient"); the caller bounds it with ``max_groups`` (e.g. ``16 // M`` so that at most 16
experts exist in all).

* :func:`embed_prompts`: ``encoder="base"`` mean-pools the last hidden state of the frozen base
  causal LM over each prompt's real tokens (padding excluded, position ids counted from the
  first real token, so the tokenizer's padding side and the batch size do not change the
  result); any other ``encoder`` is a sentence-transformers model name or path (the package is
  imported only then and is not a dependency of this project).
* :func:`cluster_embeddings`: K-means (scikit-learn) with a fixed ``N`` or the silhouette choice.
* :class:`Clustering`: labels, centroids, sizes and silhouette scores; :meth:`Clustering.assign`
  sends new prompts to the nearest centroid; saved as one JSON file.

Choices this module makes:

* ``KMeans(n_init=10)``, not ``"auto"`` (a single k-means++ start in scikit-learn >= 1.4): the
  silhouette choice compares the best partition found for each ``N``, and one start can land in
  a poor local optimum for one ``N`` and not another, flipping the choice with the seed. Ten
  starts cost little next to embedding the prompts (the paper puts all of stage 1 under 2% of
  training time).
* The silhouette is computed on all examples up to :data:`SILHOUETTE_SAMPLE` (5000) of them and
  on a seeded sample of that many above it (``silhouette_score(sample_size=…, random_state=
  seed)``): the exact score needs all n² pairwise distances (~2 GB and minutes at n = 20 000).
* Prompts are embedded as raw text, without the chat template: the template's fixed system
  prompt is the same for every prompt and would dominate a mean over the tokens.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmora_ds.runtime.errors import first_line

logger = logging.getLogger(__name__)

#: ``KMeans(n_init=…)``: independent k-means++ starts per N (see the module docstring).
N_INIT = 10
#: Above this many examples the silhouette is computed on a seeded sample of this size.
SILHOUETTE_SAMPLE = 5000
#: Version of the JSON file :meth:`Clustering.save` writes.
FORMAT_VERSION = 1


def _sklearn() -> Any:
    try:
        import sklearn.cluster
        import sklearn.metrics
    except ImportError:
        raise ImportError(
            "hmora_ds.cluster needs scikit-learn: pip install scikit-learn "
            "(or the project's [analysis] extra)"
        ) from None
    return sklearn


# ----------------------------------------------------------------------------- the result
@dataclass(eq=False)
class Clustering:
    """A K-means partition of the training prompts.

    Attributes:
        labels: (n_examples,) int64, the cluster of each training example.
        centroids: (N, D) float64 cluster centres.
        sizes: examples per cluster (length N, every one >= 1).
        silhouette: silhouette score per candidate N tried; also the fixed N's score when
            2 <= N < n_examples (empty when it is undefined: N = 1 or one example per cluster).
        chosen_n: N.
        seed: ``random_state`` of K-means (and of the silhouette sample).
        encoder: what made the embeddings (``base:<model>`` or a sentence-transformers path).
    """

    labels: np.ndarray
    centroids: np.ndarray
    sizes: list[int]
    silhouette: dict[int, float]
    chosen_n: int
    seed: int
    encoder: str

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Clustering):
            return NotImplemented
        return (
            np.array_equal(self.labels, other.labels)
            and self.centroids.shape == other.centroids.shape
            and np.array_equal(self.centroids, other.centroids)
            and self.sizes == other.sizes
            and self.silhouette == other.silhouette
            and (self.chosen_n, self.seed, self.encoder)
            == (other.chosen_n, other.seed, other.encoder)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        """(n,) int64 index of the nearest centroid (Euclidean; ties: the lower index) of each
        row of (n, D) ``embeddings`` — the cluster of new prompts embedded the same way."""
        x = _check_embeddings(embeddings, "embeddings")
        if x.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"embeddings: {x.shape[1]} columns but the centroids have "
                f"{self.centroids.shape[1]}; embed with the same encoder ({self.encoder})"
            )
        return _nearest(x, self.centroids.astype(np.float64))

    def save(self, path: str | os.PathLike) -> None:
        """Write the clustering to ``path`` as JSON (a temporary file beside it, synced, then
        renamed: a crash never leaves a half-written file under the name)."""
        path = Path(path)
        data = {
            "kind": "hmora_ds.cluster",
            "format": FORMAT_VERSION,
            "chosen_n": int(self.chosen_n),
            "seed": int(self.seed),
            "encoder": self.encoder,
            "sizes": [int(s) for s in self.sizes],
            "silhouette": {str(int(k)): float(v) for k, v in sorted(self.silhouette.items())},
            "centroids": np.asarray(self.centroids, dtype=np.float64).tolist(),
            "labels": np.asarray(self.labels, dtype=np.int64).tolist(),
        }
        text = json.dumps(data, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Clustering:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: one line naming ``path``: missing, unreadable, not JSON, or not a
                consistent clustering.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"clustering file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"clustering file {path} cannot be read as JSON ({first_line(err)})"
            ) from None
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"missing field {err}" if isinstance(err, KeyError) else first_line(err)
            raise ValueError(
                f"clustering file {path} is not a saved clustering ({what}); write it with "
                "Clustering.save"
            ) from None

    @classmethod
    def _from_dict(cls, data: Any) -> Clustering:
        if not isinstance(data, dict) or data.get("kind") != "hmora_ds.cluster":
            raise ValueError("no 'kind': 'hmora_ds.cluster'")
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r}, this version reads {FORMAT_VERSION}")
        n = data["chosen_n"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"chosen_n {n!r} is not a positive integer")
        centroids = np.asarray(data["centroids"], dtype=np.float64)
        labels = np.asarray(data["labels"], dtype=np.int64)
        sizes = [int(s) for s in data["sizes"]]
        if centroids.ndim != 2 or centroids.shape[0] != n or not np.isfinite(centroids).all():
            raise ValueError(f"centroids of shape {centroids.shape}, expected ({n}, D) finite")
        if labels.ndim != 1 or labels.size == 0 or labels.min() < 0 or labels.max() >= n:
            raise ValueError(f"labels must be a non-empty list of clusters 0..{n - 1}")
        if sizes != np.bincount(labels, minlength=n).tolist():
            raise ValueError("sizes do not match the labels")
        silhouette = {int(k): float(v) for k, v in data["silhouette"].items()}
        encoder = data["encoder"]
        if not isinstance(encoder, str):
            raise ValueError("encoder is not a string")
        return cls(labels, centroids, sizes, silhouette, n, int(data["seed"]), encoder)

    def summary(self) -> str:
        """One line: the chosen N, how it was chosen, cluster sizes and silhouette per N."""
        if len(self.silhouette) > 1:
            how = "by silhouette"
        elif self.silhouette:
            how = "fixed"
        else:
            how = "fixed, silhouette undefined"
        scores = ", ".join(
            f"{k}: {v:.3f}{'*' if k == self.chosen_n else ''}"
            for k, v in sorted(self.silhouette.items())
        )
        line = f"K-means N={self.chosen_n} ({how}), sizes {list(self.sizes)}"
        if scores:
            line += f", silhouette {{{scores}}}"
        return f"{line}, {len(self.labels)} examples, seed {self.seed}, encoder {self.encoder}"


# ----------------------------------------------------------------------------- clustering
def _check_embeddings(embeddings: Any, name: str) -> np.ndarray:
    """``embeddings`` as a finite (n >= 1, D >= 1) float64 array, or a one-line ValueError."""
    try:
        x = np.asarray(embeddings, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name}: not a numeric (n, D) array ({first_line(err)}); pass one row per prompt"
        ) from None
    if x.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D (n, D) array, got shape {x.shape}; "
            "one embedding per row (x.reshape(1, -1) for a single one)"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty (shape {x.shape}); give at least one non-empty row")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(
            f"{name}: {rows.size} row(s) hold NaN or inf (first: row {rows[0]}); "
            "drop or re-embed them"
        )
    return x


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each row (squared Euclidean; ties: the lower index)."""
    d = (x * x).sum(1, keepdims=True) - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)
    return d.argmin(axis=1).astype(np.int64)


def _check_n(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}: {value!r} is not an integer number of groups")
    return int(value)


def _candidates(n_groups: Any, n: int, n_distinct: int, max_groups: int | None) -> list[int]:
    """The candidate Ns, validated: one fixed N, or a sorted, deduplicated range."""
    fixed = isinstance(n_groups, int | np.integer) and not isinstance(n_groups, bool)
    if fixed:
        cands = [int(n_groups)]
    elif isinstance(n_groups, Sequence | np.ndarray) and not isinstance(n_groups, str | bytes):
        cands = sorted({_check_n(v, "n_groups") for v in n_groups})
        if not cands:
            raise ValueError("n_groups: the candidate range is empty; give e.g. range(2, 9)")
    else:
        raise ValueError(
            f"n_groups: {n_groups!r} is neither an integer (a fixed N) nor a sequence of "
            "candidates such as range(2, 9)"
        )
    if max_groups is not None:
        max_groups = _check_n(max_groups, "max_groups")
        if max_groups < 1:
            raise ValueError(f"max_groups: {max_groups} < 1; give at least 1 (or None)")
    low = min(cands)
    if low < 1:
        raise ValueError(f"n_groups: N={low} < 1; every N must be at least 1")
    high = max(cands)
    if max_groups is not None and high > max_groups:
        raise ValueError(
            f"n_groups: N={high} is above max_groups={max_groups} "
            "(e.g. N*M <= 16 experts); lower the candidates"
        )
    if high > n:
        raise ValueError(
            f"n_groups: N={high} is more than the {n} examples; give N <= {n} or more prompts"
        )
    if high > n_distinct:
        raise ValueError(
            f"n_groups: N={high} is more than the {n_distinct} distinct embeddings (of {n} "
            f"examples); K-means would leave a cluster empty: give N <= {n_distinct}"
        )
    if not fixed:
        if low < 2:
            raise ValueError(
                "n_groups: a candidate range needs every N >= 2 (the silhouette of one "
                "cluster is undefined); give n_groups=1 for a single group"
            )
        if high >= n:
            raise ValueError(
                f"n_groups: N={high} leaves one example per cluster, where the silhouette is "
                f"undefined; candidates must be at most {n - 1}"
            )
    return cands


def silhouette_of(
    embeddings: np.ndarray, labels: np.ndarray, *, seed: int = 0, sample: int = SILHOUETTE_SAMPLE
) -> float:
    """scikit-learn's silhouette score of ``labels``; on a seeded sample of ``sample`` rows when
    there are more (its ``sample_size`` and ``random_state``: every candidate N of one call is
    scored on the same rows). A sample that misses all clusters but one (a tiny cluster) falls
    back to the exact score."""
    sk = _sklearn()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.shape[0] > sample:
        rows = np.random.RandomState(seed).permutation(x.shape[0])[:sample]
        if np.unique(labels[rows]).size >= 2:
            return float(
                sk.metrics.silhouette_score(x, labels, sample_size=sample, random_state=seed)
            )
    return float(sk.metrics.silhouette_score(x, labels))


def cluster_embeddings(
    embeddings: np.ndarray,
    n_groups: int | Sequence[int],
    *,
    seed: int = 0,
    max_groups: int | None = None,
    encoder: str = "embeddings",
    n_init: int = N_INIT,
    silhouette_sample: int = SILHOUETTE_SAMPLE,
) -> Clustering:
    """K-means of (n, D) ``embeddings`` into a fixed N, or the N of a candidate range with the
    highest silhouette (ties: the smaller N).

    Args:
        embeddings: one finite row per training example.
        n_groups: an integer (fixed N), or candidates such as ``range(2, 9)`` (each >= 2).
        seed: ``random_state`` of K-means and of the silhouette sample.
        max_groups: the largest N allowed (e.g. ``16 // experts_per_group``); None: no bound.
        encoder: what made the embeddings, recorded in the result.
        n_init: k-means++ starts per N (see the module docstring for why 10).
        silhouette_sample: above this many examples the silhouette uses a seeded sample.

    Raises:
        ValueError: one line naming the argument and the fix (bad shape, NaN/inf, empty input,
            N < 1, N above the number of examples or of distinct embeddings, N above
            ``max_groups``, a candidate range with N < 2).
    """
    sk = _sklearn()
    x = _check_embeddings(embeddings, "embeddings")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: {seed!r} must be an integer in [0, 2**32)")
    seed = int(seed)
    n = x.shape[0]
    n_distinct = np.unique(x, axis=0).shape[0]
    cands = _candidates(n_groups, n, n_distinct, max_groups)

    fits: dict[int, Any] = {}
    scores: dict[int, float] = {}
    for k in cands:
        km = sk.cluster.KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
        fits[k] = km
        if 2 <= k < n:
            scores[k] = silhouette_of(x, km.labels_, seed=seed, sample=silhouette_sample)
    chosen = cands[0]
    for k in cands[1:]:
        if scores[k] > scores[chosen]:  # strict: a tie keeps the smaller N
            chosen = k
    km = fits[chosen]
    labels = np.asarray(km.labels_, dtype=np.int64)
    sizes = np.bincount(labels, minlength=chosen).tolist()
    if min(sizes) == 0:  # guarded by the distinct-point check; never train an empty group
        raise RuntimeError(f"K-means left a cluster empty (sizes {sizes}) for N={chosen}")
    result = Clustering(
        labels=labels,
        centroids=np.asarray(km.cluster_centers_, dtype=np.float64),
        sizes=sizes,
        silhouette=scores,
        chosen_n=chosen,
        seed=seed,
        encoder=encoder,
    )
    logger.info("%s", result.summary())
    return result


# ----------------------------------------------------------------------------- embedding
def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("prompts: expected a sequence of strings (a list of prompts)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts: item {i} is {p!r}, not a non-empty string")
    return prompts


def _device_of(model: torch.nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _embed_base(
    prompts: list[str],
    model: Any,
    tokenizer: Any,
    batch_size: int,
    max_tokens: int,
    device: torch.device,
    progress: bool,
) -> np.ndarray:
    from tqdm.auto import tqdm

    if model is None or tokenizer is None:
        raise ValueError(
            "model, tokenizer: encoder='base' mean-pools the frozen base model's last hidden "
            "state; pass model= (a Hugging Face causal LM) and its tokenizer="
        )
    have = _device_of(model)
    if have is not None and (have.type, have.index or 0) != (device.type, device.index or 0):
        raise ValueError(
            f"device: the model is on {have} but device={str(device)!r}; pass device="
            f"{str(have)!r} (or move the model)"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: has no pad token; set tokenizer.pad_token (e.g. to eos)")
    # The bare decoder (LlamaModel of a LlamaForCausalLM): its last_hidden_state is the normed
    # output the LM head reads, and no (batch, tokens, vocab) logits are computed.
    body = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else model

    # Longest first, so the batches carry little padding; the order is restored at the end.
    lengths = [
        len(ids) for ids in tokenizer(prompts, truncation=True, max_length=max_tokens)["input_ids"]
    ]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(f"prompts: item {empty[0]} has no tokens; drop empty prompts")
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    rows: list[np.ndarray] = []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for idx in tqdm(chunks, desc="embed prompts", unit="batch", disable=not progress):
                enc = tokenizer(
                    [prompts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_tokens,
                    return_tensors="pt",
                )
                ids = enc["input_ids"].to(device)
                mask = enc["attention_mask"].to(device)
                # Positions count real tokens only: left padding does not shift the prompt.
                positions = (mask.long().cumsum(1) - 1).clamp(min=0)
                hidden = body(
                    input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
                ).last_hidden_state
                keep = mask.bool().unsqueeze(-1)
                # where, not a product: a padded row may hold NaN (a fully masked softmax).
                h = hidden if hidden.dtype == torch.float64 else hidden.float()
                summed = torch.where(keep, h, 0.0).sum(1)
                count = mask.sum(1, keepdim=True).to(h.dtype)
                rows.append((summed / count).cpu().numpy().astype(np.float32))
    finally:
        for m, mode in modes:  # each module's own mode back, as the caller had it
            m.training = mode
    out = np.empty((len(prompts), rows[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(rows)
    return out


def _embed_sentence_transformers(
    prompts: list[str],
    encoder: str,
    batch_size: int,
    max_tokens: int,
    device: torch.device,
    progress: bool,
) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(
            f"encoder: {encoder!r} is a sentence-transformers model, but the package is not "
            "installed; pip install sentence-transformers (or use encoder='base')"
        ) from None
    st = SentenceTransformer(encoder, device=str(device))
    if st.max_seq_length is None or st.max_seq_length > max_tokens:
        st.max_seq_length = max_tokens
    emb = st.encode(
        prompts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True
    )
    return np.asarray(emb, dtype=np.float32)


def embed_prompts(
    prompts: Sequence[str],
    *,
    encoder: str = "base",
    model: Any = None,
    tokenizer: Any = None,
    batch_size: int = 16,
    max_tokens: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """(n, hidden) float32 embeddings of ``prompts`` (raw text, no chat template).

    ``encoder="base"``: the masked mean over each prompt's tokens (at most ``max_tokens``, cut
    on the tokenizer's truncation side) of the last hidden state of ``model`` (a frozen Hugging
    Face causal LM, already on ``device``) under ``torch.no_grad()`` in eval mode (its training
    mode is restored afterwards). Any other ``encoder`` is a sentence-transformers model name
    or path.

    Raises:
        ValueError: one line naming the argument (no prompts, an empty prompt, a missing model
            or tokenizer, a bad batch size or token limit, a model on another device).
        ImportError: a sentence-transformers encoder without the package installed.
    """
    texts = _check_prompts(prompts)
    for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {value!r} must be a positive integer")
    if not isinstance(encoder, str) or not encoder.strip():
        raise ValueError("encoder: give 'base' or a sentence-transformers model name or path")
    dev = torch.device(device)
    if encoder == "base":
        emb = _embed_base(texts, model, tokenizer, batch_size, max_tokens, dev, progress)
    else:
        emb = _embed_sentence_transformers(texts, encoder, batch_size, max_tokens, dev, progress)
    if not np.isfinite(emb).all():
        raise ValueError(
            f"encoder: {describe_encoder(encoder, model)} gave NaN/inf embeddings; "
            "run the encoder in float32"
        )
    return emb


def describe_encoder(encoder: str = "base", model: Any = None) -> str:
    """What :attr:`Clustering.encoder` records: ``base:<model name or path>`` or ``encoder``."""
    if encoder != "base":
        return encoder
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None)
    return f"base:{name or type(model).__name__}"


def cluster_prompts(
    prompts: Sequence[str],
    n_groups: int | Sequence[int],
    *,
    encoder: str = "base",
    model: Any = None,
    tokenizer: Any = None,
    seed: int = 0,
    max_groups: int | None = None,
    **embed_kw: Any,
) -> tuple[Clustering, np.ndarray]:
    """:func:`embed_prompts` then :func:`cluster_embeddings`; returns the clustering and the
    (n, hidden) embeddings (keep them to cluster again with another N without re-embedding)."""
    emb = embed_prompts(prompts, encoder=encoder, model=model, tokenizer=tokenizer, **embed_kw)
    result = cluster_embeddings(
        emb, n_groups, seed=seed, max_groups=max_groups, encoder=describe_encoder(encoder, model)
    )
    return result, emb
