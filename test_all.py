"""
test_all.py -- nanoTIGER's test suite: `python -m pytest -q test_all.py` (a few minutes on a CPU).

Every test is seeded and pins one behaviour with values that would catch a real bug.
Sections follow the chapters: data.py, rqvae.py + prepare.py, tiger.py + eval.py, end to end.
"""
import copy
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the test log (set before tqdm is used)
import data  # noqa: E402
import prepare
import rqvae

HERE = os.path.dirname(os.path.abspath(__file__))


# ==============================================================================================
# data.py

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


def test_user_hash_is_stable_across_processes():
    ids = ["A1YJEY40YUW4SE", "u42", "1"]
    here = [data.user_bucket(u) for u in ids]
    code = f"import data; print([data.user_bucket(u) for u in {ids!r}])"
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different str-hash salt must not matter
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == str(here)
    assert all(0 <= b < data.N_USER_BUCKETS for b in here)


def test_token_layout_and_batches_pad_to_batch_max(beauty):
    codes = np.array([[0, 1, 0, 0], [2, 1, 3, 0], [2, 1, 3, 1]])  # 3 items, L = 4
    tok = data.Tokenizer(codes)
    assert tok.level_sizes == [3, 2, 4, 2] and tok.level_offset == [2, 5, 7, 11]
    assert tok.levels == [(2, 3), (5, 2), (7, 4), (11, 2)]
    assert tok.user_offset == 13 and tok.vocab_size == 13 + data.N_USER_BUCKETS
    assert tok.item_tokens[2].tolist() == [4, 6, 10, 11] and tok.item_tokens[0].tolist() == [0] * 4
    ex = data.Examples(user=np.array([0, 1]), history=np.array([[1, 0, 0], [3, 2, 0]]),
                       length=np.array([1, 2]), target=np.array([2, 1]), position=np.array([1, 2]))
    user_tok = tok.user_tokens(["a", "b"])
    b = data.make_batch(ex, [0, 1], tok, user_tok)
    assert b["enc"].shape == (2, 1 + 4 * 2)   # padded to the longest history in the batch, not 20
    assert b["enc"][0].tolist() == [user_tok[0].item(), 2, 6, 7, 11, 0, 0, 0, 0]
    assert b["enc"][1, 1:].tolist() == [4, 6, 10, 12, 4, 6, 10, 11]
    assert b["dec_in"][0].tolist() == [data.BOS, 4, 6, 10] and b["target"][0].tolist() == [4, 6, 10, 11]
    # the seeded shuffle is reproducible and covers every example once, with or without length pools
    for by_length in (False, True):
        a = [b.tolist() for b in data.epoch_batches(beauty_train(beauty), 256, seed=3, by_length=by_length)]
        assert a == [b.tolist() for b in data.epoch_batches(beauty_train(beauty), 256, 3, by_length)]
        assert sorted(sum(a, [])) == list(range(len(beauty_train(beauty))))


def beauty_train(ds, _cache={}):
    if "train" not in _cache:
        _cache["train"] = data.split(ds)[0]
    return _cache["train"]


def test_length_pools_cut_padding(beauty):
    train = beauty_train(beauty)
    padded = {b: np.mean([train.length[i].max() for i in data.epoch_batches(train, 256, 0, by_length=b)])
              for b in (False, True)}
    real = train.length.mean()
    assert padded[False] > 2.5 * real and padded[True] < 1.1 * real


def test_configure_overrides_and_rejects_bad_values(tmp_path):
    defaults = {"lr": 0.01, "steps": 100, "dataset": "beauty", "compile": False}
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("# a config file\nsteps = 200\nlr = 1\n")
    cfg = data.configure(defaults, [str(cfg_file), "--dataset=toys", "--compile"])
    assert cfg == {"lr": 1.0, "steps": 200, "dataset": "toys", "compile": True}
    with pytest.raises(data.InputError, match="unknown setting 'stesp'"):
        data.configure(defaults, ["--stesp=3"])
    with pytest.raises(data.InputError, match="'steps' must be a int"):
        data.configure(defaults, ["--steps=1e3"])
    cfg_file.write_text("import os\n")
    with pytest.raises(data.InputError, match="only `name = value` lines"):
        data.configure(defaults, [str(cfg_file)])


