"""HiMoLE stage 1: K-means pre-clustering of the training prompts (hmora_ds.cluster).

Real inputs: the real SmolLM2-135M-Instruct (through ``tests/_assets.py``) embeds the 40 real
questions of ``tests/fixtures/sentences.txt`` (the question part of each line). The offline
training mixture is not used: when it is not already in the cache, building even a 6-per-task
subset takes ~12 s on 2 cores, more than every test here together. The silhouette choice is
checked on synthetic Gaussian blobs, where the right N is known.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hmora_ds import cluster as cl
from hmora_ds.cluster import Clustering, cluster_embeddings, cluster_prompts, embed_prompts

SENTENCES = Path(__file__).parent / "fixtures" / "sentences.txt"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, frozen float32 model) of the real SmolLM2-135M-Instruct, loaded once."""
    from hmora_ds import assets
    from hmora_ds.runtime.loading import load_base_model, load_tokenizer, resolve_checkpoint
    from tests._assets import require_asset

    path = require_asset(assets.SMOLLM2, lambda: resolve_checkpoint("smollm2-135m-instruct"))
    return load_tokenizer(path), load_base_model(path, torch.float32, "sdpa").eval()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    lines = SENTENCES.read_text(encoding="utf-8").strip().splitlines()
    return [line.split(" Answer:")[0] for line in lines]


@pytest.fixture(scope="module")
def real(smollm2, prompts):
    """cluster_prompts on the real prompts: (clustering with N=4, seed 0; embeddings)."""
    tok, model = smollm2
    return cluster_prompts(
        prompts, 4, model=model, tokenizer=tok, seed=0, batch_size=8, progress=False
    )


