"""
data.py -- the data chapter of nanoTIGER.

Part I, from the shipped files in data/<name>/ to tensors a sequence-to-sequence model can eat:
  1. the dataset: users' item sequences, item texts and their content embeddings
  2. the leave-one-out split of the paper (App. C), and the cold-start split (Sec. 4.3)
  3. the user token: the raw user id hashed into 2,000 buckets (Sec. 4)
  4. the token layout: Semantic-ID codes, user tokens and special tokens in one vocabulary
  5. batching: pad each batch to its own longest history, seeded shuffle
Part II, the workshop every script shares:
  6. the files read and checked at the door (InputError: one line, never a traceback)
  7. artefacts on disk: atomic writes, a lock per output folder, provenance, and the reader of
     the Semantic-ID table that prepare.py writes (checked as strictly as it was written)
  8. config from the command line: every script's settings are plain globals, overridden by a
     config file and --name=value flags

`python data.py` prints the statistics of the three datasets (they equal the paper's Table 6).
No model code lives here.
"""
import ast
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

try:
    import fcntl          # Unix: folder_lock's advisory lock
except ImportError:       # Windows
    fcntl = None
    import msvcrt

import numpy as np
import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DATASETS = ("beauty", "sports", "toys")
ID_SCHEMES = ("rqvae", "rqkmeans", "lsh", "random")  # Semantic IDs (Sec. 3.1), Table 2 baselines
LEARNT_IDS = ("rqvae", "rqkmeans")  # the schemes whose codebooks are learnt from item embeddings
MAX_HISTORY = 20        # the paper keeps the last 20 items of a user (Sec. 4, "Sequence to
                        # Sequence Model Training")
N_USER_BUCKETS = 2000   # "we use the Hashing Trick to map the raw user ID to one of the 2K user
                        # ID tokens" (Sec. 4)

# ==============================================================================================
# Part I. From the shipped files to batches of tokens.

# ----------------------------------------------------------------------------------------------
# 1. The dataset. The files are read and checked in Part II (chapter 6). The item embeddings are
# the "precomputed content embeddings" of Sec. 3.1: here all-mpnet-base-v2 vectors (768-d, unit
# length) of each item's title phrase, brand and category path; the paper used Sentence-T5 on
# title, price, brand and category, which the public data lacks (data/README.md).

@dataclass
class Dataset:
    name: str
    users: list              # raw user ids (str), one per user, in file order
    sequences: list          # one np.int64 array of item ids (1..n_items) per user, in time order
    items: list              # items[i] is the dict of item id i+1 from items.jsonl
    item_emb: np.ndarray     # (n_items, 768) float32, row i is item id i+1
    folder: str = ""         # where it was read from

    @property
    def n_items(self):
        return len(self.items)


def dataset_name(name_or_dir):
    """The name a dataset's outputs are filed under (out/<name>/...): 'beauty' for both 'beauty' and
    'data/beauty/'. Folders with the same last component share a name; the ID reader tells them
    apart by their embeddings (load_codes)."""
    return os.path.basename(os.path.normpath(name_or_dir))


def item_categories(items, depth=2):
    """A category id per item id, (n_items + 1,) int64, -1 where unknown (and for item 0), and the
    category names. items: Dataset.items. An item's category is its category path cut to `depth`
    levels ('Makeup > Nails'); only Beauty ships category paths. The one definition of an item's
    category here: the Semantic-ID statistics (Fig. 4) and Entropy@K (Table 3) both use it."""
    paths = [it.get("categories") or [] for it in items]
    paths = [" > ".join(p[:depth]) if len(p) >= depth else None for p in paths]
    names = sorted({p for p in paths if p is not None})
    index = {name: i for i, name in enumerate(names)}
    return np.array([-1] + [index.get(p, -1) for p in paths], dtype=np.int64), names


