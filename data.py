"""
data.py -- the data chapter of nanoTIGER.

From the shipped files in data/<name>/ to tensors a sequence-to-sequence model can eat:

  1. load and validate the files (sequences.txt, items.jsonl, item_emb.npy)
  2. the leave-one-out split of the paper (App. C)
  3. the user token: the raw user id hashed into 2,000 buckets (Sec. 4)
  4. the token layout: Semantic-ID codes, user tokens and special tokens in one vocabulary
  5. batching: pad each batch to its own longest history, seeded shuffle
  6. a small command-line helper that every script uses for its config globals

`python data.py` prints the statistics of the three datasets (they equal the paper's Table 6).
No model code lives here.
"""
import ast
import hashlib
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = ("beauty", "sports", "toys")
MAX_HISTORY = 20        # the paper keeps the last 20 items of a user (Sec. 4, "Sequence to Sequence Model Training")
N_USER_BUCKETS = 2000   # "we use the Hashing Trick to map the raw user ID to one of the 2K user ID tokens" (Sec. 4)


class InputError(Exception):
    """Bad input from the user: a file, a flag, a config value, a stale artefact.

    Raised at the door with a message that says what is wrong and how to fix it. Every script
    catches it in its `__main__` block and prints `error: ...` instead of a traceback."""


# ----------------------------------------------------------------------------------------------
# 1. Loading, with validation at the door

@dataclass
class Dataset:
    name: str
    users: list              # raw user ids (str), one per user, in file order
    sequences: list          # one np.int64 array of item ids (1..n_items) per user, in time order
    items: list              # items[i] is the dict of item id i+1 from items.jsonl
    item_emb: np.ndarray     # (n_items, 768) float32, row i is item id i+1

    @property
    def n_items(self):
        return len(self.items)


def load_dataset(name_or_dir):
    """Load one dataset: a name from DATASETS (read from data/<name>/) or a folder path."""
    folder = name_or_dir if os.path.isdir(name_or_dir) else os.path.join(DATA_DIR, name_or_dir)
    if not os.path.isdir(folder):
        raise InputError(f"no dataset '{name_or_dir}': expected one of {', '.join(DATASETS)} "
                         f"(folders under {DATA_DIR}) or a folder holding sequences.txt, items.jsonl, item_emb.npy")
    paths = {f: os.path.join(folder, f) for f in ("sequences.txt", "items.jsonl", "item_emb.npy")}
    for f, p in paths.items():
        if not os.path.isfile(p):
            raise InputError(f"{p}: file missing. A dataset folder needs sequences.txt, items.jsonl and "
                             f"item_emb.npy; restore it from the repository (git checkout -- data/)")
    items = _load_items(paths["items.jsonl"])
    item_emb = _load_embeddings(paths["item_emb.npy"], len(items))
    users, sequences = _load_sequences(paths["sequences.txt"], len(items))
    return Dataset(os.path.basename(os.path.normpath(folder)), users, sequences, items, item_emb)


def _load_items(path):
    # one JSON object a line, in id order: {"item": 1, "asin": ..., "title": ..., "text": ...}
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}, line {lineno}: not valid JSON ({e.msg}); "
                                 f"each line must be one JSON object like {{\"item\": {lineno}, \"title\": ...}}")
            if not isinstance(item, dict) or item.get("item") != lineno:
                raise InputError(f"{path}, line {lineno}: expected an object with \"item\": {lineno} "
                                 f"(items are listed in id order, ids from 1)")
            items.append(item)
    if not items:
        raise InputError(f"{path}: no items; the file is empty")
    return items


def _load_embeddings(path, n_items):
    try:
        emb = np.load(path, allow_pickle=False)  # never unpickle data files
    except Exception as e:
        raise InputError(f"{path}: cannot be read as a .npy array ({e}); restore it from the repository")
    if emb.ndim != 2 or emb.shape[0] != n_items:
        raise InputError(f"{path}: shape {emb.shape}, but items.jsonl lists {n_items} items; the embedding "
                         f"matrix needs one row per item, (n_items, dim), row i for item id i+1")
    emb = emb.astype(np.float32)   # shipped as float16 to halve the repo size
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(f"{path}: {len(rows)} row(s) hold NaN or inf, first at row {rows[0]} (item id "
                         f"{rows[0] + 1}); re-embed those items or restore the file from the repository")
    return emb