def blobs(n_centres: int, per: int = 25, dim: int = 16, seed: int = 0):
    """``n_centres`` well-separated Gaussian blobs: (points, planted label of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 10.0, size=(n_centres, dim))
    planted = np.repeat(np.arange(n_centres), per)
    return centres[planted] + rng.normal(0.0, 1.0, size=(planted.size, dim)), planted


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the points identically (up to renaming the clusters)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ----------------------------------------------------------------------------- 1. determinism
def test_same_seed_same_clustering_on_real_embeddings(real, prompts, smollm2):
    """Guards against K-means without a fixed random_state (or a seed that is not passed
    through): the partition that decides which experts train on which prompts would change
    between two runs of the same config, and a resumed stage 1 would disagree with the first."""
    first, emb = real
    assert emb.shape == (len(prompts), 576) and emb.dtype == np.float32
    assert first.encoder == f"base:{smollm2[1].config._name_or_path}"
    assert first.chosen_n == 4 and sum(first.sizes) == len(prompts) and min(first.sizes) >= 1
    assert set(first.silhouette) == {4}  # a fixed N still gets its score
    for again in (cluster_embeddings(emb, 4, seed=0), cluster_embeddings(emb, 4, seed=0)):
        np.testing.assert_array_equal(again.labels, first.labels)
        np.testing.assert_allclose(again.centroids, first.centroids, rtol=1e-12, atol=1e-12)
        assert again.sizes == first.sizes and again.silhouette == first.silhouette
    chosen = [cluster_embeddings(emb, range(2, 7), seed=3) for _ in range(2)]
    assert chosen[0] == chosen[1]  # the silhouette choice is reproducible as well
    other = cluster_embeddings(emb, 4, seed=1)  # may differ; must still be a valid partition
    assert other.seed == 1 and sorted(set(other.labels.tolist())) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- 2. silhouette
@pytest.mark.parametrize("planted_n", [3, 5])
def test_silhouette_picks_the_planted_number_of_groups(planted_n):
    """Guards against a wrong choice rule (the lowest score, the last candidate, an off-by-one
    between candidates and scores) and against reporting scores that are not sklearn's
    silhouette of the partition actually returned."""
    from sklearn.metrics import silhouette_score

    x, planted = blobs(planted_n)
    result = cluster_embeddings(x, range(2, 9), seed=0)
    assert result.chosen_n == planted_n
    assert set(result.silhouette) == set(range(2, 9))
    assert max(result.silhouette, key=result.silhouette.get) == planted_n
    assert result.silhouette[planted_n] == pytest.approx(silhouette_score(x, result.labels))
    assert same_partition(result.labels, planted)
    assert result.sizes == [25] * planted_n


def test_silhouette_tie_keeps_the_smaller_n(monkeypatch):
    """Guards against a tie going to the larger N (more groups, fewer examples each, for no
    gain in clustering quality)."""
    monkeypatch.setattr(cl, "silhouette_of", lambda *a, **k: 0.5)
    x, _ = blobs(4)
    assert cluster_embeddings(x, [6, 3, 5, 3], seed=0).chosen_n == 3


def test_silhouette_is_sampled_above_the_threshold():
    """Guards against the O(n²) exact silhouette on a large training set (memory and minutes):
    above ``silhouette_sample`` examples the score is sklearn's on a seeded sample; and against
    a crash when that sample misses every cluster but one."""
    from sklearn.metrics import silhouette_score

    x, _ = blobs(3, per=40)
    result = cluster_embeddings(x, 3, seed=7, silhouette_sample=50)
    expected = silhouette_score(x, result.labels, sample_size=50, random_state=7)
    assert result.silhouette[3] == pytest.approx(expected)
    assert result.silhouette[3] != pytest.approx(silhouette_score(x, result.labels), abs=1e-9)
    # a sample that holds one cluster only (here: a lone outlier left out) -> the exact score
    y = x[:60].copy()
    outside = min(set(range(60)) - set(np.random.RandomState(7).permutation(60)[:10].tolist()))
    y[outside] = 500.0
    lone = cluster_embeddings(y, 2, seed=7, silhouette_sample=10)
    assert lone.sizes == [59, 1] or lone.sizes == [1, 59]
    assert lone.silhouette[2] == pytest.approx(silhouette_score(y, lone.labels))


# ----------------------------------------------------------------------------- 3. assign
def test_assign_is_the_nearest_centroid(real):
    """Guards against ``assign`` disagreeing with training (new prompts routed to a group
    other than the one their twins trained): it must give each centroid its own index and
    reproduce sklearn KMeans' labels on the training embeddings."""
    from sklearn.cluster import KMeans

    first, emb = real
    np.testing.assert_array_equal(first.assign(first.centroids), np.arange(first.chosen_n))
    np.testing.assert_array_equal(first.assign(emb), first.labels)
    km = KMeans(n_clusters=4, n_init=cl.N_INIT, random_state=0).fit(emb.astype(np.float64))
    np.testing.assert_array_equal(first.assign(emb), km.labels_)
    x, _ = blobs(5)
    synthetic = cluster_embeddings(x, 5, seed=2)
    assert synthetic.assign(x).dtype == np.int64
    np.testing.assert_array_equal(synthetic.assign(x), synthetic.labels)
    np.testing.assert_array_equal(synthetic.assign(synthetic.centroids), np.arange(5))