def load_dataset(name_or_dir):
    """Load one dataset: a name from DATASETS (read from data/<name>/) or a folder path."""
    folder = name_or_dir if os.path.isdir(name_or_dir) else os.path.join(DATA_DIR, name_or_dir)
    if not os.path.isdir(folder):
        raise InputError(f"no dataset '{name_or_dir}': expected one of {', '.join(DATASETS)} "
                         f"(folders under {DATA_DIR}) or a folder holding sequences.txt, "
                         f"items.jsonl, item_emb.npy")
    paths = {f: os.path.join(folder, f) for f in ("sequences.txt", "items.jsonl", "item_emb.npy")}
    for f, p in paths.items():
        if not os.path.isfile(p):
            raise InputError(f"{p}: file missing. A dataset folder needs sequences.txt, "
                             f"items.jsonl and item_emb.npy; restore it from the repository "
                             f"(git checkout -- data/)")
    items = _load_items(paths["items.jsonl"])
    item_emb = _load_embeddings(paths["item_emb.npy"], len(items))
    users, sequences = _load_sequences(paths["sequences.txt"], len(items))
    return Dataset(dataset_name(folder), users, sequences, items, item_emb,
                   os.path.abspath(folder))


# ----------------------------------------------------------------------------------------------
# 2. The leave-one-out split (App. C): per user the last item is the test target, the one before it
# the validation target, and the rest is for training. Every prefix of the training part is one
# training example (target = item t, history = the up-to-20 items before it); the first item has no
# history and is never a target. Validation and test histories are the 20 items before their target,
# so the test history includes the validation item, exactly as at serving time. (The paper does not
# say how training examples are cut; every prefix is the usual choice of P5 and S3-Rec.)

@dataclass
class Examples:
    user: np.ndarray      # (N,) user index into Dataset.users
    history: np.ndarray   # (N, MAX_HISTORY) item ids, oldest first, left-aligned, 0 = padding
    length: np.ndarray    # (N,) number of real items in each history (1..MAX_HISTORY)
    target: np.ndarray    # (N,) the item to predict
    position: np.ndarray  # (N,) index of the target in the user's sequence (for leakage checks;
                          # in training examples of a cold-start split: in the sequence without
                          # unseen items)

    def __len__(self):
        return len(self.target)


def _make_examples(rows):
    """rows: a list of (user index, sequence, target position). The sequence is the user's whole
    sequence for validation and test rows, its training_part (no unseen items) for training rows,
    so a training row's position counts without the unseen items. The history is the up-to-20
    items before the target, oldest first, left-aligned and 0-padded; every array is int64."""
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


def training_part(seq, unseen=()):
    """What training may see of a user's sequence: all but the validation and the test item, and
    none of the cold-start experiment's unseen items (the rest of the sequence closes up)."""
    part = seq[:-2]
    return part[~np.isin(part, unseen)] if len(unseen) else part


def split(dataset, unseen=()):
    """Returns (train, valid, test) Examples. unseen: item ids no training example may contain
    (cold start, below); validation and test keep their full histories."""
    train, valid, test = [], [], []
    for u, seq in enumerate(dataset.sequences):
        n = len(seq)
        part = training_part(seq, unseen)
        train += [(u, part, t) for t in range(1, len(part))]  # targets 1..n-3 (no unseen items)
        valid.append((u, seq, n - 2))
        test.append((u, seq, n - 1))
    return _make_examples(train), _make_examples(valid), _make_examples(test)


# Cold start (paper Sec. 4.3, Fig. 5). A share of the items that are test targets become "unseen":
# no training example contains them, neither as target nor in a history (training_part drops them),
# the RQ-VAE is trained without their embeddings, and the collision token numbers the seen items as
# if the unseen ones did not exist (rqvae.add_collision_token; the unseen ones follow, so every ID
# stays unique); unseen items still get their first codes from their embeddings,
# which is what lets TIGER retrieve them. Validation and test histories keep any unseen item they
# hold: a user may well own a new item, and its Semantic ID is computable from its content. The
# choice is a function of the dataset and the share alone (a fixed seed), so prepare.py, tiger.py
# and eval.py agree on it without passing a file around.

COLD_START_SEED = 0


