"""
test_all.py -- nanoTIGER's test suite: `python -m pytest -q test_all.py` (a few minutes on a CPU).

Every test is seeded and pins one behaviour with values that would catch a real bug.
Sections follow the chapters: data.py, rqvae.py + prepare.py, tiger.py + eval.py, end to end.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data

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
    # the seeded shuffle is reproducible and covers every example once
    a = [x["target_item"].tolist() for x in data.iterate_batches(ex, tok, user_tok, 1, shuffle=True, seed=3)]
    assert a == [x["target_item"].tolist() for x in data.iterate_batches(ex, tok, user_tok, 1, shuffle=True, seed=3)]
    assert sorted(sum(a, [])) == [1, 2]


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