# ==============================================================================================
# rqvae.py and prepare.py

# ---- k-means ----------------------------------------------------------------------------------

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


def test_kmeans_moves_an_empty_cluster_to_the_farthest_point():
    # 9 points: two far-apart groups; a bad start puts all centroids in the first group
    x = torch.tensor([[0.0], [0.1], [0.2], [0.3], [10.0], [10.1], [10.2], [10.3], [50.0]])
    c, assign, obj = rqvae.kmeans(x, 3, n_iter=5, seed=0)
    assert (torch.bincount(assign, minlength=3) > 0).all()
    assert obj[-1] <= obj[0]

# ---- residual quantizer and RQ-VAE -------------------------------------------------------------

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
    x = torch.randn(64, 16)
    _, _, losses = model(x)
    losses['recon'].backward()                           # the reconstruction term alone
    assert model.encoder[0].weight.grad.abs().sum() > 0
    assert model.quantizer.codebooks.grad is None or model.quantizer.codebooks.grad.abs().sum() == 0


def test_rqvae_training_runs_and_uses_its_codebooks():
    emb = torch.nn.functional.normalize(torch.randn(600, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    model, log = rqvae.train_rqvae(emb.numpy(), n_levels=2, codebook_size=8, latent_dim=4, optimizer='adamw',
                                   lr=1e-3, batch_size=128, n_epochs=3, kmeans_iters=5, reset_dead_codes=True,
                                   seed=0, progress=False)
    codes, recon = rqvae.rqvae_codes(model, emb.numpy())
    assert codes.shape == (600, 2) and np.isfinite(recon) and len(log) == 3
    assert all(len(np.unique(codes[:, d])) >= 6 for d in range(2))

# ---- collision token ---------------------------------------------------------------------------

def test_collision_token_makes_ids_unique_keeps_prefixes_and_is_deterministic():
    codes = np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3], [4, 5, 6], [1, 2, 3], [0, 0, 0]])
    ids = rqvae.add_collision_token(codes)
    assert ids.dtype == np.int64 and ids.shape == (6, 4)
    assert np.array_equal(ids[:, :3], codes)
    assert ids[:, 3].tolist() == [0, 0, 1, 0, 2, 1]      # numbered in item order inside each group
    assert len(np.unique(ids, axis=0)) == 6
    assert np.array_equal(rqvae.add_collision_token(codes), ids)


def test_collision_group_larger_than_the_token_range_is_an_error():
    with pytest.raises(data.InputError, match='collision'):
        rqvae.add_collision_token(np.zeros((5, 3), dtype=np.int64), collision_size=4)

# ---- LSH and random IDs ------------------------------------------------------------------------

def test_lsh_code_equals_the_formula_on_a_hand_made_example():
    planes = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])          # m = 1 code, h = 3 bits
    x = torch.tensor([[1.0, -2.0], [-1.0, 2.0], [3.0, 1.0], [-1.0, -1.0]])
    # x1: w1.x = 1 > 0, w2.x = -2, w3.x = -1 -> 2^0 = 1;  x2: 0 + 2 + 4 = 6;  x3: 1 + 2 + 4;  x4: 0
    assert rqvae.lsh_hash(x, planes)[:, 0].tolist() == [1, 6, 7, 0]
    emb = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    codes = rqvae.lsh_ids(emb, n_codes=4, n_bits=8, seed=3)
    assert codes.shape == (50, 4) and codes.min() >= 0 and codes.max() < 256
    assert np.array_equal(codes, rqvae.lsh_ids(emb, 4, 8, seed=3))


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

# ---- prepare.py --------------------------------------------------------------------------------