def unseen_items(dataset, share):
    """The cold-start experiment's unseen items: `share` of the distinct test targets, a seeded
    choice, as a sorted (n_unseen,) int64 array of item ids (empty for share = 0)."""
    if share <= 0:
        return np.zeros(0, dtype=np.int64)
    targets = np.unique([seq[-1] for seq in dataset.sequences])
    n = max(1, round(share * len(targets)))
    return np.sort(np.random.default_rng(COLD_START_SEED).choice(targets, n, replace=False))


def seen_items(dataset, unseen):
    """The complement: (n_items,) bool, True for items training may see (row i is item id i+1)."""
    return ~np.isin(np.arange(1, dataset.n_items + 1), unseen)


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
#   encoder input:  [user, item_1 codes..., item_n codes...] (1 + L*n tokens, right-padded with PAD)
#   decoder input:  [BOS, c_0, ..., c_{L-2}]   teacher forcing
#   decoder target: [c_0, c_1, ..., c_{L-1}]   cross-entropy on all L codes of the next item

PAD, BOS = 0, 1


class Tokenizer:
    def __init__(self, codes, n_user_buckets=N_USER_BUCKETS):
        # codes: (n_items, L) integer Semantic IDs, row i for item id i+1 (written by prepare.py)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.min() < 0:
            raise InputError(f"Semantic-ID table must be (n_items, L) non-negative ints, got "
                             f"shape {codes.shape}")
        self.id_length = codes.shape[1]                               # L
        self.level_sizes = (codes.max(axis=0) + 1).tolist()           # tokens per level
        self.level_offset = (2 + np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]])).tolist()
        self.levels = list(zip(self.level_offset, self.level_sizes))  # [(first token, size)]
        self.user_offset = 2 + sum(self.level_sizes)
        self.vocab_size = self.user_offset + n_user_buckets
        self.n_user_buckets = n_user_buckets
        # item_tokens[i] = the L tokens of item id i; row 0 (the padding item) is all PAD
        tokens = codes + np.asarray(self.level_offset)
        pad_row = np.zeros((1, self.id_length), np.int64)
        self.item_tokens = torch.from_numpy(np.concatenate([pad_row, tokens]))
        self.codes = codes

    def user_tokens(self, users):
        return torch.tensor([self.user_offset + user_bucket(u, self.n_user_buckets) for u in users])


# ----------------------------------------------------------------------------------------------
# 5. Batching. Histories are padded only to the longest one in the batch (most are short: the
# median user has 6 items), so the encoder reads far fewer tokens than at a fixed length of 81.

def make_batch(examples, idx, tokenizer, user_tok):
    """Tensors for the examples at positions idx. user_tok: (n_users,) token of each user
    (precomputed), or None for an encoder input without the user token (paper Table 8).

    Returns a dict: enc (B, 1+L*n) encoder tokens (L*n without the user), dec_in (B, L), target
    (B, L) tokens, target_item (B,) item ids, with n = the longest history in this batch."""
    idx = np.asarray(idx)
    n = int(examples.length[idx].max())
    hist = torch.from_numpy(examples.history[idx, :n])                  # (B, n) item ids, 0 = pad
    enc = tokenizer.item_tokens[hist].flatten(1)                        # (B, n*L); pad items -> PAD
    if user_tok is not None:
        user = user_tok[torch.from_numpy(examples.user[idx])].unsqueeze(1)  # (B, 1)
        enc = torch.cat([user, enc], dim=1)
    target_item = torch.from_numpy(examples.target[idx])
    target = tokenizer.item_tokens[target_item]                         # (B, L)
    dec_in = torch.cat([torch.full_like(target[:, :1], BOS), target[:, :-1]], dim=1)
    return {"enc": enc, "dec_in": dec_in, "target": target, "target_item": target_item}


def epoch_batches(examples, batch_size, seed, by_length=False, pool=64):
    """The batches of one training epoch as arrays of example positions, a seeded shuffle.

    by_length (a speed option, not in the paper): shuffle, then within each pool of `pool` batches
    sort by history length before cutting, and shuffle the batches. Each batch then holds histories
    of similar length, so padding to the batch's longest history wastes little (test_all.py pins
    how little). Batches stay random in content and order."""
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


# ==============================================================================================
# Part II. The workshop: files checked at the door, artefacts on disk, config.