def _load_sequences(path, n_items):
    # one user a line: "user item1 item2 ...", items in time order, ids from 1
    users, sequences = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue  # tolerate blank lines (e.g. a trailing newline)
            try:
                seq = np.array([int(x) for x in fields[1:]], dtype=np.int64)
            except ValueError:
                raise InputError(f"{path}, line {lineno}: '{line.strip()[:60]}' is malformed; each line must be "
                                 f"a user id followed by integer item ids separated by spaces")
            if len(seq) < 3:
                raise InputError(f"{path}, line {lineno}: user {fields[0]} has {len(seq)} item(s), but the "
                                 f"leave-one-out split needs at least 3 (train, validation, test); drop the user "
                                 f"or use the 5-core data shipped in the repository")
            if seq.min() < 1 or seq.max() > n_items:
                bad = seq[(seq < 1) | (seq > n_items)][0]
                raise InputError(f"{path}, line {lineno}: item id {bad} is out of range; ids run from 1 to "
                                 f"{n_items} (the number of lines in items.jsonl)")
            users.append(fields[0])
            sequences.append(seq)
    if not sequences:
        raise InputError(f"{path}: no users; the file is empty")
    return users, sequences


# ----------------------------------------------------------------------------------------------
# 2. The leave-one-out split (App. C): per user the last item is the test target, the one before it
# the validation target, and the rest is for training. Every prefix of the training part is one
# training example (target = item t, history = the up-to-20 items before it); the first item has no
# history and is never a target. Validation and test histories are the 20 items before their target,
# so the test history includes the validation item, exactly as at serving time.

@dataclass
class Examples:
    user: np.ndarray      # (N,) user index into Dataset.users
    history: np.ndarray   # (N, MAX_HISTORY) item ids, oldest first, left-aligned, 0 = padding
    length: np.ndarray    # (N,) number of real items in each history (1..MAX_HISTORY)
    target: np.ndarray    # (N,) the item to predict
    position: np.ndarray  # (N,) index of the target in the user's full sequence (for leakage checks)

    def __len__(self):
        return len(self.target)


def _make_examples(rows):
    # rows: list of (user index, full sequence, target position); history = up to 20 items before it
    history = np.zeros((len(rows), MAX_HISTORY), dtype=np.int64)
    length = np.zeros(len(rows), dtype=np.int64)
    for i, (_, seq, t) in enumerate(rows):
        h = seq[max(0, t - MAX_HISTORY):t]
        history[i, :len(h)] = h
        length[i] = len(h)
    user = np.array([u for u, _, _ in rows], dtype=np.int64)
    target = np.array([seq[t] for _, seq, t in rows], dtype=np.int64)
    position = np.array([t for _, _, t in rows], dtype=np.int64)
    return Examples(user, history, length, target, position)


def split(dataset):
    """Returns (train, valid, test) Examples."""
    train, valid, test = [], [], []
    for u, seq in enumerate(dataset.sequences):
        n = len(seq)
        train += [(u, seq, t) for t in range(1, n - 2)]  # targets 1..n-3: the training part is seq[:n-2]
        valid.append((u, seq, n - 2))
        test.append((u, seq, n - 1))
    return _make_examples(train), _make_examples(valid), _make_examples(test)


# ----------------------------------------------------------------------------------------------
# 3. The user token. The paper hashes the raw user id into 2,000 buckets. Python's hash() of a str
# is salted per process (PYTHONHASHSEED), so we use the first 8 bytes of an MD5 digest: the same
# bucket on every machine and every run.

def user_bucket(user_id, n_buckets=N_USER_BUCKETS):
    digest = hashlib.md5(str(user_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % n_buckets


# ----------------------------------------------------------------------------------------------
# 4. The token layout. One vocabulary for encoder and decoder (as in T5):
#
#   0                       PAD  (padding; never predicted)
#   1                       BOS  (decoder start token)
#   2 ...                   level-0 codes, then level-1 codes, ..., then level-(L-1) codes:
#                           code c of level l is token  level_offset[l] + c
#   user_offset ...         the N_USER_BUCKETS user tokens: bucket b is token user_offset + b
#
# An item is L tokens (its Semantic ID: e.g. 3 RQ-VAE codes + 1 collision code, L = 4). Giving each
# level its own token range (rather than sharing one 256-code range) means "code 7 at level 0" and
# "code 7 at level 1" are different words, as in the paper (1024 code tokens for 4 levels x 256).
# Level l has as many tokens as its largest code + 1 (the collision level is usually small).
#
#   encoder input:  [user, item_1 codes..., item_n codes...]  (1 + L*n tokens, right-padded with PAD)
#   decoder input:  [BOS, c_0, ..., c_{L-2}]   teacher forcing
#   decoder target: [c_0, c_1, ..., c_{L-1}]   cross-entropy on all L codes of the next item

PAD, BOS = 0, 1


class Tokenizer:
    def __init__(self, codes, n_user_buckets=N_USER_BUCKETS):
        # codes: (n_items, L) integer Semantic IDs, row i for item id i+1 (written by prepare.py)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.min() < 0:
            raise InputError(f"Semantic-ID table must be (n_items, L) non-negative ints, got shape {codes.shape}")
        self.id_length = codes.shape[1]                                          # L
        self.level_sizes = (codes.max(axis=0) + 1).tolist()                      # tokens per level
        self.level_offset = (2 + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]])).tolist()
        self.levels = list(zip(self.level_offset, self.level_sizes))             # [(first token, size)]
        self.user_offset = 2 + sum(self.level_sizes)
        self.vocab_size = self.user_offset + n_user_buckets
        self.n_user_buckets = n_user_buckets
        # item_tokens[i] = the L tokens of item id i; row 0 (the padding item) is all PAD
        tokens = codes + np.asarray(self.level_offset)
        self.item_tokens = torch.from_numpy(np.concatenate([np.zeros((1, self.id_length), np.int64), tokens]))
        self.codes = codes

    def user_tokens(self, users):
        return torch.tensor([self.user_offset + user_bucket(u, self.n_user_buckets) for u in users])