def test_prepare_reuses_then_detects_corrupt_and_mismatched_artefacts(tmp_path, capsys):
    args = ['--dataset=beauty', '--ids=lsh', f'--out_dir={tmp_path}']
    codes, stats, reused = prepare.main(args)
    assert not reused and codes.shape == (12101, 5)
    folder = tmp_path / 'beauty' / 'lsh'
    assert sorted(os.listdir(folder)) == ['codes.npy', 'config.json', 'stats.json']   # no temp files left
    assert np.array_equal(prepare.load_codes('beauty', 'lsh', str(tmp_path)), codes)
    assert prepare.main(args)[2]                                        # second run: reused
    assert 'reusing' in capsys.readouterr().out
    # corrupt file: load_codes refuses it, prepare rebuilds it
    (folder / 'codes.npy').write_bytes(b'not a numpy file')
    with pytest.raises(data.InputError, match='prepare.py'):
        prepare.load_codes('beauty', 'lsh', str(tmp_path))
    again, _, reused = prepare.main(args)
    assert not reused and np.array_equal(again, codes)
    # a valid-looking but different table (rows swapped): caught by the checksum, rebuilt
    np.save(folder / 'codes.npy', codes[::-1].copy())
    again, _, reused = prepare.main(args)
    assert not reused and np.array_equal(again, codes)
    # a table of the wrong shape is refused by load_codes
    np.save(folder / 'codes.npy', codes[:100])
    with pytest.raises(data.InputError, match='shape'):
        prepare.load_codes('beauty', 'lsh', str(tmp_path))
    # changed settings rebuild; an unfinished build (no config.json) is never used
    assert not prepare.main(args + ['--lsh_bits=6'])[2]
    os.remove(folder / 'config.json')
    with pytest.raises(data.InputError, match='missing'):
        prepare.load_codes('beauty', 'lsh', str(tmp_path))


def test_prepare_rqvae_writes_weights_and_rejects_foreign_ones(tmp_path):
    # 2 epochs leave the codes crowded (see README), so allow big collision groups in this test
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


def test_load_codes_refuses_another_schemes_folder(tmp_path):
    import shutil
    prepare.main(['--ids=random', f'--out_dir={tmp_path}'])
    shutil.copytree(tmp_path / 'beauty' / 'random', tmp_path / 'beauty' / 'lsh')   # wrong files, right name
    with pytest.raises(data.InputError, match='random IDs'):
        prepare.load_codes('beauty', 'lsh', str(tmp_path))


# ==============================================================================================
# tiger.py and eval.py

import eval as evaluation  # noqa: E402  (eval.py; the name would shadow the builtin)
import tiger  # noqa: E402

TINY = dict(n_layer=2, n_head=2, head_dim=8, d_model=16, d_ff=32, dropout=0.0)


@pytest.fixture
def tiny(monkeypatch):
    """tiger's config globals set to a tiny model (restored after the test)."""
    for k, v in TINY.items():
        monkeypatch.setattr(tiger, k, v)
    torch.manual_seed(0)


def tiny_codes():
    # 14 items over levels of sizes 3, 4, 3 plus a collision code: a small but branching prefix tree
    rng = np.random.default_rng(0)
    codes = np.unique(np.stack([rng.integers(0, 3, 40), rng.integers(0, 4, 40), rng.integers(0, 3, 40)], 1), axis=0)
    codes = codes[rng.permutation(len(codes))[:14]]
    codes = np.concatenate([codes, np.zeros((14, 1), np.int64)], 1)
    codes[1, :3] = codes[0, :3]    # one collision: items 1 and 2 share a prefix ...
    codes[1, 3] = 1                # ... and the collision code tells them apart
    return codes


LEVELS_60 = [(2, 15), (17, 15), (32, 15), (47, 13)]  # 4 code levels in a 60-token vocabulary


def test_decoder_is_causal_and_encoder_ignores_padding(tiny):
    model = tiger.TIGER(60, LEVELS_60).eval()
    enc = torch.randint(2, 60, (3, 9))
    dec = torch.randint(2, 60, (3, 4))
    states, _ = model(enc, dec)                  # (3, 4, d): what every score is computed from
    dec2 = dec.clone()
    dec2[:, 2:] = torch.randint(2, 60, (3, 2))  # change later decoder inputs
    states2, _ = model(enc, dec2)
    assert torch.allclose(states[:, :2], states2[:, :2], atol=1e-6)
    assert not torch.allclose(states[:, 2:], states2[:, 2:], atol=1e-3)
    # appending padding to the encoder input changes neither the real tokens' outputs nor the decoder's
    memory, _ = model.encode(enc)
    padded = torch.cat([enc, torch.full((3, 5), data.PAD)], 1)
    memory_p, _ = model.encode(padded)
    assert torch.allclose(memory, memory_p[:, :9], atol=1e-5)
    assert torch.allclose(model(padded, dec)[0], states, atol=1e-5)