# ----------------------------------------------------------------------------------------------
# 6. The shipped files, read and checked at the door: a bad file is one line saying what is wrong
# and how to fix it, never a traceback from deep inside or a silently wrong run.

class InputError(Exception):
    """Bad input from the user: a file, a flag, a config value, a stale artefact.

    Raised at the door with a message that says what is wrong and how to fix it. Every script
    catches it in its `__main__` block and prints `error: ...` instead of a traceback."""


def _text_lines(path):
    """The lines of a UTF-8 text file, numbered from 1."""
    try:
        with open(path, encoding="utf-8") as f:
            return list(enumerate(f.read().splitlines(), 1))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); restore it from "
                         f"the repository (git checkout -- data/)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None


def _load_items(path):
    # one JSON object a line, in id order: {"item": 1, "asin": ..., "title": ..., "text": ...}
    items = []
    for lineno, line in _text_lines(path):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {lineno}: not valid JSON ({e.msg}); each line "
                             f"must be one JSON object like "
                             f"{{\"item\": {lineno}, \"title\": ...}}") from None
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
        raise InputError(f"{path}: cannot be read as a .npy array ({e}); restore it from the "
                         f"repository") from None
    if emb.ndim != 2 or emb.shape[0] != n_items:
        raise InputError(f"{path}: shape {emb.shape}, but items.jsonl lists {n_items} items; the "
                         f"embedding matrix needs one row per item, (n_items, dim), row i for item "
                         f"id i+1")
    emb = emb.astype(np.float32)   # shipped as float16 to halve the repo size
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(f"{path}: {len(rows)} row(s) hold NaN or inf, first at row {rows[0]} "
                         f"(item id {rows[0] + 1}); re-embed those items or restore the file")
    return emb


def _load_sequences(path, n_items):
    # one user a line: "user item1 item2 ...", items in time order, ids from 1
    users, sequences, line_of = [], [], {}
    for lineno, line in _text_lines(path):
        fields = line.split()
        if not fields:
            continue  # tolerate blank lines (e.g. a trailing newline)
        where = f"{path}, line {lineno}"
        if not all(x.isascii() and x.isdigit() for x in fields[1:]):
            raise InputError(f"{where}: '{line.strip()[:60]}' is malformed; each line must be a "
                             f"user id followed by integer item ids separated by spaces")
        bad = [x for x in fields[1:] if not 1 <= int(x) <= n_items]
        if bad:
            raise InputError(f"{where}: item id {bad[0][:20]} is out of range; ids run from 1 to "
                             f"{n_items} (the number of lines in items.jsonl)")
        if len(fields) - 1 < 3:
            raise InputError(f"{where}: user {fields[0]} has {len(fields) - 1} item(s), but the "
                             f"leave-one-out split needs at least 3 (train, validation, test); "
                             f"drop the user or use the 5-core data shipped in the repository")
        if fields[0] in line_of:
            raise InputError(f"{where}: user {fields[0]} again (first on line "
                             f"{line_of[fields[0]]}); each user has one line, the whole "
                             f"sequence in time order")
        line_of[fields[0]] = lineno
        users.append(fields[0])
        sequences.append(np.array([int(x) for x in fields[1:]], dtype=np.int64))
    if not sequences:
        raise InputError(f"{path}: no users; the file is empty")
    return users, sequences


# ----------------------------------------------------------------------------------------------
# 7. Artefacts on disk. Every stage writes through these, so every stage gets the same guarantees:
# a file appears under its real name only when complete (a temporary file in the same folder, then
# an atomic rename), a failed write is one clear error and leaves nothing behind, and one process at
# a time writes into an output folder (an operating-system lock on folder/.lock).

TMP_PREFIX = ".tmp-"   # temporary files of write_atomic; a killed writer's leftovers are cleaned up


def md5(array):
    """Fingerprint of an array's bytes: ties artefacts to the exact data they were made from."""
    return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()


