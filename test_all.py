"""
test_all.py -- nanoTIGER's specification: `python -m pytest -q test_all.py` (minutes on a CPU).

Every test is seeded and pins one behaviour with values that would catch a real bug (each was
checked by breaking the code on purpose). Part I follows the reading: data.py, rqvae.py, tiger.py
(model, decoding, training), eval.py, then end to end on a slice of Beauty; Part II is the
workshop: settings, files and artefacts, runs (resume, overwrite, faults), the report.
"""
import copy
import errno
import glob
import itertools
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the test log (set before tqdm is used)
import data  # noqa: E402
import eval as evaluation  # noqa: E402  (eval.py; the name would shadow the builtin)
import prepare  # noqa: E402
import rqvae  # noqa: E402
import tiger  # noqa: E402
from baselines import sasrec  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ==============================================================================================
# Part I. The method, chapter by chapter

# ==============================================================================================
# 1. data.py: the dataset and the leave-one-out split

@pytest.fixture(scope="module")
def beauty():
    return data.load_dataset("beauty")


@pytest.mark.parametrize("name, users, items, interactions, mean_len", [
    ("beauty", 22363, 12101, 198502, 8.88),   # paper Table 6 (it prints 8.87, truncated)
    ("sports", 35598, 18357, 296337, 8.32),
    ("toys", 19412, 11924, 167597, 8.63),
])
def test_dataset_counts_match_paper_table6(name, users, items, interactions, mean_len):
    ds = data.load_dataset(name)
    lengths = np.array([len(s) for s in ds.sequences])
    assert (len(ds.users), ds.n_items, lengths.sum()) == (users, items, interactions)
    assert round(lengths.mean(), 2) == mean_len and np.median(lengths) == 6
    assert ds.item_emb.shape == (items, 768) and ds.item_emb.dtype == np.float32
    train, valid, test = data.split(ds)
    # one validation and one test example per user; every training prefix with at least one history item
    assert len(valid) == len(test) == users
    assert len(train) == interactions - 3 * users


def test_split_never_leaks_the_future(beauty):
    train, valid, test = data.split(beauty)
    for ex in (train, valid, test):
        seqs = [beauty.sequences[u] for u in ex.user]
        for i in range(0, len(ex), 97):  # a spread-out sample of examples, all three splits
            seq, t, n = seqs[i], ex.position[i], ex.length[i]
            assert ex.target[i] == seq[t]
            # the history is exactly the (up to) 20 items right before the target, in order
            assert n == min(t, data.MAX_HISTORY)
            assert np.array_equal(ex.history[i, :n], seq[t - n:t])
            assert (ex.history[i, n:] == 0).all()
    # every target position is after every history position, for every example
    for ex in (train, valid, test):
        assert (ex.position - ex.length >= 0).all() and (ex.length >= 1).all()
    # a user's validation / test positions are never a training target position of that user
    last_train_pos = np.full(len(beauty.users), -1)
    np.maximum.at(last_train_pos, train.user, train.position)
    assert (last_train_pos < valid.position).all() and (valid.position < test.position).all()
    assert (valid.position == test.position - 1).all()


def test_cold_start_split_has_no_unseen_item_in_any_training_example(beauty):
    unseen = data.unseen_items(beauty, 0.05)
    targets = np.unique([seq[-1] for seq in beauty.sequences])
    assert len(unseen) == round(0.05 * len(targets)) and np.isin(unseen, targets).all()
    assert np.array_equal(unseen, data.unseen_items(beauty, 0.05))          # the same choice every time
    train, valid, test = data.split(beauty, unseen)
    assert not np.isin(train.target, unseen).any() and not np.isin(train.history, unseen).any()
    # every other training item is still trained on (as a target, or as the first item of a
    # sequence that now starts with it), and validation and test are untouched
    full_train, full_valid, full_test = data.split(beauty)
    kept = np.setdiff1d(np.unique(np.concatenate([full_train.target, full_train.history[:, 0]])), unseen)
    assert np.array_equal(np.unique(np.concatenate([train.target, train.history[:, 0]])), kept)
    for a, b in ((valid, full_valid), (test, full_test)):
        assert np.array_equal(a.history, b.history) and np.array_equal(a.target, b.target)
    assert np.isin(test.target, unseen).sum() > 0 and len(data.unseen_items(beauty, 0.0)) == 0


# ---- the user token, the token layout, batching --------------------------------------------

def test_user_hash_is_stable_across_processes():
    ids = ["A1YJEY40YUW4SE", "u42", "1"]
    here = [data.user_bucket(u) for u in ids]
    code = f"import data; print([data.user_bucket(u) for u in {ids!r}])"
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different str-hash salt must not matter
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == str(here)
    assert here == [717, 1964, 1940]   # md5-based: the same buckets on every machine, every release


def beauty_train(ds, _cache={}):
    if "train" not in _cache:
        _cache["train"] = data.split(ds)[0]
    return _cache["train"]


def test_token_layout_gives_each_level_its_own_token_range():
    codes = np.array([[0, 1, 0, 0], [2, 1, 3, 0], [2, 1, 3, 1]])  # 3 items, L = 4
    tok = data.Tokenizer(codes)
    assert tok.level_sizes == [3, 2, 4, 2] and tok.level_offset == [2, 5, 7, 11]
    assert tok.levels == [(2, 3), (5, 2), (7, 4), (11, 2)]
    assert tok.user_offset == 13 and tok.vocab_size == 13 + data.N_USER_BUCKETS
    assert tok.item_tokens[2].tolist() == [4, 6, 10, 11] and tok.item_tokens[0].tolist() == [0] * 4


def test_batches_pad_to_the_longest_history_in_the_batch():
    tok = data.Tokenizer(np.array([[0, 1, 0, 0], [2, 1, 3, 0], [2, 1, 3, 1]]))
    ex = data.Examples(user=np.array([0, 1]), history=np.array([[1, 0, 0], [3, 2, 0]]),
                       length=np.array([1, 2]), target=np.array([2, 1]), position=np.array([1, 2]))
    user_tok = tok.user_tokens(["a", "b"])
    b = data.make_batch(ex, [0, 1], tok, user_tok)
    assert b["enc"].shape == (2, 1 + 4 * 2)   # padded to the longest history in the batch, not 20
    assert b["enc"][0].tolist() == [user_tok[0].item(), 2, 6, 7, 11, 0, 0, 0, 0]
    assert b["enc"][1, 1:].tolist() == [4, 6, 10, 12, 4, 6, 10, 11]
    assert b["dec_in"][0].tolist() == [data.BOS, 4, 6, 10] and b["target"][0].tolist() == [4, 6, 10, 11]


@pytest.mark.parametrize("by_length", [False, True])
def test_epoch_batches_are_a_seeded_permutation(beauty, by_length):
    train = beauty_train(beauty)
    a = [b.tolist() for b in data.epoch_batches(train, 256, seed=3, by_length=by_length)]
    assert a == [b.tolist() for b in data.epoch_batches(train, 256, 3, by_length)]
    assert a != [b.tolist() for b in data.epoch_batches(train, 256, 4, by_length)]
    assert sorted(sum(a, [])) == list(range(len(train)))     # every example once


def test_length_pools_cut_padding(beauty):
    train = beauty_train(beauty)
    padded = {b: np.mean([train.length[i].max() for i in data.epoch_batches(train, 256, 0, by_length=b)])
              for b in (False, True)}
    real = train.length.mean()
    assert padded[False] > 2.5 * real and padded[True] < 1.1 * real


# ==============================================================================================
# 2. rqvae.py: Semantic IDs

# ---- k-means -------------------------------------------------------------------------------

def test_kmeans_matches_brute_force_and_objective_never_rises():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 5, generator=g, dtype=torch.float64) + 4 * torch.randn(1, 5, generator=g,
                   dtype=torch.float64) for _ in range(6)])                      # (600, 5), 6 blobs
    centroids, assign, objective = rqvae.kmeans(x, 16, n_iter=15, seed=1)
    # brute force: one point at a time, every centroid, the plain definition of the distance
    brute = torch.tensor([min(range(16), key=lambda j: ((p - centroids[j]) ** 2).sum().item()) for p in x])
    assert torch.equal(assign, brute)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objective, objective[1:]))
    assert objective[-1] < objective[0]
    assert (torch.bincount(assign, minlength=16) > 0).all()


def test_kmeans_leaves_no_cluster_empty_even_when_k_equals_n():
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(2))
    _, assign, _ = rqvae.kmeans(x, 32, n_iter=5, seed=0)
    assert sorted(assign.tolist()) == list(range(32))   # every point its own cluster


def test_lloyd_step_moves_an_empty_cluster_to_the_farthest_point():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [50.0]], dtype=torch.float64)
    centroids = torch.tensor([[0.5], [10.5], [100.0]], dtype=torch.float64)  # nothing is nearest to 100: cluster 2 is empty
    objective = rqvae.lloyd_step(x, centroids)
    # clusters 0 and 1 move to their means; the empty one to 50, the point farthest from its centroid
    assert centroids[:, 0].tolist() == [0.5, 71 / 3, 50.0]
    assert objective == pytest.approx(0.25 * 4 + 39.5 ** 2)
    assert rqvae.lloyd_step(x, centroids) < objective    # and the objective went down


# ---- the residual quantizer and the RQ-VAE -------------------------------------------------

def test_residual_quantizer_sums_to_encoder_output_and_picks_nearest_codes():
    torch.manual_seed(0)
    rq = rqvae.ResidualQuantizer(3, 16, 4).double()
    z = torch.randn(50, 4, dtype=torch.float64)
    codes, e, r = rq(z)                                  # (50, 3), (3, 50, 4), (4, 50, 4)
    assert torch.allclose(e.sum(0) + r[-1], z, rtol=0, atol=1e-12)
    for d in range(3):
        dist = ((r[d][:, None, :] - rq.codebooks[d][None]) ** 2).sum(-1)       # (50, 16) brute force
        assert torch.equal(codes[:, d], dist.argmin(1))
        assert torch.allclose(r[d + 1], r[d] - rq.codebooks[d][codes[:, d]])


def test_kmeans_init_of_the_codebooks_uses_each_levels_residuals():
    torch.manual_seed(0)
    rq = rqvae.ResidualQuantizer(2, 8, 3)
    z = torch.randn(200, 3)
    rq.init_kmeans(z, n_iter=10, seed=0)
    c0, a0, _ = rqvae.kmeans(z, 8, 10, seed=0)
    c1, _, _ = rqvae.kmeans(z - c0[a0], 8, 10, seed=1)
    assert torch.allclose(rq.codebooks[0], c0) and torch.allclose(rq.codebooks[1], c1)


def test_straight_through_sends_reconstruction_gradient_to_the_encoder():
    torch.manual_seed(0)
    model = rqvae.RQVAE(in_dim=16, latent_dim=4, n_levels=2, codebook_size=8)
    _, _, losses = model(torch.randn(64, 16))
    losses['recon'].backward()                           # the reconstruction term alone
    assert model.encoder[0].weight.grad.abs().sum() > 0
    assert model.quantizer.codebooks.grad is None or model.quantizer.codebooks.grad.abs().sum() == 0


def test_rqvae_loss_weighs_the_commitment_term_by_beta():
    # L = recon + sum_d ||sg[r_d] - e_d||^2 + beta ||r_d - sg[e_d]||^2 (Sec. 3.1). The two quantizer
    # terms have the same value, so only their gradients tell them apart: the codebooks get the
    # codebook term's gradient at weight 1, the encoder the commitment term's at weight beta.
    torch.manual_seed(0)
    model = rqvae.RQVAE(in_dim=16, latent_dim=4, n_levels=2, codebook_size=8)
    x = torch.randn(64, 16)
    params = [model.quantizer.codebooks, model.encoder[0].weight]

    def grads(term, beta):
        _, _, losses = model(x, beta=beta)
        return torch.autograd.grad(term(losses), params, allow_unused=True)
    total_cb, total_enc = grads(lambda l: l['loss'], beta=0.25)
    codebook_cb, _ = grads(lambda l: l['codebook'], beta=0.25)
    _, recon_enc = grads(lambda l: l['recon'], beta=0.25)
    _, commit_enc = grads(lambda l: l['commit'], beta=0.25)
    assert torch.allclose(total_cb, codebook_cb, atol=1e-6)
    assert torch.allclose(total_enc, recon_enc + 0.25 * commit_enc, atol=1e-6)
    assert commit_enc.abs().sum() > 0


def test_rqvae_training_runs_and_uses_its_codebooks():
    emb = torch.nn.functional.normalize(torch.randn(600, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    model, log = rqvae.train_rqvae(emb.numpy(), n_levels=2, codebook_size=8, latent_dim=4, optimizer='adamw',
                                   lr=1e-3, batch_size=128, n_epochs=3, kmeans_iters=5, reset_dead_codes=True,
                                   seed=0, progress=False)
    codes, recon = rqvae.rqvae_codes(model, emb.numpy())
    assert codes.shape == (600, 2) and np.isfinite(recon) and len(log) == 3
    assert all(len(np.unique(codes[:, d])) >= 6 for d in range(2))


# ---- the collision token; IDs for cold start and for several datasets ----------------------

def test_collision_token_makes_ids_unique_and_keeps_prefixes():
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [4, 5, 6], [1, 2, 3], [0, 0, 0]])
    ids = rqvae.add_collision_token(codes)
    assert ids.dtype == np.int64 and ids.shape == (6, 4)
    assert np.array_equal(ids[:, :3], codes)
    assert ids[:, 3].tolist() == [0, 0, 1, 0, 2, 1]      # numbered in item order inside each group
    assert len(np.unique(ids, axis=0)) == 6


def test_collision_token_numbers_seen_items_as_if_unseen_ones_did_not_exist():
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [4, 5, 6], [1, 2, 3], [0, 0, 0]])
    seen = np.array([False, True, True, True, True, False])
    ids = rqvae.add_collision_token(codes, seen=seen)
    assert np.array_equal(ids[seen], rqvae.add_collision_token(codes[seen]))  # seen: exactly as without
    assert ids[:, 3].tolist() == [2, 0, 0, 0, 1, 1]                          # unseen follow in their group
    assert len(np.unique(ids, axis=0)) == 6