@pytest.mark.parametrize("head,eps", [("level", 0.0), ("full", 0.0), ("level", 0.2)])
def test_code_logprobs_and_loss(tiny, monkeypatch, head, eps):
    monkeypatch.setattr(tiger, "head", head)
    monkeypatch.setattr(tiger, "label_smoothing", eps)
    model = tiger.TIGER(60, LEVELS_60).eval()
    enc, dec = torch.randint(2, 60, (3, 9)), torch.randint(2, 60, (3, 4))
    target = torch.tensor([[first + 1 for first, _ in LEVELS_60]] * 3)   # code 1 of every level
    states, loss = model(enc, dec, target)
    logp = [model.code_logprobs(states[:, l], l) for l in range(4)]      # each (3, n_codes of level l)
    assert [p.shape[1] for p in logp] == [15, 15, 15, 13]
    total = torch.stack([p.exp().sum(-1) for p in logp])
    if head == "level":   # a proper distribution over the level's codes
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    else:                 # the whole vocabulary shares the mass, so a level gets less than all of it
        assert (total < 0.99).all()
    # the loss is the mean negative log-probability of the target codes; with label smoothing eps, the
    # cross-entropy against (1 - eps) on the target code plus eps spread evenly over the level's codes
    smoothed = [(1 - eps) * -p[:, 1] + eps * -p.mean(-1) for p in logp]
    assert torch.allclose(loss, torch.stack(smoothed).mean(), atol=1e-6)