def make_dirs(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the folder {folder}: {e.strerror or e}") from None


def write_atomic(path, write):
    """write(f) fills an open binary file; it appears under path only once complete."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                                   prefix=TMP_PREFIX + os.path.basename(path))
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so even a power cut leaves old or new
        os.chmod(tmp, 0o644)      # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk, a read-only folder: say so in one line
            raise InputError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on folder/.lock while writing into folder: a second process that
    wants the same folder gets a clear error instead of mixing its files with ours. The operating
    system releases the lock when its process ends, however it ends, so a killed run never leaves
    a folder locked; the temporary files such a run left behind are removed here."""
    make_dirs(folder)
    path = os.path.join(folder, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"{folder} is in use by another running process (pid {holder}); wait for "
                         f"it to finish, or write elsewhere (another --run or --out_dir)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())  # for the message above; the lock itself is the flock
    for name in os.listdir(folder):          # leftovers of a writer that was killed mid-write
        if name.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
    try:
        yield
    finally:
        os.close(fd)  # releases the lock
        # nothing was written (a start that failed at the door): leave no empty folder behind
        if os.listdir(folder) == [".lock"]:
            with contextlib.suppress(OSError):
                os.remove(path)
                os.rmdir(folder)


def provenance(script, argv, device="cpu"):
    """Where a result comes from, saved beside it: the command, the code's git commit ("+changes"
    when the working tree differs from it), the machine and the thread count."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,
                                        timeout=10).stdout
        commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
        if git("status", "--porcelain", "--untracked-files=no").strip():
            commit += "+changes"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    machine = platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux: the CPU's name
            machine = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                           machine)
    if device == "cuda":
        machine = torch.cuda.get_device_name(0)
    return {"command": " ".join(["python", script, *argv]), "commit": commit, "device": device,
            "machine": machine, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def fit_with_names(fit_with):
    """The --fit_with setting ('sports,toys': other datasets whose items also train the RQ-VAE,
    App. E) as a sorted tuple of names, so 'toys,sports' is the same build; () for ''."""
    names = sorted({n.strip() for n in fit_with.split(",") if n.strip()})
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise InputError(f"--fit_with={fit_with}: unknown dataset {', '.join(unknown)}; use names "
                         f"from {', '.join(DATASETS)}, separated by commas")
    return tuple(names)


def fit_with_embeddings(fit_with):
    """The item embeddings of the --fit_with datasets, stacked (M, 768), or None for ''."""
    names = fit_with_names(fit_with)
    return np.concatenate([load_dataset(n).item_emb for n in names]) if names else None


def check_run_name(run):
    """A run's folder name (tiger.py's and baselines/sasrec.py's --run): a plain name of at most
    100 letters, digits, '.', '_' or '-', not starting with '.', so it never escapes its folder."""
    if len(run) > 100:
        raise InputError(f"bad config: run is a folder name of at most 100 characters (got "
                         f"{len(run)})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run):
        raise InputError(f"bad config: run must be a plain folder name of letters, digits, '.', "
                         f"'_' or '-', not starting with '.' (got {run!r})")


def ids_folder(out_dir, name, ids, cold_start=0.0, fit_with=""):
    """Where prepare.py writes a build: out/<dataset>/<ids>/; out/<dataset>/<ids>-cold<share>/ for
    the cold-start experiment's IDs (built without the unseen items; the share written exactly, so
    0.05 and 0.05000001 never share a folder), out/<dataset>/<ids>-with-<others>/ for IDs learnt
    together with other datasets' items (--fit_with), so neither ever replaces the main build.
    Runs go into a folder under it."""
    others = fit_with_names(fit_with)
    if cold_start > 0:
        ids = f"{ids}-cold{float(cold_start)!r}"
    if others:
        ids = f"{ids}-with-{'+'.join(others)}"
    return os.path.join(out_dir, name, ids)


def load_codes(ds, ids="rqvae", out_dir="out", dataset=None, cold_start=0.0, fit_with=""):
    """The (n_items, L) int64 Semantic-ID table that prepare.py wrote for dataset ds and scheme ids
    (and cold-start share, and --fit_with datasets), checked as strictly as prepare.py checks it
    before reusing it: finished build, right scheme, dataset and variant, built from these very
    embeddings (and the --fit_with datasets' as they are now), the table prepare.py wrote
    (checksum), one distinct in-range ID per item. dataset: the name or folder the user gave, for
    the suggested fix command."""
    folder = ids_folder(out_dir, ds.name, ids, cold_start, fit_with)
    others = ",".join(fit_with_names(fit_with))
    fix = (f"python prepare.py --dataset={dataset or ds.name} --ids={ids}"
           + (f" --cold_start={float(cold_start)!r}" if cold_start > 0 else "")
           + (f" --fit_with={others}" if others else "")
           + (f" --out_dir={out_dir}" if os.path.normpath(out_dir) != "out" else ""))
    built, stats, codes = _read_build(folder, fix)
    wanted = (ids, ds.name, cold_start, others)
    have = (built.get("ids"), built.get("dataset"), built.get("cold_start", 0.0),
            built.get("fit_with", ""))
    sizes = [int(n) for n in built["level_sizes"]]
    if have != wanted:
        problem = (f"the folder holds {have[0]} IDs of {have[1]}, cold-start share {have[2]}, "
                   f"fitted with '{have[3]}' (config.json)")
    elif built["item_emb_md5"] != md5(ds.item_emb):
        problem = (f"these IDs were built from other item embeddings than {ds.name}'s (its "
                   f"item_emb.npy changed, or another dataset folder named '{ds.name}' wrote them)")
    elif others and built.get("fit_with_md5") != md5(fit_with_embeddings(others)):
        problem = f"the item embeddings of {others} changed since these IDs were learnt on them"
    elif codes.dtype != np.int64 or codes.ndim != 2:
        problem = f"expected a 2-d int64 array, got {codes.ndim}-d {codes.dtype}"
    elif codes.shape != (ds.n_items, len(sizes)):
        problem = (f"shape {codes.shape}, expected ({ds.n_items}, {len(sizes)}) "
                   f"for {ds.n_items} items")
    elif md5(codes) != stats["codes_md5"]:
        problem = "it is not the table this build wrote (its checksum differs from stats.json)"
    elif (codes < 0).any() or (codes >= np.array(sizes)).any():
        problem = f"codes out of range; level sizes are {sizes}"
    elif len(np.unique(codes, axis=0)) != ds.n_items:
        problem = (f"{ds.n_items - len(np.unique(codes, axis=0))} duplicate IDs; every item "
                   f"needs its own")
    else:
        return codes
    raise InputError(f"{os.path.join(folder, 'codes.npy')}: {problem}; run `{fix} --force`")


def _read_build(folder, fix):
    """A build's config.json, stats.json and codes.npy, each readable, or one error saying which."""
    paths = {f: os.path.join(folder, f) for f in ("codes.npy", "config.json", "stats.json")}
    for p in paths.values():
        if not os.path.isfile(p):
            raise InputError(f"{p} is missing (the Semantic IDs are not built, or the build did "
                             f"not finish); run `{fix}`")
    try:
        loaded = {}
        for f in ("config.json", "stats.json"):
            with open(paths[f], encoding="utf-8") as fh:
                loaded[f] = json.load(fh)
        built, stats = loaded["config.json"], loaded["stats.json"]
        [int(n) for n in built["level_sizes"]], built["item_emb_md5"], stats["codes_md5"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{folder}: config.json or stats.json is unreadable or from an older "
                         f"prepare.py ({type(e).__name__}: {e}); run `{fix} --force`") from None
    try:
        codes = np.load(paths["codes.npy"], allow_pickle=False)  # never unpickle
    except Exception as e:
        raise InputError(f"{paths['codes.npy']} cannot be read ({e}); "
                         f"run `{fix} --force`") from None
    return built, stats, codes


# ----------------------------------------------------------------------------------------------
# 8. Config from the command line, the nanoGPT way without exec: every script keeps its settings as
# plain globals; a config file (Python-looking lines `name = literal`, read with ast, never
# executed) and then `--name=value` flags override them. Unknown names and values of the wrong
# type are errors.

def settings(namespace):
    """A script's settings: its lower-case globals that hold a number, a string or a bool. Call it
    right after the config block: `DEFAULTS = data.settings(globals())`."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, (int, float, str, bool))}


def pick_device(device="auto"):
    """The one device rule: auto = a CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_settings(config, rules, what="config"):
    """Check every setting against its rule, at the door: a bad value is one clear error, never a
    silently wrong run or a traceback from deep inside. rules: name -> an interval written as text,
    "[1, inf)" or "(0, 1]" (brackets include the end, parentheses exclude it), or a tuple of the
    allowed strings."""
    problems = []
    for key, rule in rules.items():
        value = config[key]
        if isinstance(rule, tuple):
            if value not in rule:
                problems.append(f"{key} must be one of {', '.join(rule)} (got {value!r})")
            continue
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        if not ((lo <= value if rule[0] == "[" else lo < value)
                and (value <= hi if rule[-1] == "]" else value < hi)):
            problems.append(f"{key} must be in {rule} (got {value})")
    if problems:
        raise InputError(f"bad {what}: " + "; ".join(problems))


def configure(defaults, argv):
    """The settings of a run: defaults, overridden by each argument in turn, a config file (a path)
    or a --name=value flag; --help lists them and exits."""
    config = dict(defaults)
    for arg in argv:
        if arg == "--":  # the end of a launcher's own options (torchrun ... tiger.py -- --run=x)
            continue
        if arg in ("-h", "--help"):
            print("settings (default values); override them with a config file and --name=value:")
            for k, v in config.items():
                print(f"  --{k}={v!r}")
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                if not isinstance(config.get(key), bool):
                    raise InputError(f"{arg}: write settings as --{key}=value")
                text = "True"  # a bare --flag switches a boolean on
            try:
                value = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                value = text  # a bare word is a string: --dataset=toys
            _assign(config, key, value, arg, text)
        else:
            for key, value, where in _read_config_file(arg):
                _assign(config, key, value, where)
    return config


def _assign(config, key, value, where, text=None):
    """config[key] = value, if key is a setting and value has the default's type."""
    if key not in config:
        raise InputError(f"{where}: unknown setting '{key}'; known settings: "
                         f"{', '.join(sorted(config))}")
    old = config[key]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, str) and not isinstance(value, str) and text is not None:
        value = text  # a string setting takes the text as written: --run=2024 is the name "2024"
    if type(value) is not type(old):
        raise InputError(f"{where}: '{key}' must be a {type(old).__name__} (default {old!r}), "
                         f"got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: '{key}' must be a finite number, got {value!r}")
    config[key] = value


def _read_config_file(path):
    """A config file's `name = literal` lines as (name, value, where) triples; never executed."""
    if not os.path.isfile(path):
        raise InputError(f"config file {path} not found (settings are passed as --name=value)")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except UnicodeDecodeError as e:
        raise InputError(f"config file {path} is not UTF-8 text "
                         f"({e.reason} at byte {e.start})") from None
    except SyntaxError as e:
        raise InputError(f"{path}, line {e.lineno}: not a valid `name = value` line "
                         f"({e.msg})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"config file {path} cannot be read ({e})") from None
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise InputError(f"{path}, line {node.lineno}: only `name = value` lines are allowed")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise InputError(f"{path}, line {node.lineno}: the value must be a literal "
                             f"(number, string, bool)") from None
        yield node.targets[0].id, value, f"{path}, line {node.lineno}"


# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    # the statistics of the paper's Table 6, plus the number of examples in each split
    print(f"{'dataset':8s} {'users':>7s} {'items':>7s} {'interact.':>10s} {'mean len':>9s} "
          f"{'median':>7s} {'train ex.':>10s} {'valid ex.':>10s} {'test ex.':>9s}")
    try:
        for name in DATASETS:
            ds = load_dataset(name)
            lengths = np.array([len(s) for s in ds.sequences])
            train, valid, test = split(ds)
            print(f"{name:8s} {len(ds.users):7,d} {ds.n_items:7,d} {lengths.sum():10,d} "
                  f"{lengths.mean():9.2f} {np.median(lengths):7.0f} {len(train):10,d} "
                  f"{len(valid):10,d} {len(test):9,d}")
    except InputError as e:
        sys.exit(f"error: {e}")