# ----------------------------------------------------------------------------- 4. save / load
def test_save_load_round_trip_and_corrupt_files(real, tmp_path):
    """Guards against losing or altering anything across save/load (labels, centroids to the
    last bit, silhouette keys turned into strings), against a half-written file under the real
    name, and against a corrupt file surfacing as a traceback instead of one line naming it."""
    first, _ = real
    path = tmp_path / "clusters.json"
    first.save(path)
    first.save(path)  # overwriting works, and leaves no temporary file behind
    assert [p.name for p in tmp_path.iterdir()] == ["clusters.json"]
    back = Clustering.load(path)
    assert back == first
    np.testing.assert_array_equal(back.labels, first.labels)
    assert back.labels.dtype == np.int64
    np.testing.assert_array_equal(back.centroids, first.centroids)
    assert back.sizes == first.sizes and back.silhouette == first.silhouette
    assert all(isinstance(k, int) for k in back.silhouette)
    assert (back.chosen_n, back.seed, back.encoder) == (first.chosen_n, first.seed, first.encoder)
    assert back.summary() == first.summary()

    text = path.read_text()
    broken = {"truncated.json": text[: len(text) // 2], "empty.json": ""}
    data = json.loads(text)
    data["labels"][0] = 99
    broken["bad_label.json"] = json.dumps(data)
    broken["list.json"] = "[1, 2]"
    broken["silhouette_list.json"] = json.dumps({**json.loads(text), "silhouette": [0.5]})
    for name, content in broken.items():
        (tmp_path / name).write_text(content)
    for name in [*broken, "missing.json"]:
        with pytest.raises(ValueError) as err:
            Clustering.load(tmp_path / name)
        message = str(err.value)
        assert "\n" not in message and str(tmp_path / name) in message, message


# ----------------------------------------------------------------------------- 5. embedding
def _three_ways(tok, model, texts):
    """Embeddings with right padding (batch 8), left padding (batch 8), no padding (batch 1)."""
    side = tok.padding_side
    out = []
    try:
        for pad, batch in (("right", 8), ("left", 8), ("right", 1)):
            tok.padding_side = pad
            out.append(
                embed_prompts(texts, model=model, tokenizer=tok, batch_size=batch, progress=False)
            )
    finally:
        tok.padding_side = side
    return out


def test_embed_prompts_ignores_padding(smollm2, prompts):
    """Guards against padding leaking into the mean (pad tokens counted, or left padding
    shifting the positions of the real tokens): the padding side and the batch size would then
    change every embedding, and so the clusters.

    float32: within 1e-5 plus 1e-5 relative. SmolLM2 has hidden dimensions near 30, where
    float32 values are 1.9e-6 apart; batch 1 vs 8 differs there by up to ~5e-5 (~1.7e-6
    relative: a different summation order), while a leak moves values by 1e-2 or more.
    float64 (output still float32): the three runs agree to float32 rounding, so no leak hides
    under the float32 tolerance.
    """
    tok, model = smollm2
    # Very different lengths, so every batch of 8 pads most rows.
    texts = [prompts[0], "Hi", prompts[3] + " " + prompts[4] + " " + prompts[5], "Why?"]
    texts += prompts[10:14]
    lengths = {len(tok(t)["input_ids"]) for t in texts}
    assert max(lengths) > 3 * min(lengths)
    right, left, one = _three_ways(tok, model, texts)
    assert right.shape == (len(texts), model.config.hidden_size) and right.dtype == np.float32
    assert np.isfinite(right).all()
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one, right, rtol=1e-5, atol=1e-5)
    # batch of one, no padding: the plain mean of the model's own last hidden state
    ids = tok(texts[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0).numpy()
    np.testing.assert_allclose(one[2], ref, rtol=1e-5, atol=1e-5)
    try:
        model.to(torch.float64)  # float32 -> float64 -> float32 is exact
        right, left, one = _three_ways(tok, model, texts[:4])
    finally:
        model.to(torch.float32)
    # float32 output: equal up to the rounding of the float64 value (a few 1e-7 relative)
    np.testing.assert_allclose(left, right, rtol=3e-7, atol=1e-9)
    np.testing.assert_allclose(one, right, rtol=3e-7, atol=1e-9)


def test_embed_prompts_restores_the_model_mode(smollm2, prompts):
    """Guards against stage 1 leaving the base model in eval mode (or training mode) for the
    caller: it runs in eval mode and puts every module back as it was."""
    tok, model = smollm2
    model.train()
    try:
        embed_prompts(prompts[:2], model=model, tokenizer=tok, progress=False)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


# ----------------------------------------------------------------------------- 6. bad inputs
X, _ = blobs(3, per=4)  # 12 points, 16-D
BAD_CLUSTER = {
    "N < 1": (X, 0, {}, r"^n_groups: N=0 < 1"),
    "N > n": (X, 13, {}, r"^n_groups: N=13 is more than the 12 examples"),
    "N > distinct": (np.repeat(X[:3], 4, axis=0), 4, {}, r"^n_groups: .*3 distinct embeddings"),
    "above max_groups": (X, range(2, 9), {"max_groups": 4}, r"^n_groups: N=8 .*max_groups=4"),
    "fixed above max_groups": (X, 5, {"max_groups": 4}, r"^n_groups: N=5 .*max_groups=4"),
    "range with 1": (X, range(1, 4), {}, r"^n_groups: .*N >= 2"),
    "range up to n": (X, range(2, 13), {}, r"^n_groups: N=12 .*at most 11"),
    "empty range": (X, range(2, 2), {}, r"^n_groups: the candidate range is empty"),
    "float N": (X, 2.5, {}, r"^n_groups: 2\.5 is neither"),
    "1-D": (X[0], 2, {}, r"^embeddings: expected a 2-D"),
    "3-D": (X[None], 2, {}, r"^embeddings: expected a 2-D"),
    "NaN": (np.where(np.arange(12)[:, None] == 5, np.nan, X), 2, {}, r"^embeddings: 1 row.*row 5"),
    "inf": (np.where(np.arange(12)[:, None] == 0, np.inf, X), 2, {}, r"^embeddings: .*NaN or inf"),
    "empty": (np.zeros((0, 16)), 2, {}, r"^embeddings: empty"),
    "strings": ([["a", "b"]], 1, {}, r"^embeddings: not a numeric"),
    "seed": (X, 2, {"seed": -1}, r"^seed: "),
    "max_groups 0": (X, 2, {"max_groups": 0}, r"^max_groups: 0 < 1"),
}


@pytest.mark.parametrize("case", list(BAD_CLUSTER))
def test_bad_cluster_input_is_one_line_naming_the_argument(case):
    """Guards against bad inputs failing deep inside sklearn (or silently clustering NaN) with
    a traceback that does not say which argument to fix."""
    x, n_groups, kw, pattern = BAD_CLUSTER[case]
    with pytest.raises(ValueError, match=pattern) as err:
        cluster_embeddings(x, n_groups, **kw)
    assert "\n" not in str(err.value)


BAD_EMBED = {
    "no prompts": ([], {}, ValueError, r"^prompts: empty"),
    "a string": ("one prompt", {}, ValueError, r"^prompts: expected a sequence"),
    "blank prompt": (["ok", "  "], {}, ValueError, r"^prompts: item 1"),
    "no model": (["ok"], {}, ValueError, r"^model, tokenizer: encoder='base'"),
    "batch_size": (["ok"], {"batch_size": 0}, ValueError, r"^batch_size: 0"),
    "max_tokens": (["ok"], {"max_tokens": -3}, ValueError, r"^max_tokens: -3"),
    "no sentence-transformers": (
        ["ok"],
        {"encoder": "sentence-transformers/all-MiniLM-L6-v2"},
        ImportError,
        r"pip install sentence-transformers",
    ),
}


@pytest.mark.parametrize("case", list(BAD_EMBED))
def test_bad_embed_input_is_one_line(case, monkeypatch):
    """Guards against a missing model, an empty prompt or the absent optional package failing
    with a traceback from deep inside the tokenizer (or an import at module load)."""
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    prompts, kw, exc, pattern = BAD_EMBED[case]
    with pytest.raises(exc, match=pattern) as err:
        embed_prompts(prompts, progress=False, **kw)
    assert "\n" not in str(err.value)


def test_assign_rejects_other_dimensions():
    """Guards against routing prompts embedded by another encoder (another hidden size)."""
    x, _ = blobs(3, per=4)
    c = cluster_embeddings(x, 3)
    with pytest.raises(ValueError, match=r"^embeddings: 8 columns but the centroids have 16"):
        c.assign(np.zeros((2, 8)))