def test_ema_update_is_the_moving_average(tiny, monkeypatch):
    monkeypatch.setattr(tiger, "ema", 0.9)
    model = tiger.TIGER(60, LEVELS_60)
    averaged = copy.deepcopy(model)
    old = [p.detach().clone() for p in averaged.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    tiger.update_ema(averaged, model, step=0)      # decay ramps up: min(0.9, 1/10) = 0.1 at step 0
    tiger.update_ema(averaged, model, step=1000)   # then the configured 0.9
    for a, o, p in zip(averaged.parameters(), old, model.parameters()):
        first = 0.1 * o + 0.9 * p
        assert torch.allclose(a, 0.9 * first + 0.1 * p, atol=1e-6)


def test_tied_embeddings_stay_one_table_through_a_step_a_copy_and_a_checkpoint(tiny, monkeypatch):
    untied = sum(p.numel() for p in tiger.TIGER(60, LEVELS_60).parameters())
    monkeypatch.setattr(tiger, "tie_embeddings", True)
    model = tiger.TIGER(60, LEVELS_60)
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == untied - 60 * TINY["d_model"]
    enc, dec = torch.randint(2, 60, (3, 9)), torch.randint(2, 60, (3, 4))
    target = torch.tensor([[first + 1 for first, _ in LEVELS_60]] * 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(enc, dec, target)[1].backward()
    opt.step()
    assert model.head.weight is model.embed.weight            # still one table after an optimizer step
    averaged = copy.deepcopy(model)                           # the EMA copy is tied too
    assert averaged.head.weight is averaged.embed.weight
    fresh = tiger.TIGER(60, LEVELS_60)
    fresh.load_state_dict(model.state_dict())
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.eval()(enc, dec, target)[1], model.eval()(enc, dec, target)[1])  # eval: no item dropout


@pytest.mark.parametrize("inner", [True, False])
def test_inner_dropout_switches_attention_and_mlp_dropout(tiny, monkeypatch, inner):
    # dropout on the residual stream is always on when dropout > 0; inner_dropout decides whether the
    # attention probabilities and the MLP's hidden units are dropped too (T5 drops both)
    monkeypatch.setattr(tiger, "dropout", 0.5)
    monkeypatch.setattr(tiger, "inner_dropout", inner)
    block = tiger.Block(cross=False)
    x, bias = torch.randn(4, 6, 16), torch.zeros(1, 2, 6, 6)
    attn_eval, mlp_eval = block.self_attn(x, x, bias), block.mlp(x)
    block.train()
    attn_train, mlp_train = block.self_attn(x, x, bias), block.mlp(x)
    assert torch.allclose(attn_train, attn_eval, atol=1e-6) != inner
    assert torch.allclose(mlp_train, mlp_eval, atol=1e-6) != inner
    y_eval = block.eval()(x, bias)
    assert not torch.allclose(block.train()(x, bias), y_eval, atol=1e-3)  # the residual dropout stays


def test_item_dropout_hides_whole_history_items_in_training_only(tiny, monkeypatch):
    monkeypatch.setattr(tiger, "item_dropout", 0.5)
    monkeypatch.setattr(tiger, "user_dropout", 0.0)
    L, n = 4, 100
    enc = torch.cat([torch.full((8, 1), 59), torch.randint(2, 59, (8, n * L))], 1)  # [user, 100 items]
    dropped = tiger.drop_input_tokens(enc, L)
    assert torch.equal(dropped[:, 0], enc[:, 0])                 # the user token stays at user_dropout = 0
    items, kept = enc[:, 1:].view(8, n, L), dropped[:, 1:].view(8, n, L)
    gone = (kept == data.PAD).all(-1)                            # (8, n) items that vanished
    assert torch.equal(kept[~gone], items[~gone])                # the rest are untouched ...
    assert torch.equal(kept == data.PAD, gone[..., None].expand(-1, -1, L))  # ... and none half-dropped
    assert 0.4 < gone.float().mean() < 0.6
    model = tiger.TIGER(60, LEVELS_60)
    dec = torch.randint(2, 59, (8, 4))
    model.eval()
    assert torch.equal(model(enc, dec)[0], model(enc, dec)[0])   # evaluation always reads everything
    assert not torch.allclose(model.train()(enc, dec)[0], model.eval()(enc, dec)[0], atol=1e-3)


def test_user_dropout_hides_the_user_token_but_never_the_whole_input(tiny, monkeypatch):
    monkeypatch.setattr(tiger, "item_dropout", 0.0)
    monkeypatch.setattr(tiger, "user_dropout", 0.5)
    L = 4
    enc = torch.cat([torch.full((400, 1), 59), torch.randint(2, 59, (400, 2 * L))], 1)  # [user, 2 items]
    enc[:200, 1:] = data.PAD                                     # half the rows have no history at all
    dropped = tiger.drop_input_tokens(enc, L)
    assert torch.equal(dropped[:, 1:], enc[:, 1:])              # items untouched at item_dropout = 0
    assert torch.equal(dropped[:200], enc[:200])                # a row with no history keeps its user
    assert 0.4 < (dropped[200:, 0] == data.PAD).float().mean() < 0.6
    monkeypatch.setattr(tiger, "item_dropout", 0.7)             # both at once: every row keeps a key
    assert ((tiger.drop_input_tokens(enc, L) != data.PAD).any(1)).all()
    model = tiger.TIGER(60, LEVELS_60).eval()                    # evaluation reads the user token
    dec = torch.randint(2, 59, (8, 4))
    assert torch.equal(model(enc[200:208], dec)[0], model(enc[200:208], dec)[0])
    # user_dropout = 0 draws no random number, so runs from before the option reproduce exactly
    monkeypatch.setattr(tiger, "user_dropout", 0.0)
    torch.manual_seed(3)
    tiger.drop_input_tokens(enc, L)
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.rand(400, 2)                                           # the item draws alone
    assert torch.equal(after, torch.rand(1))
    with pytest.raises(data.InputError, match="user_dropout must be in"):
        tiger.main(["--user_dropout=1"])


def test_incremental_decoding_with_cache_equals_full_forward(tiny):
    model = tiger.TIGER(60, LEVELS_60).eval()
    enc = torch.randint(2, 60, (2, 7))
    dec = torch.randint(2, 60, (2, 5))
    full, _ = model(enc, dec)
    memory, cross_bias = model.encode(enc)
    caches = [{"self": {}, "cross": {}} for _ in model.decoder]
    steps = [model.decode(dec[:, t:t + 1], memory, cross_bias, caches, start=t) for t in range(5)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def sequence_logprobs(model, enc, tokenizer):
    """Brute force: the exact log-probability of every item's Semantic ID for each user, (B, n_items):
    one teacher-forced pass per (user, item), summing log p(code) over the levels."""
    items = tokenizer.item_tokens[1:]                                       # (n_items, L)
    B, n = enc.shape[0], len(items)
    target = items.repeat(B, 1)
    dec_in = torch.cat([torch.full((B * n, 1), data.BOS), target[:, :-1]], 1)
    states, _ = model(enc.repeat_interleave(n, 0), dec_in)
    logp = sum(model.code_logprobs(states[:, l], l).gather(1, target[:, l:l + 1] - first)[:, 0]
               for l, (first, _) in enumerate(tokenizer.levels))
    return logp.view(B, n)


@pytest.mark.parametrize("head", ["level", "full"])
def test_beam_search_matches_brute_force(tiny, monkeypatch, head):
    monkeypatch.setattr(tiger, "head", head)
    codes = tiny_codes()
    tok = data.Tokenizer(codes, n_user_buckets=10)
    tables = tiger.PrefixTables(tok)
    model = tiger.TIGER(tok.vocab_size, tok.levels).eval()
    enc = torch.cat([torch.full((4, 1), tok.user_offset), tok.item_tokens[torch.randint(1, 15, (4, 3))].flatten(1)], 1)
    brute = sequence_logprobs(model, enc, tok)                              # (4, 14)
    # a beam as large as the item set is exact: the top-K items by sequence log-probability
    got, scores = model.beam_search(enc, tables, beam_size=14)
    items = tables.items_of(got)
    want_scores, want_items = brute.sort(dim=1, descending=True)
    assert torch.equal(items, want_items + 1)
    assert torch.allclose(scores, want_scores, atol=1e-5)
    # a smaller beam still returns only real items, each scored with its exact log-probability
    got, scores = model.beam_search(enc, tables, beam_size=3)
    items = tables.items_of(got)
    assert (items > 0).all() and items.shape == (4, 3)
    assert torch.allclose(scores, brute.gather(1, items - 1), atol=1e-5)
    # unconstrained decoding may produce IDs that are no item; items_of maps those to 0
    got, _ = model.beam_search(enc, tables, beam_size=50, constrained=False)
    items = tables.items_of(got)
    assert (items == 0).any() and set(items[items > 0].tolist()) <= set(range(1, 15))
    assert torch.equal(tables.items_of(torch.from_numpy(codes)), torch.arange(1, 15))
    real = {tuple(c) for c in codes.tolist()}
    fake = next(t for t in itertools.product(*[range(n) for n in tok.level_sizes]) if t not in real)
    assert tables.items_of(torch.tensor([fake])).item() == 0  # a well-formed ID that is no item


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


def test_tiny_model_overfits_tiny_dataset_to_recall_at_1(tiny):
    codes = tiny_codes()
    tok = data.Tokenizer(codes, n_user_buckets=10)
    tables = tiger.PrefixTables(tok)
    # 8 users, each with its own history and next item
    rng = np.random.default_rng(1)
    history = np.zeros((8, 3), np.int64)
    history[:, :3] = rng.integers(1, 15, (8, 3))
    ex = data.Examples(user=np.arange(8), history=history, length=np.full(8, 3),
                       target=rng.permutation(14)[:8] + 1, position=np.full(8, 3))
    user_tok = tok.user_tokens([f"u{i}" for i in range(8)])
    model = tiger.TIGER(tok.vocab_size, tok.levels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = data.make_batch(ex, np.arange(8), tok, user_tok)
    for _ in range(150):
        _, loss = model(batch["enc"], batch["dec_in"], batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    codes_out, _ = model.beam_search(batch["enc"], tables, beam_size=5)
    ranks = evaluation.ranks_of(tables.items_of(codes_out), batch["target_item"])
    assert evaluation.recall_ndcg(ranks, ks=(1,))["recall@1"] == 1.0


# ==============================================================================================
# End to end: prepare + train + evaluate on a small slice of Beauty

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
    prepare.main([f"--dataset={folder}", f"--out_dir={out}", "--n_epochs=30"])
    return folder, out


SMALL_RUN = ["--n_layer=2", "--d_model=64", "--n_head=2", "--head_dim=32", "--d_ff=256", "--batch_size=128",
             "--dropout=0.0", "--lr=0.005", "--warmup_steps=20", "--eval_users=500", "--beam_size=10"]


def test_end_to_end_on_a_beauty_slice(beauty_slice):
    # prepare (in the fixture) + train + evaluate on the dense Beauty slice: the trained model must rank
    # the held-out items better than recommending the most popular items to everyone
    folder, out = beauty_slice
    results = tiger.main([f"--dataset={folder}", f"--out_dir={out}", "--run=e2e", "--max_steps=300",
                          "--eval_every=100"] + SMALL_RUN)
    for split in ("valid", "test"):
        assert results[split]["recall@10"] > 1.25 * results[split + "_most_popular"]["recall@10"] > 0
        assert results[split]["ndcg@10"] > 1.25 * results[split + "_most_popular"]["ndcg@10"]
    best = os.path.join(out, "beauty1k", "rqvae", "e2e", "best.pt")
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


def test_interrupted_run_resumes_to_the_same_result(beauty_slice, monkeypatch):
    folder, out = beauty_slice
    args = [f"--dataset={folder}", f"--out_dir={out}", "--max_steps=40", "--eval_every=20", "--patience=9"]
    # dropout draws random numbers, so resuming must restore the RNG; the weight average must be restored too
    small = SMALL_RUN + ["--dropout=0.1", "--ema=0.9"]
    whole = tiger.main(args + ["--run=whole"] + small)

    real_save = tiger.save_atomic

    def save_then_crash(obj, path):  # the process dies right after the first checkpoint
        real_save(obj, path)
        if path.endswith("ckpt.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(tiger, "save_atomic", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tiger.main(args + ["--run=cut"] + small)
    monkeypatch.setattr(tiger, "save_atomic", real_save)
    resumed = tiger.main(args + ["--run=cut", "--resume"] + small)
    assert resumed["test"] == whole["test"] and resumed["log"] == whole["log"]
    a = torch.load(os.path.join(out, "beauty1k", "rqvae", "whole", "ckpt.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(out, "beauty1k", "rqvae", "cut", "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a resumed run with other settings is refused
    with pytest.raises(data.InputError, match="different config"):
        tiger.main(args + ["--run=cut", "--resume"] + small + ["--lr=0.1"])  # a later flag wins
    # ... and so is a checkpoint from before an option existed, with a message that says so
    ckpt = torch.load(os.path.join(out, "beauty1k", "rqvae", "cut", "ckpt.pt"), weights_only=True)
    del ckpt["config"]["user_dropout"]
    os.makedirs(os.path.join(out, "beauty1k", "rqvae", "old"))
    tiger.save_atomic(ckpt, os.path.join(out, "beauty1k", "rqvae", "old", "ckpt.pt"))
    with pytest.raises(data.InputError, match="older tiger.py, before the option.s. user_dropout existed"):
        tiger.main(args + ["--run=old", "--resume"] + small)


def test_corrupted_checkpoint_gives_a_clear_error(beauty_slice):
    folder, out = beauty_slice
    run_dir = os.path.join(out, "beauty1k", "rqvae", "broken")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "ckpt.pt"), "wb") as f:
        f.write(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(data.InputError, match="corrupt or not a nanoTIGER checkpoint"):
        tiger.main([f"--dataset={folder}", f"--out_dir={out}", "--run=broken", "--resume"])
    with pytest.raises(data.InputError, match="bad config: lr must be > 0"):
        tiger.main([f"--dataset={folder}", f"--out_dir={out}", "--lr=-1"])