# ----------------------------------------------------------------------------------------------
# 5. Batching. Histories are padded only to the longest one in the batch (most are short: the
# median user has 6 items), which makes the encoder several times cheaper than a fixed length of 81.

def make_batch(examples, idx, tokenizer, user_tok):
    """Tensors for the examples at positions idx. user_tok: (n_users,) token of each user (precomputed).

    Returns a dict: enc (B, 1+L*n) encoder tokens, dec_in (B, L), target (B, L) tokens,
    target_item (B,) item ids, with n = the longest history in this batch."""
    idx = np.asarray(idx)
    n = int(examples.length[idx].max())
    hist = torch.from_numpy(examples.history[idx, :n])                  # (B, n) item ids, 0 = pad
    hist_tok = tokenizer.item_tokens[hist].flatten(1)                   # (B, n*L); pad items -> PAD tokens
    user = user_tok[torch.from_numpy(examples.user[idx])].unsqueeze(1)  # (B, 1)
    target_item = torch.from_numpy(examples.target[idx])
    target = tokenizer.item_tokens[target_item]                         # (B, L)
    dec_in = torch.cat([torch.full_like(target[:, :1], BOS), target[:, :-1]], dim=1)
    return {"enc": torch.cat([user, hist_tok], dim=1), "dec_in": dec_in, "target": target,
            "target_item": target_item}


def epoch_batches(examples, batch_size, seed, by_length=False, pool=64):
    """The batches of one training epoch as arrays of example positions, a seeded shuffle.

    by_length (a speed option, not in the paper): shuffle, then within each pool of `pool` batches
    sort by history length before cutting, and shuffle the batches. Each batch then holds histories of
    similar length, so padding to the batch's longest history wastes little: on Beauty the encoder
    reads about 4x fewer tokens. Batches stay random in content and order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples))
    if by_length:
        chunk = batch_size * pool
        order = np.concatenate([c[np.argsort(examples.length[c], kind="stable")]
                                for c in np.split(order, np.arange(chunk, len(order), chunk))])
    batches = np.split(order, np.arange(batch_size, len(order), batch_size))
    if by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ----------------------------------------------------------------------------------------------
# 6. Config from the command line, the nanoGPT way without exec: every script keeps its settings as
# plain globals; a config file (Python-looking lines `name = literal`, read with ast, never executed)
# and then `--name=value` flags override them. Unknown names and values of the wrong type are errors.

def configure(defaults, argv):
    config = dict(defaults)

    def assign(key, value, where):
        if key not in config:
            raise InputError(f"{where}: unknown setting '{key}'; known settings: {', '.join(sorted(config))}")
        old = config[key]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and type(value) is not type(old):
            raise InputError(f"{where}: '{key}' must be a {type(old).__name__} (default {old!r}), got {value!r}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                if isinstance(config.get(key), bool):
                    text = "True"  # a bare --flag switches a boolean on
                else:
                    raise InputError(f"{arg}: write settings as --{key}=value")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --dataset=toys
            assign(key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise InputError(f"config file {arg} not found (settings are passed as --name=value)")
            with open(arg, encoding="utf-8") as f:
                tree = ast.parse(f.read(), arg)
            for node in tree.body:
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and isinstance(node.targets[0], ast.Name)):
                    raise InputError(f"{arg}, line {node.lineno}: only `name = value` lines are allowed")
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise InputError(f"{arg}, line {node.lineno}: the value must be a literal (number, string, bool)")
                assign(node.targets[0].id, value, f"{arg}, line {node.lineno}")
    return config


# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    # the statistics of the paper's Table 6, plus the number of examples in each split
    print(f"{'dataset':8s} {'users':>7s} {'items':>7s} {'interact.':>10s} {'mean len':>9s} {'median':>7s} "
          f"{'train ex.':>10s} {'valid ex.':>10s} {'test ex.':>9s}")
    try:
        for name in DATASETS:
            ds = load_dataset(name)
            lengths = np.array([len(s) for s in ds.sequences])
            train, valid, test = split(ds)
            print(f"{name:8s} {len(ds.users):7,d} {ds.n_items:7,d} {lengths.sum():10,d} {lengths.mean():9.2f} "
                  f"{np.median(lengths):7.0f} {len(train):10,d} {len(valid):10,d} {len(test):9,d}")
    except InputError as e:
        sys.exit(f"error: {e}")