def cold_start_embeddings():
    """400 random 16-d embeddings, a seen mask (~80 %), and a copy in which only the unseen items moved."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((400, 16)).astype(np.float32)
    seen = rng.random(400) > 0.2
    other = emb.copy()
    other[~seen] = 10 * rng.standard_normal(((~seen).sum(), 16))              # change only the unseen items
    return emb, seen, other


def test_cold_start_ids_are_fitted_without_the_unseen_embeddings():
    emb, seen, other = cold_start_embeddings()
    cfg = {**rqvae.DEFAULTS, "ids": "rqvae", "n_levels": 2, "codebook_size": 8, "latent_dim": 4,
           "batch_size": 128, "n_epochs": 2, "kmeans_iters": 3, "seed": 0}
    codes_a, _, model_a = rqvae.make_ids(emb, cfg, seen=seen)
    codes_b, _, model_b = rqvae.make_ids(other, cfg, seen=seen)
    # the same RQ-VAE whatever the unseen items look like: it never saw them ...
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
    assert np.array_equal(codes_a[seen], codes_b[seen])
    # ... yet every unseen item gets the codes of its own embedding
    assert (codes_a[~seen, :2] != codes_b[~seen, :2]).any()
    assert np.array_equal(codes_b[~seen, :2], rqvae.rqvae_codes(model_b, other[~seen])[0])


def test_ids_fitted_with_other_datasets_learn_from_their_items_and_number_only_this_ones():
    rng = np.random.default_rng(0)
    emb, others = rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal((200, 16)).astype(np.float32)
    cfg = {**rqvae.DEFAULTS, "ids": "rqvae", "n_levels": 2, "codebook_size": 8, "latent_dim": 4,
           "batch_size": 128, "n_epochs": 2, "kmeans_iters": 3, "seed": 0}
    codes, _, model = rqvae.make_ids(emb, cfg, also_fit=others)
    union_codes, _, union_model = rqvae.make_ids(np.concatenate([emb, others]), cfg)
    # the very RQ-VAE that trains on the union of the items (App. E) ...
    assert all(torch.equal(v, union_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert np.array_equal(codes[:, :2], union_codes[:300, :2])
    # ... not the one of this dataset alone
    alone, _, _ = rqvae.make_ids(emb, cfg)
    assert (alone[:, :2] != codes[:, :2]).any()
    # only this dataset's items get IDs; the collision token numbers them among themselves
    assert codes.shape == (300, 3)
    assert np.array_equal(codes, rqvae.add_collision_token(codes[:, :2]))


def test_collision_group_larger_than_the_token_range_is_an_error():
    with pytest.raises(data.InputError, match='collision'):
        rqvae.add_collision_token(np.zeros((5, 3), dtype=np.int64), collision_size=4)


# ---- RQ-KMeans, LSH and Random IDs; statistics ---------------------------------------------

def test_rqkmeans_centroids_learn_from_the_fit_items_only_and_every_item_takes_its_nearest():
    emb, seen, other = cold_start_embeddings()
    rng = np.random.default_rng(1)
    cfg = {**rqvae.DEFAULTS, "ids": "rqkmeans", "n_levels": 2, "codebook_size": 8, "kmeans_iters": 3, "seed": 0}
    # cold start: the seen items get the same codes whatever the unseen ones look like ...
    codes_a, _, _ = rqvae.make_ids(emb, cfg, seen=seen)
    codes_b, _, _ = rqvae.make_ids(other, cfg, seen=seen)
    assert np.array_equal(codes_a[seen], codes_b[seen])
    assert (codes_a[~seen, :2] != codes_b[~seen, :2]).any()                    # ... the unseen their own
    # by hand: level 1 is the nearest of the seen items' k-means centroids, level 2 the nearest
    # of the centroids of their residuals
    x = torch.as_tensor(other)
    c1, a1, _ = rqvae.kmeans(x[torch.as_tensor(seen)], 8, 3, seed=0)
    level1 = rqvae.sq_dist(x, c1).argmin(1)
    c2, _, _ = rqvae.kmeans(x[torch.as_tensor(seen)] - c1[a1], 8, 3, seed=1)
    level2 = rqvae.sq_dist(x - c1[level1], c2).argmin(1)
    assert np.array_equal(codes_b[:, :2], torch.stack([level1, level2], 1).numpy())
    # App. E: with other datasets' items, the centroids are the union's, only emb's items get IDs
    others = rng.standard_normal((200, 16)).astype(np.float32)
    codes, _, _ = rqvae.make_ids(emb, cfg, also_fit=others)
    union_codes, _, _ = rqvae.make_ids(np.concatenate([emb, others]), cfg)
    assert codes.shape == (400, 3) and np.array_equal(codes[:, :2], union_codes[:400, :2])
    assert (rqvae.make_ids(emb, cfg)[0][:, :2] != codes[:, :2]).any()
    assert np.array_equal(codes, rqvae.add_collision_token(codes[:, :2]))


def test_rqkmeans_equals_residual_kmeans_written_plainly_and_leaves_its_input_alone():
    # rqkmeans_ids updates residuals in place and reuses k-means's assignment and squared norms:
    # the codes and error must be those of the plain recipe, and the caller's arrays untouched
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    fit = rng.standard_normal((200, 16)).astype(np.float32)
    kept_emb, kept_fit = emb.copy(), fit.copy()
    for f in (None, fit):
        codes, error = rqvae.rqkmeans_ids(emb, 3, 8, n_iter=3, seed=0, fit=f)
        r = torch.from_numpy(kept_emb)
        r_fit = r if f is None else torch.from_numpy(kept_fit)
        for d in range(3):
            c, assign_fit, _ = rqvae.kmeans(r_fit, 8, 3, seed=d)
            level = ((r[:, None] - c[None]) ** 2).sum(-1).argmin(1)       # (N, K, D): by hand
            assert np.array_equal(codes[:, d], level.numpy()), d
            r, r_fit = r - c[level], r_fit - c[assign_fit]
        assert error == pytest.approx((r ** 2).sum(-1).mean().item(), rel=1e-5)
    assert np.array_equal(emb, kept_emb) and np.array_equal(fit, kept_fit)


def test_lsh_code_equals_the_formula_on_a_hand_made_example():
    planes = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])          # m = 1 code, h = 3 bits
    x = torch.tensor([[1.0, -2.0], [-1.0, 2.0], [3.0, 1.0], [-1.0, -1.0]])
    # x1: w1.x = 1 > 0, w2.x = -2, w3.x = -1 -> 2^0 = 1;  x2: 0 + 2 + 4 = 6;  x3: 1 + 2 + 4;  x4: 0
    assert rqvae.lsh_hash(x, planes)[:, 0].tolist() == [1, 6, 7, 0]
    emb = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    codes = rqvae.lsh_ids(emb, n_codes=4, n_bits=8, seed=3)
    assert codes.shape == (50, 4) and codes.min() >= 0 and codes.max() < 256


def test_random_ids_reproducible_from_the_seed():
    a = rqvae.random_ids(1000, 4, 255, seed=7)
    assert np.array_equal(a, rqvae.random_ids(1000, 4, 255, seed=7))
    assert not np.array_equal(a, rqvae.random_ids(1000, 4, 255, seed=8))
    assert a.min() >= 0 and a.max() == 254


def test_id_stats_on_a_hand_made_table():
    ids = rqvae.add_collision_token(np.array([[0, 1, 2], [0, 1, 2], [3, 1, 0], [3, 2, 0]]))
    s = rqvae.id_stats(ids, [4, 4, 4, 256])
    assert s['usage'] == [0.5, 0.5, 0.5]
    assert s['perplexity'][0] == pytest.approx(2.0)
    assert s['items_in_collisions'] == 2 and s['largest_collision_group'] == 2
    assert s['distinct_3code_prefixes'] == 3 and s['unique_3code_prefix_share'] == 0.5


def test_category_structure_counts_pairs():
    items = [{'categories': ['A', 'x']}, {'categories': ['A', 'x']}, {'categories': ['A', 'y']},
             {'categories': ['B', 'z']}, {'categories': ['B']}]
    codes = np.array([[0], [0], [0], [1], [1]])
    c = rqvae.category_structure(codes, items)
    assert c['same_category_share'] == pytest.approx(1 / 3)   # code 0: 3 pairs, one shares 'A > x'
    assert c['pairs_base_rate'] == pytest.approx(1 / 6)       # 4 items with 2 levels: 6 pairs, 1 same


# ==============================================================================================
# 3. tiger.py: the model, decoding, training

# ---- the model -----------------------------------------------------------------------------

LEVELS_60 = [(2, 15), (17, 15), (32, 15), (47, 13)]  # 4 code levels in a 60-token vocabulary


def tiny(vocab_size=60, levels=LEVELS_60, **changes):
    """A tiny TIGER built from its config alone (seeded)."""
    config = tiger.TIGERConfig(vocab_size, levels, n_layer=2, n_head=2, head_dim=8, d_model=16, d_ff=32,
                               dropout=0.0, softmax="level")
    torch.manual_seed(0)
    return tiger.TIGER(replace(config, **changes))


def tiny_codes():
    # 14 items over levels of sizes 3, 4, 3 plus a collision code: a small but branching prefix tree
    rng = np.random.default_rng(0)
    codes = np.unique(np.stack([rng.integers(0, 3, 40), rng.integers(0, 4, 40), rng.integers(0, 3, 40)], 1), axis=0)
    codes = codes[rng.permutation(len(codes))[:14]]
    codes = np.concatenate([codes, np.zeros((14, 1), np.int64)], 1)
    codes[1, :3] = codes[0, :3]    # one collision: items 1 and 2 share a prefix ...
    codes[1, 3] = 1                # ... and the collision code tells them apart
    return codes


def random_inputs(B=3, T=9, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 60, (B, T), generator=g), torch.randint(2, 60, (B, L), generator=g)


def test_decoder_is_causal():
    model = tiny().eval()
    enc, dec = random_inputs()
    states, _ = model(enc, dec)                  # (3, 4, d): what every score is computed from
    dec2 = dec.clone()
    dec2[:, 2:] = torch.randint(2, 60, (3, 2))  # change later decoder inputs
    states2, _ = model(enc, dec2)
    assert torch.allclose(states[:, :2], states2[:, :2], atol=1e-6)
    assert not torch.allclose(states[:, 2:], states2[:, 2:], atol=1e-3)


def test_encoder_ignores_padding():
    model = tiny().eval()
    enc, dec = random_inputs()
    memory, _ = model.encode(enc)
    padded = torch.cat([enc, torch.full((3, 5), data.PAD)], 1)
    assert torch.allclose(memory, model.encode(padded)[0][:, :9], atol=1e-5)
    assert torch.allclose(model(padded, dec)[0], model(enc, dec)[0], atol=1e-5)


def test_relative_position_buckets_are_t5s():
    enc = tiger.RelativePositionBias(n_head=1, bidirectional=True)   # 16 buckets each way, 8 exact
    rel = torch.tensor([0, -1, 1, -3, 3, -7, -8, -20, -127, -1000, 1000])
    # exact up to 7; then 8 + floor(log(d / 8) / log(128 / 8) * 8), capped at 15; keys after the
    # query (rel > 0) use buckets 16..31
    assert enc.bucket(rel).tolist() == [0, 1, 17, 3, 19, 7, 8, 10, 15, 15, 31]
    dec = tiger.RelativePositionBias(n_head=1, bidirectional=False)  # 32 buckets into the past, 16 exact
    rel = torch.tensor([0, -1, 5, -15, -16, -40, -127, -1000])
    assert dec.bucket(rel).tolist() == [0, 1, 0, 15, 16, 23, 31, 31]


@pytest.mark.parametrize("softmax", ["level", "full"])
def test_code_logprobs_and_loss(softmax):
    model = tiny(softmax=softmax).eval()
    enc, dec = random_inputs()
    target = torch.tensor([[first + 1 for first, _ in LEVELS_60]] * 3)   # code 1 of every level
    states, loss = model(enc, dec, target)
    logp = [model.code_logprobs(states[:, l], l) for l in range(4)]      # each (3, n_codes of level l)
    assert [p.shape[1] for p in logp] == [15, 15, 15, 13]
    W = model.lm_head.weight                                             # (vocab, d): a row per token
    for l, (first, n) in enumerate(LEVELS_60):
        if softmax == "level":   # a softmax over the level's own rows only: a proper distribution
            want = torch.log_softmax(states[:, l] @ W[first:first + n].T, -1)
            assert torch.allclose(logp[l].exp().sum(-1), torch.ones(3), atol=1e-5)
        else:                    # T5's softmax over the whole vocabulary, read at the level's tokens
            want = torch.log_softmax(states[:, l] @ W.T, -1)[:, first:first + n]
            assert (logp[l].exp().sum(-1) < 0.99).all()
        assert torch.allclose(logp[l], want, atol=1e-5)
    # the loss is the mean over users and levels of -log p(target code)
    assert torch.allclose(loss, -torch.stack([p[:, 1] for p in logp]).mean(), atol=1e-6)


def test_two_tigers_of_different_shapes_live_side_by_side():
    small = tiny().eval()
    enc, dec = random_inputs()
    before = small(enc, dec)[0]
    wide = tiny(n_head=3, head_dim=16, d_model=24, softmax="full").eval()   # built after the first
    assert wide(enc, dec)[0].shape == (3, 4, 24)
    assert torch.equal(small(enc, dec)[0], before)                     # the first is untouched
    assert small.config.softmax == "level" and wide.config.d_model == 24
    # a checkpoint's config alone rebuilds a model with the same outputs
    again = tiger.TIGER(tiger.TIGERConfig(**json.loads(json.dumps(vars(small.config)))))
    again.load_state_dict(small.state_dict())
    assert torch.equal(again.eval()(enc, dec)[0], before)


def test_dropout_acts_where_t5_puts_it_and_only_in_training():
    # T5 drops the attention probabilities, the MLP's hidden units, each sublayer's output (the
    # residual stream) and the embeddings; each is checked with the others switched off
    model = tiny(dropout=0.5, n_layer=1)            # one layer: these four are all the encoder's dropouts
    block = model.encoder[0]
    x, bias = torch.randn(4, 6, 16), torch.zeros(1, 2, 6, 6)
    enc, _ = random_inputs()
    places = {"attention probabilities": (lambda: block.self_attn(x, x, bias), block.self_attn, "attn_dropout"),
              "MLP hidden units": (lambda: block.mlp(x), block.mlp[2], "p"),
              "residual stream": (lambda: block(x, bias), block.resid_dropout, "p"),
              "embeddings": (lambda: model.encode(enc)[0], model.emb_dropout, "p")}
    rates = {name: getattr(m, a) for name, (_, m, a) in places.items()}
    for name, (run, module, attr) in places.items():
        for other, (_, m, a) in places.items():               # only this one on
            setattr(m, a, rates[name] if other == name else 0.0)
        model.eval()
        evaluated = run()
        assert torch.equal(run(), evaluated), name                     # evaluation: no dropout
        model.train()
        assert not torch.allclose(run(), evaluated, atol=1e-3), name   # training: this dropout acts


def test_the_model_reads_the_user_token_and_every_history_item():
    # input dropout belongs to the training step; the model itself, in training or in evaluation,
    # sees the whole input: hiding the user token or one history item changes its output
    model = tiny()
    enc = torch.cat([torch.full((3, 1), 59), torch.randint(2, 59, (3, 12))], 1)  # [user, 3 items of 4]
    dec = torch.randint(2, 59, (3, 4))
    hidden = [[0]] + [list(range(1 + 4 * i, 5 + 4 * i)) for i in range(3)]    # the user, each item
    for mode in (model.eval, model.train):
        mode()
        full = model(enc, dec)[0]
        for columns in hidden:
            without = enc.clone()
            without[:, columns] = data.PAD
            assert not torch.allclose(model(without, dec)[0], full, atol=1e-4), columns
    assert torch.equal(model.eval()(enc, dec)[0], model.train()(enc, dec)[0])   # dropout 0: same


def test_without_the_user_token_the_encoder_reads_the_history_alone():
    tok = data.Tokenizer(np.array([[0, 1, 0, 0], [2, 1, 3, 0], [2, 1, 3, 1]]))
    ex = data.Examples(user=np.array([0, 1]), history=np.array([[1, 0], [3, 2]]),
                       length=np.array([1, 2]), target=np.array([2, 1]), position=np.array([1, 2]))
    with_user = data.make_batch(ex, [0, 1], tok, tok.user_tokens(["a", "b"]))
    without = data.make_batch(ex, [0, 1], tok, None)
    assert torch.equal(without["enc"], with_user["enc"][:, 1:])             # the same, minus column 0
    assert not (without["enc"] >= tok.user_offset).any()                    # no user token anywhere
    # item dropout without a user token never leaves an example with nothing to read
    torch.manual_seed(0)
    enc = torch.randint(2, 59, (400, 4))                                     # one item each
    dropped = tiger.drop_input_tokens(enc, 4, item_dropout=0.9, user_dropout=0.0, user_token=False)
    assert torch.equal(dropped, enc)
    enc = torch.randint(2, 59, (400, 8))                                     # two items each
    dropped = tiger.drop_input_tokens(enc, 4, item_dropout=0.5, user_dropout=0.0, user_token=False)
    assert ((dropped != data.PAD).any(1)).all() and (dropped == data.PAD).any()


# ---- decoding: the cache, beam search, sampling --------------------------------------------

def test_incremental_decoding_with_cache_equals_full_forward():
    model = tiny().eval()
    enc, dec = random_inputs(B=2, T=7, L=5)
    full, _ = model(enc, dec)
    memory, cross_bias = model.encode(enc)
    caches = [{"self": {}, "cross": {}} for _ in model.decoder]
    steps = [model.decode(dec[:, t:t + 1], memory, cross_bias, caches, start=t) for t in range(5)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def sequence_logprobs(model, enc, tokenizer, n_levels=None):
    """Brute force: the exact log-probability of every item's Semantic ID (or of its first n_levels
    codes) for each user, (B, n_items): one teacher-forced pass per (user, item), summing log p(code)
    over the levels."""
    items = tokenizer.item_tokens[1:]                                       # (n_items, L)
    B, n = enc.shape[0], len(items)
    target = items.repeat(B, 1)
    dec_in = torch.cat([torch.full((B * n, 1), data.BOS), target[:, :-1]], 1)
    states, _ = model(enc.repeat_interleave(n, 0), dec_in)
    logp = sum(model.code_logprobs(states[:, l], l).gather(1, target[:, l:l + 1] - first)[:, 0]
               for l, (first, _) in enumerate(tokenizer.levels[:n_levels]))
    return logp.view(B, n)


@pytest.mark.parametrize("softmax", ["level", "full"])
def test_beam_search_matches_brute_force(softmax):
    codes = tiny_codes()
    tok = data.Tokenizer(codes, n_user_buckets=10)
    tables = tiger.PrefixTables(tok)
    model = tiny(tok.vocab_size, tok.levels, softmax=softmax).eval()
    enc = torch.cat([torch.full((4, 1), tok.user_offset), tok.item_tokens[torch.randint(1, 15, (4, 3))].flatten(1)], 1)
    brute = sequence_logprobs(model, enc, tok)                              # (4, 14)
    # a beam as large as the item set is exact: the top-K items by sequence log-probability
    got, scores = tiger.beam_search(model, enc, tables, beam_size=14)
    items = tables.items_of(got)
    want_scores, want_items = brute.sort(dim=1, descending=True)
    assert torch.equal(items, want_items + 1)
    assert torch.allclose(scores, want_scores, atol=1e-5)
    # a smaller beam still returns only real items, each scored with its exact log-probability
    got, scores = tiger.beam_search(model, enc, tables, beam_size=3)
    items = tables.items_of(got)
    assert (items > 0).all() and items.shape == (4, 3)
    assert torch.allclose(scores, brute.gather(1, items - 1), atol=1e-5)


def test_unconstrained_beam_search_can_return_ids_that_are_no_item():
    codes = tiny_codes()
    tok = data.Tokenizer(codes, n_user_buckets=10)
    tables = tiger.PrefixTables(tok)
    model = tiny(tok.vocab_size, tok.levels).eval()
    enc = torch.cat([torch.full((4, 1), tok.user_offset), tok.item_tokens[torch.randint(1, 15, (4, 3))].flatten(1)], 1)
    got, _ = tiger.beam_search(model, enc, tables, beam_size=50, constrained=False)
    items = tables.items_of(got)
    assert (items == 0).any() and set(items[items > 0].tolist()) <= set(range(1, 15))
    assert torch.equal(tables.items_of(torch.from_numpy(codes)), torch.arange(1, 15))
    real = {tuple(c) for c in codes.tolist()}
    fake = next(t for t in itertools.product(*[range(n) for n in tok.level_sizes]) if t not in real)
    assert tables.items_of(torch.tensor([fake])).item() == 0  # a well-formed ID that is no item


# the dense reference tables: results/scale_bench.py keeps the one copy (it measures them too)
sys.path.insert(0, os.path.join(HERE, "results"))
from scale_bench import dense_tables as dense_prefix_tables  # noqa: E402


def realistic_codes(n=12000, seed=0):
    """An ID table shaped like RQ-KMeans's on 12k items: 3 levels of 256 codes, each used unevenly
    (Zipf-like, a different order under each parent), then the collision token."""
    rng = np.random.default_rng(seed)
    p = 1 / (np.arange(256) + 8.0)
    p /= p.sum()
    codes = rng.choice(256, (n, 3), p=p)
    codes[:, 1] = (codes[:, 1] + 37 * codes[:, 0]) % 256         # the uneven use, per parent
    codes[:, 2] = (codes[:, 2] + 101 * codes[:, 1]) % 256
    return rqvae.add_collision_token(codes)


@pytest.mark.parametrize("case", ["random", "random_subset", "realistic"])
def test_prefix_tables_equal_a_dense_reference(case):
    # every cell of every level: the same allowed codes, and child() gives next[]'s id (or -1);
    # prefix_of/items_of agree on real IDs, on prefixes and on tuples that are no item
    rng = np.random.default_rng(5)
    if case == "realistic":
        codes = realistic_codes()
    else:                                                          # small levels: a dense tree
        sizes = rng.integers(2, 6, 3)
        codes = rqvae.add_collision_token(np.stack([rng.integers(0, k, 300) for k in sizes], 1))
    tok = data.Tokenizer(codes, n_user_buckets=10)
    n = len(codes)
    items = np.sort(rng.choice(n, n // 2, replace=False)) + 1 if case == "random_subset" else \
        np.arange(1, n + 1)
    tables = tiger.PrefixTables(tok, items=items)
    allowed, nxt, dense = dense_prefix_tables(tok, items)
    assert tok.level_sizes[-1] > 1                                 # (collisions happened)
    for l in range(tok.id_length):
        assert torch.equal(tables.allowed[l], allowed[l])
        p, c = torch.meshgrid(torch.arange(-1, len(allowed[l])),
                              torch.arange(tok.level_sizes[l]), indexing="ij")
        want = torch.where(p >= 0, nxt[l][p.clamp(min=0), c], -1)
        assert torch.equal(tables.child(l, p, c), want)
    queries = torch.from_numpy(np.concatenate([
        codes, rng.integers(0, np.array(tok.level_sizes), (500, tok.id_length))]))
    assert torch.equal(tables.items_of(queries), dense.items_of(queries))
    assert (tables.items_of(torch.from_numpy(codes[items - 1])) == torch.from_numpy(items)).all()
    for length in (1, 2, tok.id_length - 1):
        assert torch.equal(tables.prefix_of(queries[:, :length]),
                           dense.prefix_of(queries[:, :length]))
    unseen = np.setdiff1d(np.arange(1, n + 1), items) if case == "random_subset" else items
    unseen = unseen[:50]
    assert torch.equal(tiger.unseen_table(tables, codes, unseen),
                       tiger.unseen_table(dense, codes, unseen))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_beam_search_gives_the_dense_tables_beams_on_a_realistic_id_table(temperature):
    # 12k items, 3 levels x 256 + collision token; a beam of 40, a model whose scores vary
    codes = realistic_codes()
    tok = data.Tokenizer(codes, n_user_buckets=10)
    items = np.arange(1, len(codes) + 1)
    tables, (_, _, dense) = tiger.PrefixTables(tok), dense_prefix_tables(tok, items)
    model = tiny(tok.vocab_size, tok.levels).eval()
    torch.manual_seed(1)
    for p in model.parameters():                                   # sharper than the init
        p.data.mul_(3)
    enc = tok.item_tokens[torch.randint(1, len(codes) + 1, (16, 5))].flatten(1)
    runs = []
    for t in (tables, dense):
        g = torch.Generator().manual_seed(4)
        runs.append(tiger.beam_search(model, enc, t, 40, temperature=temperature, generator=g))
    (got, got_scores), (want, want_scores) = runs
    assert torch.equal(got, want) and torch.equal(got_scores, want_scores)
    assert (tables.items_of(got) > 0).all()
    # three levels only (cold start's unseen ranking): the same best prefixes
    short = [tiger.beam_search(model, enc, t, 40, n_levels=3)[0] for t in (tables, dense)]
    assert torch.equal(short[0], short[1])


def sampling_setup(n_users):
    codes = tiny_codes()
    tok = data.Tokenizer(codes, n_user_buckets=10)
    tables = tiger.PrefixTables(tok)
    model = tiny(tok.vocab_size, tok.levels).eval()
    history = tok.item_tokens[torch.tensor([3, 7, 1])].flatten()
    enc = torch.cat([torch.tensor([tok.user_offset]), history]).repeat(n_users, 1)  # one user, n times
    return codes, tok, tables, model, enc


def exact_q(model, enc, tok, tables, temperature):
    """Brute force: q_T(item) = prod_l softmax(logits_l / T), renormalised over the allowed codes."""
    n = len(tok.codes)
    target = tok.item_tokens[1:]
    dec_in = torch.cat([torch.full((n, 1), data.BOS), target[:, :-1]], 1)
    states, _ = model(enc[:1].repeat(n, 1), dec_in)
    logq, prefix = torch.zeros(n), torch.zeros(n, dtype=torch.long)
    for l, (first, _) in enumerate(tok.levels):
        logp = model.code_logprobs(states[:, l], l).masked_fill(~tables.allowed[l][prefix], float("-inf"))
        code = target[:, l] - first
        logq += torch.log_softmax(logp / temperature, -1).gather(1, code[:, None])[:, 0]
        prefix = tables.child(l, prefix, code)
    return logq.exp()                                                       # (n_items,), sums to 1


def test_sampling_returns_distinct_valid_items():
    _, _, tables, model, enc = sampling_setup(50)
    g = torch.Generator().manual_seed(0)
    codes, scores = tiger.beam_search(model, enc, tables, beam_size=14, temperature=1.0, generator=g)
    items = tables.items_of(codes)
    assert torch.isfinite(scores).all()
    assert (items.sort(1).values == torch.arange(1, 15)).all()              # all 14 items, each once
    assert len({tuple(row) for row in items.tolist()}) > 1                  # in different orders


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sampling_draws_without_replacement_from_the_tempered_distribution(temperature):
    # the first item is a draw from q_T, the second a draw from q_T without the first:
    # P(second = j) = sum_i q(i) q(j) / (1 - q(i)). 4,000 samples match both closely.
    _, tok, tables, model, enc = sampling_setup(4000)
    g = torch.Generator().manual_seed(1)
    codes, _ = tiger.beam_search(model, enc, tables, beam_size=3, temperature=temperature, generator=g)
    items = tables.items_of(codes)
    with torch.no_grad():
        q = exact_q(model, enc, tok, tables, temperature).double()
    assert q.sum().item() == pytest.approx(1.0, abs=1e-5)
    second = q * (q / (1 - q)).sum() - q * q / (1 - q)                      # j != i
    for position, want in ((0, q), (1, second)):
        drawn = torch.bincount(items[:, position], minlength=15)[1:].double() / 4000
        assert 0.5 * (drawn - want).abs().sum().item() < 0.05, position    # total variation distance


def test_higher_temperature_flattens_the_first_code():
    codes, _, tables, model, enc = sampling_setup(3000)
    n_first = len(np.unique(codes[:, 0]))
    entropy = []
    for temperature in (0.2, 1.0, 20.0):
        g = torch.Generator().manual_seed(2)
        out, _ = tiger.beam_search(model, enc, tables, beam_size=1, temperature=temperature, generator=g)
        p = torch.bincount(out[:, 0, 0], minlength=n_first).double() / len(out)
        entropy.append(-(p[p > 0] * p[p > 0].log()).sum().item())
    assert entropy[0] < entropy[1] < entropy[2] and entropy[2] > 0.95 * np.log(n_first)


# ---- cold-start decoding -------------------------------------------------------------------

def test_unseen_candidates_are_the_unseen_items_under_the_best_prefixes():
    codes = tiny_codes()                       # items 1 and 2 share their first three codes
    tok = data.Tokenizer(codes, n_user_buckets=10)
    unseen = np.array([1, 2, 6, 11])           # items 1 and 2: two unseen items under one prefix
    seen = np.setdiff1d(np.arange(1, 15), unseen)
    seen_tables = tiger.PrefixTables(tok, items=seen)
    assert torch.equal(seen_tables.items_of(torch.from_numpy(codes[seen - 1])), torch.from_numpy(seen))
    all_tables = tiger.PrefixTables(tok)
    table = tiger.unseen_table(all_tables, codes, unseen)
    model = tiny(tok.vocab_size, tok.levels).eval()
    enc = torch.cat([torch.full((4, 1), tok.user_offset), tok.item_tokens[torch.randint(1, 15, (4, 3))].flatten(1)], 1)
    # the seen ranking: the seen items by their exact log-probability, never an unseen one
    got, scores = tiger.beam_search(model, enc, seen_tables, beam_size=len(seen))
    want_scores, want = sequence_logprobs(model, enc, tok)[:, seen - 1].sort(dim=1, descending=True)
    assert torch.equal(tiger.ranked_items(seen_tables, got, scores), torch.from_numpy(seen)[want])
    assert torch.allclose(scores, want_scores, atol=1e-5)
    # a beam over all 13 prefixes finds every unseen item once, scored log p(its first three codes)
    assert table.shape[1] == 2                 # (items 1 and 2 share a row of the table)
    new, scores = tiger.unseen_candidates(model, enc, all_tables, table, beam_size=13)
    prefix_logp = sequence_logprobs(model, enc, tok, n_levels=3)             # (4, 14)
    for b in range(4):
        found = new[b][new[b] > 0]
        assert sorted(found.tolist()) == unseen.tolist()
        assert torch.allclose(scores[b][new[b] > 0], prefix_logp[b, found - 1], atol=1e-5)
    # a narrower beam keeps only the unseen items under its best prefixes
    new, _ = tiger.unseen_candidates(model, enc, all_tables, table, beam_size=3)
    best, _ = tiger.beam_search(model, enc, all_tables, beam_size=3, n_levels=3)   # (4, 3, 3)
    for b in range(4):
        under = [u for u in unseen if codes[u - 1, :3].tolist() in best[b].tolist()]
        assert sorted(new[b][new[b] > 0].tolist()) == under


def test_epsilon_rule_on_a_hand_made_ranking():
    seen, seen_s = torch.tensor([[11, 12, 13, 14]]), torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    # (24: an item id under a filler beam, score -inf: never a candidate)
    new, new_s = torch.tensor([[21, 22, 23, 24]]), torch.tensor([[-0.5, -1.5, -5.0, float("-inf")]])
    top = lambda k, eps: tiger.epsilon_top_k(seen, seen_s, new, new_s, k, eps)[0].tolist()
    assert top(4, 0.0) == [11, 12, 13, 14]                 # epsilon 0: exactly the seen ranking
    assert top(4, 0.25) == [21, 11, 12, 13]                # at most floor(0.25 * 4) = 1 unseen item
    assert top(4, 0.5) == [21, 11, 22, 12]                 # 2 allowed, in the order of the scores
    assert top(4, 1.0) == [21, 11, 22, 12]                 # the cap is not reached: the plain merge
    assert top(7, 1.0) == [21, 11, 22, 12, 13, 14, 23]
    assert top(5, 0.3) == [21, 11, 12, 13, 14]             # floor(1.5) = 1
    assert top(9, 1.0) == [21, 11, 22, 12, 13, 14, 23, 0, 0]   # fewer candidates than k: 0-padded
    for k in range(1, 8):
        for eps in (0.0, 0.1, 0.3, 0.5, 1.0):
            got = torch.tensor(top(k, eps))
            assert (got > 20).sum() <= int(eps * k + 1e-9)
    # on a tie a seen item goes first
    tie = tiger.epsilon_top_k(seen, seen_s, torch.tensor([[21]]), torch.tensor([[-2.0]]), 3, 1.0)
    assert tie[0].tolist() == [11, 12, 21]


# ---- training: input dropout, schedule, weight average -------------------------------------

def test_ema_update_is_the_moving_average():
    model = tiny()
    averaged = copy.deepcopy(model)
    old = [p.detach().clone() for p in averaged.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    tiger.update_ema(averaged, model, step=0, decay=0.9)      # decay ramps up: min(0.9, 1/10) at step 0
    tiger.update_ema(averaged, model, step=1000, decay=0.9)   # then the configured 0.9
    for a, o, p in zip(averaged.parameters(), old, model.parameters()):
        first = 0.1 * o + 0.9 * p
        assert torch.allclose(a, 0.9 * first + 0.1 * p, atol=1e-6)


def test_get_lr_warms_up_then_decays():
    cosine = lambda step: tiger.get_lr(step, lr=1.0, warmup_steps=100, max_steps=1100, schedule="cosine")
    assert cosine(0) == pytest.approx(0.01) and cosine(49) == pytest.approx(0.5)   # linear warmup
    assert cosine(99) == pytest.approx(1.0) and cosine(100) == pytest.approx(1.0)
    assert cosine(600) == pytest.approx(0.5) and cosine(1100) == pytest.approx(0.0)  # half-way, the end
    rsqrt = lambda step: tiger.get_lr(step, lr=0.01, warmup_steps=100, max_steps=10 ** 6, schedule="rsqrt")
    assert rsqrt(0) == rsqrt(99) == rsqrt(100) == 0.01              # the paper: constant, then 1/sqrt
    assert rsqrt(400) == pytest.approx(0.005) and rsqrt(10000) == pytest.approx(0.001)


def test_item_dropout_hides_whole_history_items():
    torch.manual_seed(0)
    L, n = 4, 100
    enc = torch.cat([torch.full((8, 1), 59), torch.randint(2, 59, (8, n * L))], 1)  # [user, 100 items]
    dropped = tiger.drop_input_tokens(enc, L, item_dropout=0.5, user_dropout=0.0)
    assert torch.equal(dropped[:, 0], enc[:, 0])                 # the user token stays at user_dropout = 0
    items, kept = enc[:, 1:].view(8, n, L), dropped[:, 1:].view(8, n, L)
    gone = (kept == data.PAD).all(-1)                            # (8, n) items that vanished
    assert torch.equal(kept[~gone], items[~gone])                # the rest are untouched ...
    assert torch.equal(kept == data.PAD, gone[..., None].expand(-1, -1, L))  # ... and none half-dropped
    assert 0.4 < gone.float().mean() < 0.6


def test_user_dropout_hides_the_user_token_but_never_the_whole_input():
    torch.manual_seed(0)
    L = 4
    enc = torch.cat([torch.full((400, 1), 59), torch.randint(2, 59, (400, 2 * L))], 1)  # [user, 2 items]
    enc[:200, 1:] = data.PAD                                     # half the rows have no history at all
    dropped = tiger.drop_input_tokens(enc, L, item_dropout=0.0, user_dropout=0.5)
    assert torch.equal(dropped[:, 1:], enc[:, 1:])              # items untouched at item_dropout = 0
    assert torch.equal(dropped[:200], enc[:200])                # a row with no history keeps its user
    assert 0.4 < (dropped[200:, 0] == data.PAD).float().mean() < 0.6
    both = tiger.drop_input_tokens(enc, L, item_dropout=0.7, user_dropout=0.5)
    assert ((both != data.PAD).any(1)).all()                    # every row keeps a key to attend to


def test_user_dropout_off_draws_no_random_number():
    enc = torch.randint(2, 59, (400, 9))
    torch.manual_seed(3)
    tiger.drop_input_tokens(enc, 4, item_dropout=0.1, user_dropout=0.0)
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.rand(400, 2)                                           # the item draws alone
    assert torch.equal(after, torch.rand(1))


def test_tiny_model_overfits_tiny_dataset_to_recall_at_1():
    codes = tiny_codes()
    tok = data.Tokenizer(codes, n_user_buckets=10)
    tables = tiger.PrefixTables(tok)
    # 8 users, each with its own history and next item
    rng = np.random.default_rng(1)
    ex = data.Examples(user=np.arange(8), history=rng.integers(1, 15, (8, 3)), length=np.full(8, 3),
                       target=rng.permutation(14)[:8] + 1, position=np.full(8, 3))
    user_tok = tok.user_tokens([f"u{i}" for i in range(8)])
    model = tiny(tok.vocab_size, tok.levels)       # no dropout of any kind
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = data.make_batch(ex, np.arange(8), tok, user_tok)
    for _ in range(150):
        _, loss = model(batch["enc"], batch["dec_in"], batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes_out, _ = tiger.beam_search(model.eval(), batch["enc"], tables, beam_size=5)
    ranks = evaluation.ranks_of(tables.items_of(codes_out), batch["target_item"])
    assert evaluation.recall_ndcg(ranks, ks=(1,))["recall@1"] == 1.0


# ==============================================================================================
# 4. eval.py: the metrics

def test_semantic_knn_ranks_by_cosine_and_leaves_the_history_out():
    # items 1..6; item 6 points away from every query below (a negative similarity)
    emb = np.array([[1, 0], [0.9, 0.3], [0, 1], [0.2, 0.9], [0.7, 0.7], [-1, -0.1]], dtype=np.float32)
    history, length = np.array([[1, 3], [3, 0]]), np.array([2, 1])   # the first history fills its row
    last = evaluation.semantic_knn(emb, history, length, 4, "last")
    # nearest to item 3, item 3 itself left out; item 6 last, and never the padding item 0 (similarity
    # 0 > item 6's), which a history without padding does not mask by itself
    assert last.tolist() == [[4, 5, 2, 6], [4, 5, 2, 1]]
    mean = evaluation.semantic_knn(emb, history, length, 3, "mean")
    assert mean[0].tolist() == [5, 2, 4] and mean[1].tolist() == [4, 5, 2]   # (1, 1)/2 is nearest item 5


def test_diversity_metrics_against_hand_computed_values():
    items = torch.tensor([[1, 2, 3, 4], [1, 1, 5, 0]])                      # 0: no item
    category = np.array([-1, 0, 0, 1, -1, 2])                               # item 4: unknown
    # user 0: categories 0, 0, 1 -> p = (2/3, 1/3); user 1: 0, 0, 2 -> the same entropy
    h = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert evaluation.entropy_at_k(items, category, 4) == pytest.approx(h)
    assert evaluation.entropy_at_k(items, category, 1) == 0.0
    assert evaluation.coverage_at_k(items, 5, 4) == 1.0 and evaluation.coverage_at_k(items, 5, 2) == 0.4
    # exposure of items 1..5 in the top 2: (3, 1, 0, 0, 0); sorted (0, 0, 0, 1, 3)
    gini = sum((2 * i - 5 - 1) * x for i, x in enumerate([0, 0, 0, 1, 3], 1)) / (5 * 4)
    assert evaluation.gini_at_k(items, 5, 2) == pytest.approx(gini) == pytest.approx(0.7)


def test_category_mix_names_what_each_target_category_is_shown():
    category, names = np.array([-1, 0, 0, 1, 1, 2]), ["A", "B", "C"]
    items = torch.tensor([[1, 3, 3, 5], [2, 1, 1, 1], [4, 5, 5, 5]])
    lines = evaluation.category_mix(items, torch.tensor([1, 2, 3]), category, names, k=4, n_shown=2)
    # two users with targets in A see A, B, B, C and A, A, A, A; one with a target in B sees B, C, C, C
    assert lines == ["target A (2 users): top-4 A 62%, B 25%", "target B (1 users): top-4 C 75%, B 25%"]


def test_metrics_against_hand_computed_values():
    ranked = torch.tensor([[7, 1, 2, 3, 4, 5], [1, 2, 3, 4, 7, 5], [1, 2, 3, 4, 5, 6]])
    targets = torch.tensor([7, 7, 7])  # hit at rank 1, hit at rank 5, miss
    ranks = evaluation.ranks_of(ranked, targets)
    assert ranks.tolist() == [1, 5, 0]
    m = evaluation.recall_ndcg(ranks, ks=(1, 5))
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@5"] == pytest.approx(2 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(6)) / 3)  # 1/log2(1+1) = 1, 1/log2(5+1)
    assert evaluation.invalid_rate(torch.tensor([[1, 0], [0, 0]])) == 0.75
    # a ranking of 6 is long enough for K = 5 only
    assert set(evaluation.metrics(ranked, targets)) == {"recall@5", "ndcg@5"}


def test_without_history_drops_the_users_history_items_and_keeps_the_order():
    items = torch.tensor([[5, 3, 7, 2, 9], [1, 2, 3, 4, 5], [8, 0, 6, 4, 1]])
    history = torch.tensor([[3, 2, 0], [9, 0, 0], [6, 8, 0]])   # 0-padded; item 0 is no item
    assert evaluation.without_history(items, history).tolist() == [
        [5, 7, 9, 0, 0],      # 3 and 2 out, the rest moved up in order
        [1, 2, 3, 4, 5],      # nothing of its history in the list
        [0, 4, 1, 0, 0]]      # an invalid ID (0) is not history: it keeps its place


def test_most_popular_counts_training_items_only_and_can_drop_the_history():
    # training parts (all but the last two items): [1, 2, 3], [1, 2], [1]: item 1 is the most
    # popular, then 2, then 3, then the rest in id order (4, 5, ...); items 10-15 are held out
    ds = SimpleNamespace(n_items=20, sequences=[np.array([1, 2, 3, 10, 11]),
                                                np.array([1, 2, 12, 13]), np.array([1, 14, 15])])
    ex = data.Examples(user=np.array([0, 1]), history=np.array([[1, 2, 0], [5, 0, 0]]),
                       length=np.array([2, 1]), target=np.array([11, 4]), position=np.array([4, 1]))
    kept = evaluation.most_popular(ds, ex, k=10)       # both get 1..10: user 0's 11 is not there
    assert kept["recall@10"] == 0.5 and kept["recall@5"] == 0.5
    dropped = evaluation.most_popular(ds, ex, k=10, drop_history=True)   # user 0: 3..12, 11 9th
    assert dropped["recall@10"] == 1.0 and dropped["recall@5"] == 0.5
    assert dropped["ndcg@10"] == pytest.approx((1 / math.log2(10) + 1 / math.log2(5)) / 2)


def test_no_dataset_repeats_an_item_in_a_users_sequence():
    # why dropping history items (eval.without_history) can only raise Recall and NDCG here: a held-out
    # item is never in its user's history
    for name in ("beauty", "sports", "toys"):
        for seq in data.load_dataset(name).sequences:
            assert len(set(seq.tolist())) == len(seq), name


def test_invalid_id_rate_per_k_on_hand_made_decoded_ids():
    # 2 users, 20 decoded IDs each, 0 = an ID that is no item (Fig. 6 plots this share against K)
    items = torch.arange(1, 41).view(2, 20)
    items[0, 0] = items[0, 7] = items[1, 12] = items[1, 19] = 0
    m = evaluation.metrics(items, torch.tensor([5, 99]), invalid=True)
    assert m["invalid@1"] == 0.5 and m["invalid@5"] == 0.1                  # 1 of 2, 1 of 10
    assert m["invalid@10"] == 0.1 and m["invalid@20"] == 0.1                 # 2 of 20, 4 of 40
    assert m["invalid_rate"] == 0.1 and m["recall@5"] == 0.5                 # user 0 finds item 5


# ==============================================================================================
# 5. End to end: prepare + train + evaluate on a small slice of Beauty

def make_slice(folder, n_items=1000, min_len=5):
    """A small, dense slice of Beauty: its n_items most-interacted items, and the users with at least
    min_len interactions among them (their other items dropped, order kept), renumbered 1..m. About
    4,500 users and 1,000 items: real data on which a minute of training can learn real patterns (a
    slice of the first 2,000 users instead has ~7,000 items seen a few times each; there a minute of
    training loses to the most-popular baseline)."""
    ds = data.load_dataset("beauty")
    counts = np.bincount(np.concatenate(ds.sequences), minlength=ds.n_items + 1)
    counts[0] = 0
    keep = np.zeros(ds.n_items + 1, bool)
    keep[np.argsort(-counts, kind="stable")[:n_items]] = True
    users = [(u, seq[keep[seq]]) for u, seq in zip(ds.users, ds.sequences)]
    users = [(u, seq) for u, seq in users if len(seq) >= min_len]
    used = np.unique(np.concatenate([seq for _, seq in users]))
    new_id = np.zeros(ds.n_items + 1, np.int64)
    new_id[used] = np.arange(1, len(used) + 1)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sequences.txt"), "w") as f:
        for u, seq in users:
            f.write(u + " " + " ".join(map(str, new_id[seq])) + "\n")
    with open(os.path.join(folder, "items.jsonl"), "w") as f:
        for i, old in enumerate(used, 1):
            f.write(json.dumps({**ds.items[old - 1], "item": i}) + "\n")
    np.save(os.path.join(folder, "item_emb.npy"), ds.item_emb[used - 1].astype(np.float16))
    return folder


@pytest.fixture(scope="module")
def beauty_slice(tmp_path_factory):
    root = tmp_path_factory.mktemp("slice")
    folder = make_slice(str(root / "beauty1k"))
    out = str(root / "out")
    prepare.main([f"--dataset={folder}", f"--out_dir={out}"])                     # the default IDs
    prepare.main([f"--dataset={folder}", f"--out_dir={out}", "--ids=rqvae", "--n_epochs=30"])  # the paper's
    return folder, out


# the CPU default's model at a fraction of its steps; no input dropout, so that 300 steps learn
SMALL_RUN = ["--batch_size=128", "--lr=0.005", "--warmup_steps=20", "--eval_users=500", "--beam_size=10",
             "--item_dropout=0.0", "--user_dropout=0.0"]


def run_args(beauty_slice, run, steps=40, every=20):
    folder, out = beauty_slice
    return [f"--dataset={folder}", f"--out_dir={out}", f"--run={run}", f"--max_steps={steps}",
            f"--eval_every={every}", "--patience=9"] + SMALL_RUN


IDS = tiger.DEFAULTS["ids"]  # the main job's Semantic IDs (prepare.py and tiger.py agree on them)


assert IDS == rqvae.DEFAULTS["ids"]


def run_dir(beauty_slice, run, ids=IDS):
    return os.path.join(beauty_slice[1], "beauty1k", ids, run)


def test_end_to_end_on_a_beauty_slice(beauty_slice):
    # prepare (in the fixture) + train + evaluate on the dense Beauty slice: the trained model must rank
    # the held-out items better than recommending the most popular items to everyone
    results = tiger.main(run_args(beauty_slice, "e2e", steps=300, every=100))
    for split in ("valid", "test"):
        assert results[split]["recall@10"] > 1.25 * results[split + "_most_popular"]["recall@10"] > 0
        assert results[split]["ndcg@10"] > 1.25 * results[split + "_most_popular"]["ndcg@10"]
    best = os.path.join(run_dir(beauty_slice, "e2e"), "best.pt")
    # the eval.py driver reproduces the test numbers from the saved checkpoint ...
    again = evaluation.main([f"--ckpt={best}"])
    assert again["recall@10"] == pytest.approx(results["test"]["recall@10"])
    # ... reports the invalid-ID rate of unconstrained decoding (its recall may land on either side of the
    # constrained one: invalid prefixes take beam slots, but pruning changes which beams survive), and a demo
    free = evaluation.main([f"--ckpt={best}", "--constrained=False"])
    assert 0 <= free["invalid_rate"] <= 1 and free["recall@10"] > 0
    evaluation.main([f"--ckpt={best}", "--demo=1"])
    # a wider beam than the checkpoint's (10) returns a longer ranking, so Recall@20 is reported too
    assert "recall@20" in evaluation.main([f"--ckpt={best}", "--beam_size=20", "--split=valid"])
    # with the history items out of the ranking a held-out item (never in its history) can only move up
    dropped = evaluation.main([f"--ckpt={best}", "--drop_history=True"])
    keys = [k for k in again if k.startswith(("recall@", "ndcg@"))]
    assert all(dropped[k] >= again[k] for k in keys) and dropped["ndcg@10"] > again["ndcg@10"]


def test_the_papers_rqvae_ids_train_end_to_end_too(beauty_slice):
    # the default uses RQ-KMeans IDs; the paper's RQ-VAE IDs (built in the fixture) must learn as well
    results = tiger.main(run_args(beauty_slice, "e2e", steps=300, every=100) + ["--ids=rqvae"])
    assert results["test"]["recall@10"] > 1.25 * results["test_most_popular"]["recall@10"] > 0
    ckpt = torch.load(os.path.join(run_dir(beauty_slice, "e2e", ids="rqvae"), "best.pt"), weights_only=True)
    assert ckpt["settings"]["ids"] == "rqvae"


def test_recommend_for_any_history_by_ids_or_asins(beauty_slice, trained, capsys):
    folder, _ = beauty_slice
    items = data.load_dataset(folder).items
    best = f"--ckpt={os.path.join(trained, 'best.pt')}"
    top = evaluation.main([best, f"--history={items[4]['asin']},{items[9]['asin']},3"])
    assert len(top) == 10 and len(set(top)) == 10 and all(1 <= i <= len(items) for i in top)
    shown = capsys.readouterr().out
    assert items[4]["title"] in shown and items[top[0] - 1]["title"] in shown
    assert evaluation.main([best, "--history=5,10,3"]) == top                 # ids and ASINs alike
    sampled = evaluation.main([best, "--history=5,10,3", "--temperature=2.0"])
    assert len(set(sampled)) == 10 and sampled != top
    with pytest.raises(data.InputError, match="--history: B000NOSUCH, 99999: not an item id"):
        evaluation.main([best, "--history=5,B000NOSUCH,99999"])


def test_cold_start_end_to_end_on_a_beauty_slice(beauty_slice, trained, capsys):
    folder, out = beauty_slice
    prepare.main([f"--dataset={folder}", f"--out_dir={out}", "--cold_start=0.1"])
    main_build = os.path.join(out, "beauty1k", IDS, "config.json")
    assert "cold_start" not in json.load(open(main_build))                 # the main build is untouched
    tiger.main(run_args(beauty_slice, "cold", steps=40) + ["--cold_start=0.1"])
    # it trained on the split without the unseen items (the count it prints)
    ds = data.load_dataset(folder)
    unseen = data.unseen_items(ds, 0.1)
    n_train = len(data.split(ds, unseen)[0])
    assert n_train < len(data.split(ds)[0]) and f"examples: {n_train:,} train" in capsys.readouterr().out
    best = os.path.join(out, "beauty1k", IDS + "-cold0.1", "cold", "best.pt")
    result = evaluation.main([f"--ckpt={best}", "--cold_start"])
    written = os.path.join(os.path.dirname(best), "cold_start_best_test_beam10.json")
    assert json.load(open(written))["tiger"] == result["tiger"]
    _, _, test = data.split(ds)
    assert result["users"]["unseen_target"] == np.isin(test.target, unseen).sum()
    assert result["users"]["unseen_target"] > 0
    assert result["tiger"]["0"]["unseen_target"] == [0.0] * 20   # the seen ranking never holds one
    assert all(len(v) == 4 and max(v) < 0 for v in result["mean_log_p_per_level"].values())
    curves = [g for v in (*result["tiger"].values(), *result["semantic_knn"].values()) for g in v.values()]
    assert all(np.all(np.diff(c) >= 0) for c in curves)           # Recall@K never falls as K grows
    top = evaluation.main([f"--ckpt={best}", "--history=1,2,3", "--epsilon=1.0"])
    assert len(top) == 10 and len(set(top)) == 10
    with pytest.raises(data.InputError, match="--epsilon applies to --history and --demo"):
        evaluation.main([f"--ckpt={best}", "--epsilon=0.1"])
    with pytest.raises(data.InputError, match="give one of them"):
        evaluation.main([f"--ckpt={best}", "--demo=1", "--epsilon=0.1", "--temperature=1.0"])
    with pytest.raises(data.InputError, match="not trained for cold start"):
        evaluation.main([f"--ckpt={os.path.join(trained, 'best.pt')}", "--cold_start"])


def test_validating_more_often_trains_the_very_same_model(beauty_slice):
    # a validation pass draws no random number, so how often it runs cannot change the trained weights
    # (the default validates every 3,000 steps on the strength of this)
    small = ["--item_dropout=0.1", "--user_token=True", "--user_dropout=0.3"]  # training that draws random numbers
    tiger.main(run_args(beauty_slice, "often", steps=30, every=10) + small)
    tiger.main(run_args(beauty_slice, "rarely", steps=30, every=30) + small)
    a, b = (torch.load(os.path.join(run_dir(beauty_slice, r), "ckpt.pt"), weights_only=True)["model"]
            for r in ("often", "rarely"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ==============================================================================================
# 6. baselines/sasrec.py: SASRec, the baseline beside TIGER (Table 1)

def sasrec_tiny(n_items=6, n_layer=1, n_head=2, d_model=4, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = sasrec.SASRecConfig(n_items, data.MAX_HISTORY, n_layer, n_head, d_model, dropout)
    model = sasrec.SASRec(config)
    with torch.no_grad():  # give the biases and norms values other than their 0 / 1 defaults
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def sasrec_layer_norm(x, norm):
    mu = sum(x) / len(x)
    var = sum((v - mu) ** 2 for v in x) / len(x)
    return [(v - mu) / math.sqrt(var + norm.eps) * w + b
            for v, w, b in zip(x, norm.weight.tolist(), norm.bias.tolist())]


def sasrec_matvec(w, x, b=None):  # w: a (out, in) weight as nested lists; returns w x (+ b)
    return [sum(wi * xi for wi, xi in zip(row, x)) + (b[i] if b else 0.0)
            for i, row in enumerate(w)]


def test_sasrec_forward_and_scores_match_a_hand_computation():
    # one block, two heads, written out position by position with Python floats: eq. 1 (item +
    # position embedding), LayerNorm, attention of position t over positions 0..t only with
    # softmax(q.k / sqrt(head_dim)), the residuals, the FFN, the final LayerNorm, r_i = F_t . M_i
    model = sasrec_tiny()
    seq = [3, 1, 5]
    E, P = model.item_emb.weight.tolist(), model.pos_emb.weight.tolist()
    blk = model.blocks[0]
    d, H = 4, 2
    hd = d // H
    wqkv = blk.attn.qkv.weight.tolist()
    wq, wk, wv = wqkv[:d], wqkv[d:2 * d], wqkv[2 * d:]
    w1, b1 = blk.ffn[0].weight.tolist(), blk.ffn[0].bias.tolist()
    w2, b2 = blk.ffn[3].weight.tolist(), blk.ffn[3].bias.tolist()
    xs = [[e + p for e, p in zip(E[item], P[t])] for t, item in enumerate(seq)]
    normed = [sasrec_layer_norm(x, blk.norm_attn) for x in xs]
    q, k, v = ([sasrec_matvec(w, n) for n in normed] for w in (wq, wk, wv))
    expected = []
    for t in range(len(seq)):
        attended = []
        for h in range(H):
            part = slice(h * hd, (h + 1) * hd)
            logits = [sum(a * b for a, b in zip(q[t][part], k[j][part])) / math.sqrt(hd)
                      for j in range(t + 1)]
            weights = [math.exp(s) / sum(math.exp(s2) for s2 in logits) for s in logits]
            attended += [sum(weights[j] * v[j][part][i] for j in range(t + 1)) for i in range(hd)]
        x1 = [a + b for a, b in zip(xs[t], attended)]
        hidden = [max(0.0, u) for u in sasrec_matvec(w1, sasrec_layer_norm(x1, blk.norm_ffn), b1)]
        x2 = [a + b for a, b in zip(x1, sasrec_matvec(w2, hidden, b2))]
        expected.append(sasrec_layer_norm(x2, model.norm))
    with torch.no_grad():
        h = model(torch.tensor([seq]))[0]                                    # (3, d)
        r = model.scores(h)                                                  # (3, n_items + 1)
    assert torch.allclose(h, torch.tensor(expected), atol=1e-5)
    # the score of item i at position t is F_t . M_i; item 0 (padding) is never a candidate
    by_hand = [[sum(a * b for a, b in zip(expected[t], E[i])) for i in range(1, 7)]
               for t in range(3)]
    assert torch.allclose(r[:, 1:], torch.tensor(by_hand), atol=1e-5)
    assert torch.isinf(r[:, 0]).all() and (r[:, 0] < 0).all()
    # the padding row of the item table is zero (it adds nothing to a padded position)
    assert not model.item_emb.weight[0].any()


def test_sasrec_a_later_item_never_changes_an_earlier_position():
    model = sasrec_tiny(n_items=30, n_layer=2, n_head=2, d_model=8, dropout=0.3)  # eval(): none
    seq = torch.tensor([[4, 9, 2, 17, 11, 5]])
    with torch.no_grad():
        base = model(seq)
        for t in range(1, seq.shape[1]):
            changed = seq.clone()
            changed[0, t] = 23
            out = model(changed)
            assert torch.allclose(out[0, :t], base[0, :t], atol=1e-6)       # the past: untouched
            assert (out[0, t] - base[0, t]).abs().max() > 1e-3              # the item itself: read
        # padding after the last real item changes nothing either (right padding needs no mask)
        padded = model(torch.tensor([[4, 9, 2, 17, 11, 5, 0, 0, 0]]))
        assert torch.allclose(padded[0, :6], base[0], atol=1e-6)


def test_sasrec_both_losses_equal_their_formulas():
    model = sasrec_tiny(n_items=5, d_model=4)
    torch.manual_seed(1)
    h = torch.randn(2, 3, 4)
    target = torch.tensor([[2, 5, 0], [1, 0, 0]])       # 3 positions with a target, 3 without
    negatives = torch.tensor([4, 1, 3])                 # one per target, in reading order
    E = model.item_emb.weight.detach()
    places = [(0, 0), (0, 1), (1, 0)]

    def score(b, t, i):
        return float(h[b, t] @ E[i])

    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = sum(-math.log(sigma(score(b, t, target[b, t]))) - math.log(1 - sigma(score(b, t, n)))
              for (b, t), n in zip(places, negatives.tolist())) / 3
    # the softmax over items 1..5: padding is no class
    ce = sum(-score(b, t, target[b, t])
             + math.log(sum(math.exp(score(b, t, i)) for i in range(1, 6))) for b, t in places) / 3
    assert sasrec.loss_of(model, h, target, "bce", negatives).item() == pytest.approx(bce, rel=1e-5)
    assert sasrec.loss_of(model, h, target, "ce").item() == pytest.approx(ce, rel=1e-5)
    # the sampled negatives: never the positive, never padding, every other item about equally often
    pos = torch.full((60000,), 3)
    neg = sasrec.sample_negatives(pos, 5, torch.Generator().manual_seed(0))
    counts = torch.bincount(neg, minlength=6).tolist()
    assert counts[0] == counts[3] == 0
    assert all(abs(c - 15000) < 600 for i, c in enumerate(counts) if i not in (0, 3))


def sasrec_tiny_dataset(lengths, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, n_items + 1, n) for n in lengths]
    items = [{"item": i, "title": f"item {i}"} for i in range(1, n_items + 1)]
    return data.Dataset("tiny", [f"u{u}" for u in range(len(seqs))], seqs, items,
                        np.ones((n_items, 8), np.float32))


def test_sasrec_training_rows_hold_exactly_tigers_pairs():
    # users short and long: a sequence of 30 has training targets past position 20, whose histories
    # start in mid-sequence (they get sequences of their own)
    ds = sasrec_tiny_dataset([3, 4, 9, 23, 24, 30, 45])
    train, _, _ = data.split(ds)
    rows = sasrec.training_rows(train)
    pairs = sorted((tuple(train.history[i, :train.length[i]]), int(train.target[i]))
                   for i in range(len(train)))
    from_rows = sorted((tuple(rows.seq[r, :j + 1]), int(rows.target[r, j]))
                       for r, j in zip(*np.nonzero(rows.target)))
    assert from_rows == [(tuple(map(int, h)), t) for h, t in pairs]  # the same pairs, each once
    # a first sequence per user with a training pair (not the user of 3 items: train on 1 item, no
    # pair), and one per target past position 20 (targets run to n - 3)
    assert len(rows) == 6 + (24 - 3 - 20) + (30 - 3 - 20) + (45 - 3 - 20)
    assert (rows.seq[np.arange(len(rows)), rows.length - 1] > 0).all()
    assert all((rows.seq[r, rows.length[r]:] == 0).all() for r in range(len(rows)))
    # and each position of a row predicts exactly what the model predicts for its pair read alone
    model = sasrec_tiny(n_items=40, n_layer=2, d_model=8)
    with torch.no_grad():
        states = model(torch.from_numpy(rows.seq))                           # (N, 20, d)
        for r, j in list(zip(*np.nonzero(rows.target)))[::5]:
            alone = model(torch.from_numpy(rows.seq[r:r + 1, :j + 1]))[0, -1]
            assert torch.allclose(states[r, j], alone, atol=1e-5)


def test_sasrec_ranking_matches_brute_force_with_and_without_the_history():
    model = sasrec_tiny(n_items=30, n_layer=2, d_model=8)
    history = np.array([[5, 7, 5, 0], [12, 0, 0, 0], [1, 2, 3, 4], [30, 29, 0, 0]])
    length = np.array([3, 1, 4, 2])
    kept, removed = sasrec.rank(model, history, length, k=20, batch_size=3, device="cpu")
    for i in range(len(history)):
        h = history[i, :length[i]]
        with torch.no_grad():
            r = model(torch.from_numpy(h)[None])[0, -1] @ model.item_emb.weight.T      # (31,)
        brute = sorted(range(1, 31), key=lambda item: -r[item].item())                  # no item 0
        assert kept[i].tolist() == brute[:20]
        assert removed[i].tolist() == [item for item in brute if item not in h][:20]
        assert not set(removed[i].tolist()) & set(h.tolist()) and 0 not in kept[i].tolist()
    # the metrics are eval.py's, on these rankings: a target inside the history can be found only
    # with the history kept
    examples = data.Examples(user=np.arange(4), history=history, length=length,
                             target=np.array([kept[0, 0].item(), 12, kept[2, 3].item(), 30]),
                             position=length)
    with_history, without = sasrec.evaluate(model, examples, batch_size=2, device="cpu")
    assert with_history == evaluation.metrics(kept, torch.from_numpy(examples.target))
    hits = [int(t in kept[i, :10].tolist()) for i, t in enumerate(examples.target)]
    assert with_history["recall@10"] == pytest.approx(sum(hits) / 4)
    hits = [int(t in removed[i, :10].tolist()) for i, t in enumerate(examples.target)]
    assert without["recall@10"] == pytest.approx(sum(hits) / 4)
    assert 12 not in removed[1].tolist() and 30 not in removed[3].tolist()




def test_sasrec_end_to_end_on_a_beauty_slice_and_no_silent_overwrite(tmp_path):
    folder = make_slice(str(tmp_path / "beauty500"), n_items=500)
    out = str(tmp_path / "out")
    args = [f"--dataset={folder}", f"--out_dir={out}", "--max_steps=300", "--eval_every=100",
            "--batch_size=64", "--lr=0.003", "--dropout=0.2", "--d_model=32"]
    results = sasrec.main(args)
    for split in ("valid", "test"):  # it learnt: well above recommending the most popular items
        assert results[split]["recall@10"] > 1.5 * results[split + "_most_popular"]["recall@10"] > 0
        assert results[split]["ndcg@10"] > 1.5 * results[split + "_most_popular"]["ndcg@10"]
        # the numbers with the history removed from the ranking are kept apart, same metrics
        assert set(results[split + "_history_removed"]) == set(results[split])
    run_dir = os.path.join(out, "beauty500", "sasrec", "ce")          # run "" = the loss's name
    assert sorted(f for f in os.listdir(run_dir) if not f.startswith(".")) == [
        "best.pt", "config.json", "metrics.json"]
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    # what eval.py's report needs to file the run (dataset, ids, seed), and which model it is
    assert {"dataset", "ids", "seed", "model", "loss"} <= set(config)
    assert config["model"] == "sasrec" and config["ids"] == "item"
    with open(os.path.join(run_dir, "metrics.json")) as f:
        assert json.load(f)["test"] == results["test"]
    # best.pt loads without unpickling (plain tensors and values) and reproduces the test metrics
    ckpt = torch.load(os.path.join(run_dir, "best.pt"), weights_only=True)
    assert ckpt["step"] == results["best_step"] and ckpt["settings"]["loss"] == "ce"
    ds = data.load_dataset(folder)
    model = sasrec.load_model(os.path.join(run_dir, "best.pt"), ds)
    again, _ = sasrec.evaluate(model, data.split(ds)[2], 512, "cpu")
    assert again["recall@10"] == pytest.approx(results["test"]["recall@10"])
    with pytest.raises(data.InputError, match="trained on another version of dataset"):
        other = sasrec_tiny_dataset([5] * 9, n_items=ds.n_items)      # the same catalogue, other users
        sasrec.load_model(os.path.join(run_dir, "best.pt"), other)
    # a second run into the same folder is refused, with one line and no traceback ...
    with pytest.raises(data.InputError, match="holds an earlier run"):
        sasrec.main(args)
    cmd = [sys.executable, os.path.join(HERE, "baselines", "sasrec.py")] + args
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--overwrite" in done.stderr
    # ... and --overwrite starts it over; the paper's loss trains too
    again = sasrec.main(args[:2] + ["--max_steps=20", "--eval_every=10", "--overwrite",
                                    "--loss=bce", "--run=ce"])
    assert again["steps"] == 20 and again["log"][-1]["step"] == 20
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["loss"] == "bce"


def test_sasrec_cold_start_trains_without_the_unseen_items_and_splits_the_users(tmp_path,
                                                                               monkeypatch):
    # the measure, by hand: users 0 and 1 hold an unseen item out, user 2 a seen one
    kept = torch.zeros(3, 20, dtype=torch.long)
    kept[:, :2] = torch.tensor([[1, 2], [3, 4], [5, 6]])
    got = sasrec.cold_start_recalls(kept, np.array([2, 9, 5]), np.array([2, 9]))
    assert got["users"] == {"unseen_target": 2, "seen_target": 1}
    assert got["unseen_target"][:2] == [0.0, 0.5] and got["unseen_target"][19] == 0.5
    assert got["seen_target"][0] == 1.0
    # the run: data.split gets the unseen items (no training example holds them), the run folder
    # says cold start, and the test users are split by their held-out item
    folder = make_slice(str(tmp_path / "beauty500"), n_items=500)
    splits, real_split = [], data.split

    def recording_split(ds, unseen=()):  # data.split, noting which items it was told to hold out
        splits.append(unseen)
        return real_split(ds, unseen)
    monkeypatch.setattr(data, "split", recording_split)
    results = sasrec.main([f"--dataset={folder}", f"--out_dir={tmp_path}", "--max_steps=20",
                           "--eval_every=10", "--cold_start=0.2"])
    ds = data.load_dataset(folder)
    unseen = data.unseen_items(ds, 0.2)
    assert len(splits) == 1 and len(unseen) and np.array_equal(splits[0], unseen)
    users = results["test_cold_start"]["users"]
    assert users["unseen_target"] > 0 and sum(users.values()) == len(real_split(ds)[2])
    assert os.path.isfile(os.path.join(tmp_path, "beauty500", "sasrec", "ce-cold0.2",
                                       "metrics.json"))


@pytest.mark.parametrize("flag, message", [
    ("--loss=mse", "loss must be one of ce, bce"),
    ("--n_head=3", "multiple of n_head"),
    ("--dropout=1.0", r"dropout must be in \[0, 1\)"),
    ("--run=../x", "plain folder name"),
    ("--lr=fast", "'lr' must be a float"),
])
def test_sasrec_bad_settings_are_refused_at_the_door(tmp_path, flag, message):
    with pytest.raises(data.InputError, match=message):
        sasrec.main([f"--out_dir={tmp_path}", flag])
    assert not os.listdir(tmp_path)  # nothing written


# ==============================================================================================
# Part II. The workshop: what real use needs around the method

# ==============================================================================================
# 7. Settings checked at the door

DEFAULTS = {"lr": 0.01, "steps": 100, "dataset": "beauty", "compile": False}


def test_configure_overrides_defaults_with_a_file_then_flags(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("# a config file\nsteps = 200\nlr = 1\n")
    cfg = data.configure(DEFAULTS, [str(cfg_file), "--dataset=toys", "--compile", "--steps=300"])
    assert cfg == {"lr": 1.0, "steps": 300, "dataset": "toys", "compile": True}
    assert data.configure(DEFAULTS, ["--dataset=2024"])["dataset"] == "2024"   # a string stays text


@pytest.mark.parametrize("argv, contents, expected", [
    (["--stesp=3"], None, "unknown setting 'stesp'"),
    (["--steps=1e3"], None, "'steps' must be a int"),
    (["--lr=1e999"], None, "'lr' must be a finite number"),
    (["--steps"], None, "write settings as --steps=value"),
    ([], "import os\n", "only `name = value` lines"),
    ([], "steps = (\n", "line 1: not a valid `name = value` line"),
    ([], "steps = int('3')\n", "line 1: the value must be a literal"),
    ([], "steps = [1, 2]\n", "'steps' must be a int"),
    ([], b"steps = 3  # \xff\xfe\n", "is not UTF-8 text"),
])
def test_configure_rejects_bad_settings_in_one_line(tmp_path, argv, contents, expected):
    if contents is not None:
        path = tmp_path / "c.py"
        path.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
        argv = [str(path)] + argv
    with pytest.raises(data.InputError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        data.configure(DEFAULTS, argv)


def test_check_settings_reads_brackets_as_closed_and_parentheses_as_open():
    rules = {"a": "[0, 1)", "b": "(0, inf)", "c": ("x", "y")}
    data.check_settings({"a": 0.0, "b": 1e-9, "c": "x"}, rules)
    for bad in ({"a": 1.0}, {"b": 0.0}, {"c": "z"}, {"a": -0.1}):
        with pytest.raises(data.InputError):
            data.check_settings({"a": 0.5, "b": 1.0, "c": "y", **bad}, rules)


def test_help_lists_the_settings_and_exits_cleanly():
    out = subprocess.run([sys.executable, "tiger.py", "--help"], cwd=HERE, capture_output=True, text=True)
    assert out.returncode == 0 and "--lr=0.003" in out.stdout and "--user_token=False" in out.stdout


@pytest.mark.parametrize("flags, expected", [
    (["--fit_with=books"], "unknown dataset books"),
    (["--fit_with=beauty"], "names the dataset itself"),
    (["--fit_with=toys", "--ids=lsh"], "rqvae or rqkmeans only"),
    (["--fit_with=toys", "--cold_start=0.05"], "cannot be combined"),
])
def test_prepare_checks_fit_with_at_the_door(tmp_path, flags, expected):
    with pytest.raises(data.InputError, match=expected):
        prepare.main(flags + [f'--out_dir={tmp_path}'])
    assert not os.path.exists(tmp_path / 'beauty')


@pytest.mark.parametrize("flag, expected", [
    ("--codebook_size=0", "codebook_size must be in"),
    ("--lr=-1.0", "lr must be in"),
    ("--lsh_bits=64", "lsh_bits must be in"),
    ("--seed=-3", "seed must be in"),
    ("--ids=hash", "ids must be one of rqvae, rqkmeans, lsh, random"),
    ("--ids=rqvae --batch_size=100", "codebook_size 256 is larger than the 100 items"),
])
def test_prepare_checks_every_setting_at_the_door(tmp_path, flag, expected):
    with pytest.raises(data.InputError, match=expected):
        prepare.main(flag.split() + [f'--out_dir={tmp_path}'])
    assert not os.path.exists(tmp_path / 'beauty')          # nothing was started


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "config", "*.py"))),
                         ids=os.path.basename)
def test_every_shipped_config_file_loads_and_passes_the_checks(path):
    if os.path.basename(path).startswith("tiger_"):
        settings = data.configure(tiger.DEFAULTS, [path])
        tiger.validate_settings({**settings, "device": "cpu"})
    elif os.path.basename(path).startswith("sasrec_"):
        settings = data.configure(sasrec.DEFAULTS, [path])
        sasrec.validate_settings({**settings, "device": "cpu"})
    else:
        settings = data.configure(prepare.DEFAULTS, [path])
        rqvae.check_config(settings, n_items=12101)
    if "paper" in path:
        assert settings["ids"] == "rqvae"           # the paper's configs run the paper's Semantic IDs


def test_a_dataset_smaller_than_the_codebook_is_one_clear_error(tmp_path):
    folder = _write_dataset(str(tmp_path / "tiny"), ["u1 1 2 3", "u2 3 2 1"], items=3)
    with pytest.raises(data.InputError, match="codebook_size 256 is larger than the 3 items"):
        prepare.main([f'--dataset={folder}', '--ids=rqkmeans', f'--out_dir={tmp_path}'])


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden"])
def test_a_run_name_cannot_escape_its_folder(beauty_slice, name):
    with pytest.raises(data.InputError, match="run must be a plain folder name"):
        tiger.main(run_args(beauty_slice, name))


@pytest.mark.parametrize("flag, expected", [
    ("--grad_clip=0.0", "grad_clip must be in"), ("--grad_clip=-1.0", "grad_clip must be in"),
    ("--lr=1e9", "lr must be in"), ("--lr=0.0", "lr must be in"), ("--weight_decay=-0.1", "weight_decay"),
    ("--user_dropout=1.0", "user_dropout must be in"), ("--beam_size=5", "beam_size must be in"),
    ("--seed=-1", "seed must be in"), ("--softmax=sparse", "softmax must be one of level, full"),
    ("--ids=hash", "ids must be one of"), ("--n_head=0", "n_head must be in"),
    ("--user_token=False --user_dropout=0.5", "user_dropout hides the user token"),
])
def test_out_of_range_settings_are_refused_before_any_work(beauty_slice, flag, expected):
    with pytest.raises(data.InputError, match=expected):
        tiger.main(run_args(beauty_slice, "refused") + flag.split())
    assert not os.path.exists(run_dir(beauty_slice, "refused"))


@pytest.mark.parametrize("flags, expected", [
    (["--demo=100000"], "--demo=100000, but the test split has only"),
    (["--beam_size=5"], "--beam_size must be >= 10"),
    (["--split=train"], "split must be one of valid, test"),
    (["--epsilon=1.5"], r"epsilon must be in \[0, 1\]"),
    (["--drop_history=True", "--constrained=False"], "--drop_history applies to scoring a split"),
])
def test_eval_options_out_of_range_are_one_clear_error(trained, flags, expected):
    with pytest.raises(data.InputError, match=expected):
        evaluation.main([f"--ckpt={os.path.join(trained, 'best.pt')}"] + flags)


# ==============================================================================================
# 8. Files and artefacts on disk

# ---- the shipped files and atomic writes ---------------------------------------------------

def _write_dataset(folder, seq_lines, items=3, emb=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sequences.txt"), "w") as f:
        f.write("\n".join(seq_lines) + "\n")
    with open(os.path.join(folder, "items.jsonl"), "w") as f:
        for i in range(1, items + 1):
            f.write(f'{{"item": {i}, "title": "item {i}"}}\n')
    np.save(os.path.join(folder, "item_emb.npy"), np.ones((items, 8), np.float16) if emb is None else emb)
    return folder


@pytest.mark.parametrize("case, expected", [
    ("missing", "item_emb.npy: file missing"),
    ("rows", "shape (2, 8), but items.jsonl lists 3 items"),
    ("nan", "hold NaN or inf, first at row 1 (item id 2)"),
    ("range", "line 2: item id 4 is out of range"),
    ("malformed", "line 1: 'u1 1 x 3' is malformed"),
    ("short", "line 2: user u2 has 2 item(s)"),
])
def test_bad_inputs_give_one_clear_error(tmp_path, case, expected):
    folder = str(tmp_path / case)
    good = ["u1 1 2 3", "u2 3 2 1"]
    if case == "missing":
        _write_dataset(folder, good)
        os.remove(os.path.join(folder, "item_emb.npy"))
    elif case == "rows":
        _write_dataset(folder, good, emb=np.ones((2, 8), np.float16))
    elif case == "nan":
        emb = np.ones((3, 8), np.float16)
        emb[1, 4] = np.nan
        _write_dataset(folder, good, emb=emb)
    elif case == "range":
        _write_dataset(folder, ["u1 1 2 3", "u2 1 4 2"])
    elif case == "malformed":
        _write_dataset(folder, ["u1 1 x 3", "u2 3 2 1"])
    elif case == "short":
        _write_dataset(folder, ["u1 1 2 3", "u2 3 2"])
    with pytest.raises(data.InputError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        data.load_dataset(folder)
    assert folder in str(err.value)  # the message names the file
    # and the command line shows it as one line, not a traceback
    if case == "range":
        out = subprocess.run([sys.executable, "-c", f"import data, sys\ntry: data.load_dataset({folder!r})\n"
                              f"except data.InputError as e: sys.exit(f'error: {{e}}')"],
                             cwd=HERE, capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_failed_write_is_one_error_and_leaves_nothing_behind(tmp_path):
    def disk_full(f):
        f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(data.InputError, match=r"cannot write .*x\.npy: No space left on device"):
        data.write_atomic(str(tmp_path / "x.npy"), disk_full)
    assert os.listdir(tmp_path) == []
    with pytest.raises(data.InputError, match="cannot write"):   # a folder that does not exist
        data.write_json(str(tmp_path / "nowhere" / "x.json"), {})
    (tmp_path / "file").write_text("")
    with pytest.raises(data.InputError, match="cannot create"):  # a folder where a file is
        data.make_dirs(str(tmp_path / "file" / "sub"))


def test_folder_lock_admits_one_writer_and_cleans_up_after_a_killed_one(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("12345")                      # left by a process that was killed
    (folder / (data.TMP_PREFIX + "ckpt.pt123")).write_bytes(b"half a checkpoint")
    with data.folder_lock(str(folder)):
        assert (folder / ".lock").read_text() == str(os.getpid())
        assert sorted(os.listdir(folder)) == [".lock"]          # the killed writer's temp file is gone
        with pytest.raises(data.InputError, match=f"in use by another running process .pid {os.getpid()}"):
            with data.folder_lock(str(folder)):                 # nobody else gets in meanwhile
                pass
    with data.folder_lock(str(folder)):                         # released at the end
        pass
    code = f"import data, time\nwith data.folder_lock({str(folder)!r}):\n    print('in', flush=True)\n" \
           f"    time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "in\n"                  # another process holds it
    with pytest.raises(data.InputError, match="in use by another running process"):
        with data.folder_lock(str(folder)):
            pass
    holder.kill()                                               # killed: the OS releases its lock
    holder.wait()
    with data.folder_lock(str(folder)):
        pass


# ---- prepare.py's builds and the Semantic-ID reader ----------------------------------------

def test_ids_fitted_with_other_datasets_have_their_own_folder():
    assert data.ids_folder("out", "beauty", "rqvae", fit_with="toys, sports") == os.path.join(
        "out", "beauty", "rqvae-with-sports+toys")
    assert data.ids_folder("out", "beauty", "rqvae", fit_with="") == os.path.join("out", "beauty", "rqvae")


@pytest.fixture(scope="module")
def lsh_out(tmp_path_factory):
    """LSH IDs of Beauty, built once (a few seconds): out folder, codes."""
    out = tmp_path_factory.mktemp("lsh")
    codes, _, reused = prepare.main(['--ids=lsh', f'--out_dir={out}'])
    assert not reused
    return out, codes


def test_prepare_writes_a_finished_build_and_reuses_it(lsh_out, beauty, capsys):
    out, codes = lsh_out
    folder = out / 'beauty' / 'lsh'
    assert codes.shape == (12101, 5)
    assert sorted(os.listdir(folder)) == ['.lock', 'codes.npy', 'config.json', 'stats.json']  # no temp files
    assert np.array_equal(data.load_codes(beauty, 'lsh', str(out)), codes)
    assert prepare.main(['--ids=lsh', f'--out_dir={out}'])[2]            # second run: reused
    assert 'reusing' in capsys.readouterr().out


@pytest.mark.parametrize("damage, expected", [
    ("garbage", "cannot be read"),
    ("swapped rows", "not the table this build wrote"),
    ("shape", "shape"),
    ("no config.json", "missing"),
])
def test_id_reader_refuses_a_damaged_table_and_prepare_rebuilds_it(tmp_path, beauty, damage, expected):
    args = ['--ids=random', f'--out_dir={tmp_path}']
    codes = prepare.main(args)[0]
    folder = tmp_path / 'beauty' / 'random'
    if damage == "garbage":
        (folder / 'codes.npy').write_bytes(b'not a numpy file')
    elif damage == "swapped rows":     # a valid-looking table: only the checksum can tell
        np.save(folder / 'codes.npy', codes[::-1].copy())
    elif damage == "shape":
        np.save(folder / 'codes.npy', codes[:100])
    else:
        os.remove(folder / 'config.json')
    with pytest.raises(data.InputError, match=expected):
        data.load_codes(beauty, 'random', str(tmp_path))
    again, _, reused = prepare.main(args)
    assert not reused and np.array_equal(again, codes)


def test_id_reader_refuses_ids_built_from_other_embeddings(tmp_path):
    # two dataset folders with the same name share out/<name>/<ids>/: the second one's IDs are not
    # the first one's, and its embeddings' fingerprint says so; the fix command keeps --out_dir
    a = _write_dataset(str(tmp_path / "a" / "shop"), ["u1 1 2 3", "u2 3 2 1"], items=3)
    b = _write_dataset(str(tmp_path / "b" / "shop"), ["u1 1 2 3", "u2 3 2 1"], items=3,
                       emb=np.eye(3, 8, dtype=np.float16))
    out = str(tmp_path / "out")
    prepare.main([f'--dataset={a}', '--ids=random', f'--out_dir={out}'])
    with pytest.raises(data.InputError, match=rf"other item embeddings.*--dataset={b} --ids=random "
                                              rf"--out_dir={out} --force"):
        data.load_codes(data.load_dataset(b), 'random', out, dataset=b)


def test_id_reader_refuses_another_schemes_folder(lsh_out, beauty, tmp_path):
    import shutil
    out, _ = lsh_out
    shutil.copytree(out / 'beauty' / 'lsh', tmp_path / 'beauty' / 'random')   # wrong files, right name
    with pytest.raises(data.InputError, match='lsh IDs'):
        data.load_codes(beauty, 'random', str(tmp_path))


def test_prepare_rqvae_writes_weights_and_rejects_foreign_ones(tmp_path):
    # 2 epochs leave the codes crowded, so allow big collision groups in this test
    args = ['--ids=rqvae', f'--out_dir={tmp_path}', '--n_epochs=2', '--kmeans_iters=3', '--collision_size=20000']
    codes, stats, reused = prepare.main(args)
    folder = tmp_path / 'beauty' / 'rqvae'
    assert not reused and codes.shape == (12101, 4) and len(np.unique(codes, axis=0)) == 12101
    assert json.loads((folder / 'config.json').read_text())['n_epochs'] == 2
    assert prepare.main(args)[2]
    # weights that do not give these codes (another seed's model) are detected, and the IDs rebuilt
    other = rqvae.build_model(dict(latent_dim=32, n_levels=3, codebook_size=256))
    torch.save(other.state_dict(), folder / 'rqvae.pt')
    assert not prepare.main(args)[2]
    (folder / 'rqvae.pt').write_bytes(b'garbage')
    assert not prepare.main(args)[2]


def test_a_failed_rebuild_keeps_the_previous_build(tmp_path, beauty, monkeypatch):
    args = ['--ids=random', f'--out_dir={tmp_path}']
    codes = prepare.main(args)[0]
    folder = tmp_path / 'beauty' / 'random'
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    real_write = data.write_atomic

    def full_at_stats(path, write):           # the disk fills up while the new build is written
        if 'stats.json' in path:
            raise data.InputError(f"cannot write {path}: No space left on device")
        real_write(path, write)
    monkeypatch.setattr(data, "write_atomic", full_at_stats)
    with pytest.raises(data.InputError, match="No space left"):
        prepare.main(args + ['--force', '--seed=5'])
    monkeypatch.setattr(data, "write_atomic", real_write)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before   # nothing changed
    assert np.array_equal(data.load_codes(beauty, 'random', str(tmp_path)), codes)


# ==============================================================================================
# 9. Runs: checkpoints, resume, overwrite; what a user can get wrong

def test_interrupted_run_resumes_to_the_same_result(beauty_slice, monkeypatch):
    # dropout draws random numbers, so resuming must restore the RNG; the weight average must be restored too
    small = ["--dropout=0.1", "--ema=0.9", "--item_dropout=0.1", "--user_token=True", "--user_dropout=0.3"]
    whole = tiger.main(run_args(beauty_slice, "whole") + small)
    real_save = tiger.save_checkpoint

    def save_then_crash(path, obj):  # the process dies right after the first checkpoint
        real_save(path, obj)
        if path.endswith("ckpt.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(tiger, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tiger.main(run_args(beauty_slice, "cut") + small)
    monkeypatch.setattr(tiger, "save_checkpoint", real_save)
    resumed = tiger.main(run_args(beauty_slice, "cut") + small + ["--resume"])
    assert resumed["test"] == whole["test"] and resumed["log"] == whole["log"]
    a = torch.load(os.path.join(run_dir(beauty_slice, "whole"), "ckpt.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(run_dir(beauty_slice, "cut"), "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resumed run with other settings is refused
    with pytest.raises(data.InputError, match="other settings .lr."):
        tiger.main(run_args(beauty_slice, "cut") + small + ["--resume", "--lr=0.1"])  # a later flag wins


@pytest.fixture(scope="module")
def trained(beauty_slice):
    """A short finished run on the slice: its run folder."""
    tiger.main(run_args(beauty_slice, "trained", steps=20))
    return run_dir(beauty_slice, "trained")


def test_a_checkpoint_is_scored_with_the_ids_it_was_trained_on(beauty_slice, trained, tmp_path):
    folder, out = beauty_slice
    shutil.copytree(out, tmp_path / "out")
    best = str(tmp_path / "out" / "beauty1k" / IDS / "trained" / "best.pt")
    before = evaluation.main([f"--ckpt={best}", "--split=valid"])
    # prepare.py rebuilds the IDs in place (other settings): the checkpoint still decodes with its own
    prepare.main([f"--dataset={folder}", f"--out_dir={tmp_path / 'out'}", "--seed=7"])
    assert evaluation.main([f"--ckpt={best}", "--split=valid"]) == before
    # and the run cannot go on with the new IDs
    args = run_args(beauty_slice, "trained", steps=20)
    args[1] = f"--out_dir={tmp_path / 'out'}"
    with pytest.raises(data.InputError, match="Semantic IDs or data of this run changed after it started"):
        tiger.main(args + ["--resume"])


def test_ids_learnt_with_another_dataset_get_their_own_folder_and_a_run_trains_on_them(beauty_slice, tmp_path,
                                                                                        monkeypatch):
    folder, out = beauty_slice
    shutil.copytree(out, tmp_path / "out")
    out = str(tmp_path / "out")
    args = [f"--dataset={folder}", f"--out_dir={out}", "--fit_with=toys", "--kmeans_iters=3", "--collision_size=2000"]
    codes, _, reused = prepare.main(args)
    assert not reused and os.path.isfile(os.path.join(out, "beauty1k", IDS + "-with-toys", "codes.npy"))
    main_codes = data.load_codes(data.load_dataset(folder), IDS, out)         # the main build is untouched
    assert codes.shape == main_codes.shape and not np.array_equal(codes, main_codes)
    assert prepare.main(args)[2]                                              # and it is reused
    args = run_args(beauty_slice, "joint", steps=20)
    args[1] = f"--out_dir={out}"
    tiger.main(args + ["--fit_with=toys"])
    ckpt = torch.load(os.path.join(out, "beauty1k", IDS + "-with-toys", "joint", "best.pt"), weights_only=True)
    assert np.array_equal(ckpt["codes"].numpy(), codes) and ckpt["settings"]["fit_with"] == "toys"
    with pytest.raises(data.InputError, match=IDS + r"-with-sports\+toys.*missing.*--fit_with=sports,toys"):
        tiger.main(args + ["--fit_with=toys,sports", "--run=other"])
    toys = data.fit_with_embeddings("toys")                       # toys re-embedded since: the IDs are stale
    monkeypatch.setattr(data, "fit_with_embeddings", lambda names: toys + 1)
    with pytest.raises(data.InputError, match="embeddings of toys changed.*--fit_with=toys.*--force"):
        tiger.main(args + ["--fit_with=toys", "--run=stale"])


def test_a_second_run_with_the_same_name_is_refused(beauty_slice, trained):
    before = {f: os.path.getmtime(os.path.join(trained, f)) for f in ("best.pt", "ckpt.pt", "metrics.json")}
    with pytest.raises(data.InputError, match="holds an earlier run .*--resume.*--overwrite.*--run=NAME"):
        tiger.main(run_args(beauty_slice, "trained", steps=20))
    assert {f: os.path.getmtime(os.path.join(trained, f)) for f in before} == before   # untouched


def test_overwrite_starts_a_run_over(beauty_slice):
    tiger.main(run_args(beauty_slice, "again", steps=20))
    log = tiger.main(run_args(beauty_slice, "again", steps=40) + ["--overwrite"])["log"]
    assert [entry["step"] for entry in log] == [20, 40]     # a new run, not the old one continued


def test_overwrite_that_fails_to_start_keeps_the_earlier_run(beauty_slice, trained):
    before = {f: os.path.getmtime(os.path.join(trained, f)) for f in ("best.pt", "ckpt.pt", "metrics.json")}
    with pytest.raises(data.InputError, match="prepare.py"):                  # no lsh IDs: cannot start
        tiger.main(run_args(beauty_slice, "trained", steps=20) + ["--overwrite", "--ids=lsh"])
    with pytest.raises(data.InputError, match="give one of them"):
        tiger.main(run_args(beauty_slice, "trained", steps=20) + ["--overwrite", "--resume"])
    assert {f: os.path.getmtime(os.path.join(trained, f)) for f in before} == before


def test_eval_scores_the_weight_average_that_was_validated(beauty_slice):
    results = tiger.main(run_args(beauty_slice, "averaged", steps=20) + ["--ema=0.9"])
    folder = run_dir(beauty_slice, "averaged")
    from_ckpt = evaluation.main([f"--ckpt={os.path.join(folder, 'ckpt.pt')}", "--split=valid"])
    # ckpt.pt's average = best.pt's model (one evaluation): the same metrics
    assert {k: from_ckpt[k] for k in results["valid"]} == results["valid"]


def test_two_live_runs_never_share_a_folder(beauty_slice):
    folder = run_dir(beauty_slice, "busy")
    with data.folder_lock(folder):                          # another run is writing this folder
        with pytest.raises(data.InputError, match="in use by another running process"):
            tiger.main(run_args(beauty_slice, "busy", steps=20))
        assert sorted(os.listdir(folder)) == [".lock"]      # the refused run wrote nothing
    assert not os.path.exists(folder)                       # and the lock left no empty folder


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(beauty_slice, monkeypatch):
    real_step = tiger.train_step

    def step_that_blows_up(model, opt, batch, step, *args):
        if step == 25:                                       # the weights turn to NaN mid-run
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real_step(model, opt, batch, step, *args)
    monkeypatch.setattr(tiger, "train_step", step_that_blows_up)
    with pytest.raises(data.InputError, match="training loss became nan at step 40"):
        tiger.main(run_args(beauty_slice, "nan", steps=60))
    for name in ("ckpt.pt", "best.pt"):
        ckpt = torch.load(os.path.join(run_dir(beauty_slice, "nan"), name), weights_only=True)
        assert ckpt["step"] == 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_missing_ids_say_how_to_build_them_with_the_users_options(beauty_slice):
    folder, out = beauty_slice
    with pytest.raises(data.InputError, match=f"run `python prepare.py --dataset={folder} --ids=lsh "
                                              f"--out_dir={out}`"):
        tiger.main(run_args(beauty_slice, "nolsh") + ["--ids=lsh"])


def test_resuming_from_the_wrong_kind_of_checkpoint_is_refused(beauty_slice, trained):
    import shutil
    folder = run_dir(beauty_slice, "wrongkind")
    os.makedirs(folder)
    shutil.copy(os.path.join(trained, "best.pt"), os.path.join(folder, "ckpt.pt"))  # no optimizer state
    with pytest.raises(data.InputError, match="not a training checkpoint .ckpt.pt. to resume; it lacks"):
        tiger.main(run_args(beauty_slice, "wrongkind", steps=20) + ["--resume"])
    with pytest.raises(data.InputError, match="no .* to continue"):
        tiger.main(run_args(beauty_slice, "neverrun", steps=20) + ["--resume"])


@pytest.mark.parametrize("edit", ["settings", "model_config", "codes"])
def test_a_hand_edited_checkpoint_is_refused(trained, tmp_path, edit):
    ckpt = torch.load(os.path.join(trained, "best.pt"), weights_only=True)
    if edit == "settings":
        ckpt["settings"]["d_model"] = 32
    elif edit == "model_config":
        ckpt["model_config"]["levels"] = ckpt["model_config"]["levels"][:2]
    else:
        ckpt["codes"] = ckpt["codes"][:, :3]
    torch.save(ckpt, tmp_path / "best.pt")
    with pytest.raises(data.InputError, match="inconsistent"):
        evaluation.main([f"--ckpt={tmp_path / 'best.pt'}"])


def test_a_checkpoint_from_an_older_tiger_py_says_so(trained, tmp_path):
    ckpt = torch.load(os.path.join(trained, "best.pt"), weights_only=True)
    old = {"model": ckpt["model"], "config": ckpt["settings"], "step": ckpt["step"]}  # the old layout
    torch.save(old, tmp_path / "best.pt")
    with pytest.raises(data.InputError, match="written by an older tiger.py .it lacks codes, ids_fingerprint"):
        evaluation.main([f"--ckpt={tmp_path / 'best.pt'}"])


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, protocol):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    with open(tmp_path / "best.pt", "wb") as f:
        pickle.dump({"model": Exploit()}, f, protocol=protocol)
    named = r" \(\w+\.system\)" if protocol == 2 else ""   # torch names the callable it met, if it got that far
    with pytest.raises(data.InputError, match=f"refused to load .* unpickling it would run code{named}; only"):
        evaluation.main([f"--ckpt={tmp_path / 'best.pt'}"])
    assert not (tmp_path / "pwned").exists()


def test_a_corrupt_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(data.InputError, match="corrupt or not a nanoTIGER checkpoint"):
        evaluation.main([f"--ckpt={tmp_path / 'best.pt'}"])


# ---- data-parallel training (torchrun) -------------------------------------------------------

def torchrun(args, processes=2):
    """tiger.py under torchrun, as CPU processes (gloo), one thread each. The `--` ends torchrun's
    own options: it would read --run=NAME as an abbreviation of its --run-path."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", "tiger.py", "--", *args],
                          cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def ddp_runs(beauty_slice):
    """The same short run by one process and by two (torchrun): (their run args, folders, and the
    two processes' output). A batch of 230 leaves an epoch's last batch 7 examples, shared 4 and
    3 by the two processes; seed 61 puts it at the third step. Input dropout is on: its random
    mask must be the same for the global batch in both runs."""
    folder, _ = beauty_slice
    train_ex = data.split(data.load_dataset(folder))[0]
    assert [len(b) for b in data.epoch_batches(train_ex, 230, [61, 0], True)][2] == 7
    tiny = ["--batch_size=230", "--seed=61", "--eval_users=64", "--item_dropout=0.3",
            "--user_token=True", "--user_dropout=0.3", "--precision=fp32", "--n_layer=1",
            "--d_model=32", "--d_ff=64", "--head_dim=16", "--warmup_steps=1"]
    args = {n: run_args(beauty_slice, f"ddp{n}", steps=4, every=1) + tiny for n in (1, 2)}
    one = subprocess.run([sys.executable, "tiger.py", *args[1]], cwd=HERE, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(args[2])
    assert two.returncode == 0, two.stderr[-3000:]
    return args, {n: run_dir(beauty_slice, f"ddp{n}") for n in (1, 2)}, two


def test_two_processes_train_as_one_process_with_the_same_global_batch(ddp_runs):
    _, folders, two = ddp_runs
    one_log, two_log = (json.load(open(os.path.join(folders[n], "metrics.json")))["log"]
                        for n in (1, 2))
    # the loss of the global batch at every step (each step validates): gradients averaged over
    # the processes, each process's share weighted (the third step's shares are 4 and 3)
    assert [e["step"] for e in two_log] == [1, 2, 3, 4]
    assert [e["loss"] for e in two_log] == pytest.approx([e["loss"] for e in one_log], rel=1e-5)
    assert two_log[-1]["loss"] < two_log[0]["loss"]
    # only rank 0 wrote into the run folder, and only rank 0 spoke
    assert sorted(os.listdir(folders[2])) == [".lock", "best.pt", "ckpt.pt", "config.json",
                                              "metrics.json"]
    assert two.stdout.count("step 4: loss") == 1 and two.stdout.count("TIGER, test") == 1
    provenance = json.load(open(os.path.join(folders[2], "metrics.json")))["provenance"]
    assert provenance["processes"] == 2


def test_two_processes_evaluate_exactly_as_one(ddp_runs, beauty_slice):
    # the one-process run's folder, resumed by two processes: nothing left to train, so they
    # validate and test its best.pt, each decoding its run of the batches (5 and 4 of 9), and
    # get the very same metrics. (In training, each validation of 64 users is one batch: the
    # second process decodes none, and gets the first one's rankings.)
    args, folders, _ = ddp_runs
    shutil.copytree(folders[1], run_dir(beauty_slice, "ddp_resumed"))
    resumed = torchrun(args[1] + ["--run=ddp_resumed", "--resume"])   # a later flag wins
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stdout
    one, two = (json.load(open(os.path.join(f, "metrics.json")))
                for f in (folders[1], run_dir(beauty_slice, "ddp_resumed")))
    for key in ("valid", "test", "log", "best_step"):
        assert two[key] == one[key]


def test_torchrun_refusals_are_one_error_from_rank_0_and_write_nothing(ddp_runs, beauty_slice):
    args, folders, _ = ddp_runs
    # a batch the processes cannot share evenly: refused by every process before any work
    odd = torchrun(args[2] + ["--run=ddp_odd", "--batch_size=229"])
    assert odd.returncode != 0 and not os.path.exists(run_dir(beauty_slice, "ddp_odd"))
    assert odd.stderr.startswith("error: batch_size=229 cannot be shared evenly by the 2 "
                                 "processes") and odd.stderr.count("error:") == 1
    # rank 0's refusal (the folder holds a run, no --resume) stops the other process too
    before = {f: os.path.getmtime(os.path.join(folders[2], f))
              for f in ("best.pt", "ckpt.pt", "config.json", "metrics.json")}
    again = torchrun(args[2])
    assert again.returncode != 0 and again.stderr.count("error:") == 1
    assert again.stderr.startswith("error: ") and "holds an earlier run" in again.stderr
    assert "Traceback" not in again.stderr.split("elastic")[0]   # before torchrun's report
    assert {f: os.path.getmtime(os.path.join(folders[2], f)) for f in before} == before


# ==============================================================================================
# 10. The report and the command line

def write_run(folder, dataset, seed, recall10, ids="rqvae", **settings):
    os.makedirs(folder, exist_ok=True)
    data.write_json(os.path.join(folder, "config.json"), {**tiger.DEFAULTS, "dataset": dataset, "ids": ids,
                                                         "seed": seed, **settings})
    test = {"recall@5": recall10 / 2, "ndcg@5": recall10 / 4, "recall@10": recall10, "ndcg@10": recall10 / 3}
    data.write_json(os.path.join(folder, "metrics.json"), {
        "test": test, "test_most_popular": {"recall@10": 0.0114}, "wall_s": 600.0, "best_step": 12000,
        "provenance": {"command": "python tiger.py", "commit": "abc1234", "machine": "AMD EPYC", "threads": 2}})


def test_report_sets_every_finished_run_beside_the_paper(tmp_path, capsys):
    out = tmp_path / "out"
    write_run(out / "beauty" / "rqvae" / "tiger", "beauty", 1337, 0.0490)
    write_run(out / "beauty" / "rqvae" / "seed1", "beauty", 1, 0.0500)
    write_run(out / "beauty" / "rqvae" / "user", "beauty", 1337, 0.0400, user_token=True)
    write_run(out / "beauty" / "rqvae" / "long", "beauty", 1337, 0.0600, user_token=True, max_steps=48000)
    write_run(out / "beauty" / "rqkmeans" / "joint", "beauty", 1337, 0.0450, ids="rqkmeans", fit_with="sports,toys",
              user_token=True, user_dropout=0.5)
    write_run(out / "toys" / "lsh" / "tiger", "toys", 1337, 0.0300, ids="lsh")
    write_run(out / "sports" / "rqvae" / "old", "sports", 1337, 0.0240, user_dropout=0.5)
    old_config = out / "sports" / "rqvae" / "old" / "config.json"           # written before --user_token
    old_config.write_text(json.dumps({k: v for k, v in json.loads(old_config.read_text()).items() if k != "user_token"}))
    (out / "beauty" / "rqvae").mkdir(exist_ok=True)                          # an ID folder: not a run
    evaluation.main([f"--report={out}"])
    table = capsys.readouterr().out
    # two seeds of the default: mean 0.0495, standard error 0.0005 (std 0.000707 / sqrt 2)
    assert "| beauty | rqvae | default | 2 | 0.0248 ± 0.0003 | 0.0124 ± 0.0001 | 0.0495 ± 0.0005 |" in table
    assert "| beauty | paper, Table 1 | | | 0.0454 | 0.0321 | 0.0648 | 0.0384 | |" in table
    assert "| beauty | paper, Table 9 | | 3 | 0.0441 ± 0.0007 |" in table      # beside the seeds' mean
    assert "| beauty | rqvae | user_token=True | 1 | 0.0200 |" in table       # Table 8's row with the token
    assert "| beauty | paper, Table 8 | | | 0.0454 | 0.0321 | 0.0648 | 0.0384 | |" in table
    lines = table.splitlines()       # a recipe the paper did not measure gets no paper row beside it
    after_long = lines[lines.index("| beauty | rqvae | max_steps=48000 user_token=True | 1 | 0.0300 | 0.0150 | "
                                   "0.0600 | 0.0200 | 0.0114 |") + 1]
    assert "paper" not in after_long
    assert "| beauty | rqkmeans | fit_with=sports,toys user_dropout=0.5 user_token=True | 1 | 0.0225 |" in table
    assert "| beauty | paper, Table 10 | | | 0.0435 | 0.0305 | 0.0631 | 0.0368 | |" in table
    assert "sports/rqvae/old: written before the setting(s) user_token existed" in table   # left out
    assert "| sports |" not in table
    assert "| toys | lsh | default | 1 | 0.0150 |" in table and "| toys | paper, Table 1" not in table
    assert "| toys | paper, Table 2 | | | 0.0412 | 0.0299 | 0.0566 | 0.0349 | |" in table
    assert "| 10.0 min | abc1234 | AMD EPYC, threads: 2 | `python tiger.py` |" in table


def test_report_sets_the_papers_sasrec_beside_either_loss_not_beside_cold_start(tmp_path, capsys):
    out = tmp_path / "out"
    for run, recall10, settings in (("ce", 0.0700, {}),
                                    ("bce", 0.0400, {"loss": "bce", "max_steps": 72000}),
                                    ("ce-cold0.05", 0.0600, {"cold_start": 0.05})):
        write_run(out / "beauty" / "sasrec" / run, "beauty", 1337, recall10)
        data.write_json(os.path.join(out, "beauty", "sasrec", run, "config.json"),
                        {**sasrec.DEFAULTS, "model": "sasrec", "ids": "item", **settings})
    evaluation.main([f"--report={out}"])
    lines = capsys.readouterr().out.splitlines()
    paper = "| beauty | paper, Table 1, SASRec | | | 0.0387 | 0.0249 | 0.0605 | 0.0318 | |"
    for recipe in ("default", "loss=bce max_steps=72000"):
        row = next(i for i, line in enumerate(lines) if line.startswith(f"| beauty | item | {recipe} |"))
        assert lines[row + 1] == paper
    row = next(i for i, line in enumerate(lines) if "| cold_start=0.05 |" in line)
    assert "paper" not in lines[row + 1]


def test_report_refuses_a_malformed_run_naming_the_file(tmp_path):
    write_run(tmp_path / "beauty" / "rqvae" / "tiger", "beauty", 1337, 0.0490)
    (tmp_path / "beauty" / "rqvae" / "tiger" / "metrics.json").write_text('{"test": {"recall@10": "high"}}')
    with pytest.raises(data.InputError, match=r"tiger/metrics.json is not a finished run's metrics.json"):
        evaluation.main([f"--report={tmp_path}"])


@pytest.mark.parametrize("script, args", [
    ("tiger.py", ["--lr=-1"]),
    ("tiger.py", ["--out_dir=test_all.py"]),               # an output folder that cannot be created
    ("eval.py", ["--ckpt=no/such/best.pt"]),
    ("prepare.py", ["--codebook_size=1"]),
])
def test_the_command_line_shows_a_fault_as_one_line(script, args):
    out = subprocess.run([sys.executable, script] + args, cwd=HERE, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1


def test_scale_benchmark_runs_and_its_tables_give_the_dense_tables_beams():
    # results/scale_bench.py --smoke: every stage in its own process on a 3,000-item catalogue
    out = subprocess.run([sys.executable, "results/scale_bench.py", "--smoke"], cwd=HERE,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| items | 3,000 |" and len(rows) == 1 + 12   # every stage measured ...
    assert not any(row.endswith("|  |") for row in rows)           # ... and filled its rows
    assert "beams = dense tables' beams | 0." in rows[11] and rows[11].endswith("; yes |")


# ---- the faults of the 2026-12-05 review, each pinned against the failing case ------------------

def test_two_dataset_folders_of_one_name_never_replace_each_others_ids(tmp_path):
    # a/tiny and b/tiny both file their IDs under out/tiny/: building b must not replace a's silently
    a = _write_dataset(str(tmp_path / "a" / "tiny"), ["u1 1 2 3", "u2 3 2 1"],
                       emb=np.random.default_rng(0).normal(size=(3, 8)).astype(np.float16))
    b = _write_dataset(str(tmp_path / "b" / "tiny"), ["u1 1 2 3", "u2 3 2 1"],
                       emb=np.random.default_rng(1).normal(size=(3, 8)).astype(np.float16))
    out = str(tmp_path / "out")
    codes, _, _ = prepare.main([f"--dataset={a}", f"--out_dir={out}", "--ids=lsh"])
    with pytest.raises(data.InputError, match="another dataset folder named 'tiny'.*--out_dir.*--force"):
        prepare.main([f"--dataset={b}", f"--out_dir={out}", "--ids=lsh"])
    assert np.array_equal(data.load_codes(data.load_dataset(a), "lsh", out), codes)   # a's are intact
    prepare.main([f"--dataset={b}", f"--out_dir={out}", "--ids=lsh", "--force"])       # on request


def test_cold_start_folders_keep_the_share_exactly():
    assert data.ids_folder("out", "beauty", "rqkmeans", 0.05) == os.path.join("out", "beauty", "rqkmeans-cold0.05")
    assert data.ids_folder("out", "beauty", "rqkmeans", 0.05000001) != data.ids_folder("out", "beauty", "rqkmeans", 0.05)


@pytest.mark.parametrize("line, expected", [
    ("u2 1 99999999999999999999999 2", "item id 99999999999999999999 is out of range"),
    ("u1 3 2 1", "user u1 again .first on line 1."),
    ("u2 1 ² 2", "is malformed"),
])
def test_sequences_with_a_huge_id_a_repeated_user_or_odd_digits_are_refused(tmp_path, line, expected):
    folder = _write_dataset(str(tmp_path / "d"), ["u1 1 2 3", line])
    with pytest.raises(data.InputError, match=expected):
        data.load_dataset(folder)


def test_files_that_are_not_utf8_are_one_clear_error(tmp_path):
    folder = _write_dataset(str(tmp_path / "d"), ["u1 1 2 3", "u2 3 2 1"])
    with open(os.path.join(folder, "sequences.txt"), "ab") as f:
        f.write(b"u3 1 2 \xff\xfe\n")
    with pytest.raises(data.InputError, match="sequences.txt: not UTF-8 text"):
        data.load_dataset(folder)


def test_report_refuses_nan_and_out_of_range_metrics(tmp_path):
    for value in (float("nan"), 1.5, -0.1):
        write_run(tmp_path / "beauty" / "rqvae" / "tiger", "beauty", 1337, 0.0490)
        path = tmp_path / "beauty" / "rqvae" / "tiger" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["test"]["ndcg@5"] = value
        path.write_text(json.dumps(metrics))
        with pytest.raises(data.InputError, match="tiger/metrics.json is not a finished run's"):
            evaluation.main([f"--report={tmp_path}"])


def test_eval_history_empty_or_odd_is_one_clear_error(trained):
    best = f"--ckpt={os.path.join(trained, 'best.pt')}"
    for flag in ("--history=", "--history=²", "--history= , "):
        with pytest.raises(data.InputError, match="--history"):
            evaluation.main([best, flag])


def test_an_item_without_a_title_is_shown_all_the_same(trained, capsys):
    sc = evaluation.Scorer({**evaluation.DEFAULTS, "ckpt": os.path.join(trained, "best.pt")})
    items = [dict(it) for it in sc.ds.items]
    del items[0]["title"]
    evaluation.show(replace(sc.ds, items=items), sc.tokenizer, "user", [1, 2], [1, 3])
    assert "(no title)" in capsys.readouterr().out


def test_random_bytes_as_a_checkpoint_are_called_corrupt(tmp_path):
    (tmp_path / "best.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(data.InputError, match="corrupt or not a nanoTIGER checkpoint") as err:
        evaluation.main([f"--ckpt={tmp_path / 'best.pt'}"])
    assert "run code" not in str(err.value)


def test_a_missing_best_pt_beside_a_ckpt_pt_says_so(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(data.InputError, match="best.pt appears at the run's first validation; score"):
        evaluation.main([f"--ckpt={tmp_path / 'best.pt'}"])


def test_resume_takes_the_dataset_spelt_differently_and_a_copied_run_folder(beauty_slice, trained):
    copy_dir = run_dir(beauty_slice, "copied")
    shutil.copytree(trained, copy_dir)
    args = run_args(beauty_slice, "copied", steps=20)
    args[0] = args[0].rstrip("/") + "/"                       # the dataset folder spelt another way
    assert tiger.main(args + ["--resume"])["best_step"] == 20


def test_resume_with_other_settings_shows_both_values(beauty_slice, trained):
    with pytest.raises(data.InputError, match=r"other settings \(lr: 0.005 there, 0.1 now\)"):
        tiger.main(run_args(beauty_slice, "trained", steps=20) + ["--resume", "--lr=0.1"])


def test_a_run_from_before_an_option_is_refused_by_resume_and_left_out_of_the_report(
        beauty_slice, trained, capsys):
    old = run_dir(beauty_slice, "before_user")
    shutil.copytree(trained, old)
    ckpt = torch.load(os.path.join(old, "ckpt.pt"), weights_only=True)
    del ckpt["settings"]["user_token"]                        # as tiger.py wrote it before the option
    torch.save(ckpt, os.path.join(old, "ckpt.pt"))
    with pytest.raises(data.InputError, match="written before the option.s. user_token existed"):
        tiger.main(run_args(beauty_slice, "before_user", steps=20) + ["--resume"])
    config = json.loads(open(os.path.join(old, "config.json")).read())
    del config["user_token"]
    data.write_json(os.path.join(old, "config.json"), config)
    evaluation.main([f"--report={os.path.dirname(old)}"])
    report = capsys.readouterr().out
    assert f"left out {old}: written before the setting(s) user_token existed" in report
    assert "| beauty1k |" in report                                # the other runs are reported


def test_a_long_run_name_is_refused_for_its_length(beauty_slice):
    with pytest.raises(data.InputError, match="at most 100 characters .got 101."):
        tiger.main(run_args(beauty_slice, "a" * 101))


def test_a_failed_start_leaves_no_empty_run_folder(beauty_slice):
    with pytest.raises(data.InputError, match="missing"):
        tiger.main(run_args(beauty_slice, "nolsh2") + ["--ids=lsh"])   # no LSH IDs were built
    assert not os.path.exists(os.path.join(beauty_slice[1], "beauty1k", "lsh", "nolsh2"))


def test_ctrl_c_says_how_to_continue(beauty_slice):
    import signal
    import time
    folder = run_dir(beauty_slice, "interrupted")
    proc = subprocess.Popen([sys.executable, "tiger.py"] + run_args(beauty_slice, "interrupted", steps=100000)
                            + ["--patience=100000"],   # never stops by itself
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # as from a shell: Ctrl-C not ignored (a child inherits an ignored
                            # SIGINT, and some test before this one may leave it so)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(os.path.join(folder, "ckpt.pt")):
        time.sleep(0.5)                                        # training, past its first validation
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("tiger.py did not stop within 300 s of Ctrl-C")
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err, err[-2000:]
