"""
baselines/sasrec.py -- SASRec, the strongest baseline of TIGER's Table 1, on TIGER's own protocol.

SASRec ("Self-Attentive Sequential Recommendation", Kang & McAuley, ICDM 2018) is what a user would
pick instead of generative retrieval: every item has its own learned embedding, a causal transformer
reads the history, and the next item is the one whose embedding has the largest dot product with the
last hidden state. Nothing is generated and there are no Semantic IDs: the score of every item in
the catalogue comes out of one matrix product. Read this file beside tiger.py; it is the same job
done the other way. Top to bottom:

  1. config: plain globals, overridden by a config file and --key=value (data.configure)
  2. the model (paper Sec. III): item + learned position embeddings, causal self-attention blocks,
     the score of an item as a dot product with the same item embeddings
  3. training: TIGER's training pairs laid out as SASRec sequences; the two losses (the paper's
     binary cross-entropy with one sampled negative, and the full-softmax cross-entropy)
  4. evaluation: the full catalogue ranked for each validation or test history, scored by eval.py's
     metrics (history items kept in the ranking, as TIGER; and removed, as many papers do), and
     the cold-start split of TIGER's Fig. 5: can an item-ID model find an item it never trained on?
  5. the run, and the machinery a real run needs (settings checked at the door, a run folder that is
     never overwritten silently, checkpoints that know their data)

The protocol is TIGER's exactly: data.split's leave-one-out examples (a history of at most 20
items), the same training pairs, model selection on validation only, the test split read once at
the end.
Run `python baselines/sasrec.py` (full-softmax loss), `python baselines/sasrec.py --loss=bce` (the
paper's loss), `python baselines/sasrec.py config/sasrec_long.py` (the longer budget, as long as
TIGER's long recipe); the run goes to out/<dataset>/sasrec/<run>/.
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# `python baselines/sasrec.py` puts baselines/ on the import path, not the repository: add it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval as evaluation  # noqa: E402  (eval.py: the metrics; "eval" would shadow the builtin)
import tiger  # noqa: E402  (its precision rule, so that both models compute alike)

# ----------------------------------------------------------------------------------------------
# 1. Config. The paper's values (Sec. IV-B, "Implementation Details") in the comments. lr was
# chosen on Beauty's validation among a few runs of up to 2,000 steps with the ce loss; dropout is
# the paper's, which full-length runs preferred on Sports' and Toys' validation (the results log's
# entries for issue #30); the rest is the paper's, or TIGER's CPU width.
dataset = "beauty"        # beauty | sports | toys, or a dataset folder
out_dir = "out"           # this run goes to out/<dataset>/sasrec/<run>/
run = ""                  # the run folder's name (letters, digits, . _ -); "" = the loss's name
overwrite = False         # start over in a run folder that holds an earlier run (else: an error)
loss = "ce"               # ce: softmax cross-entropy over the whole catalogue | bce: the paper's
                          # binary cross-entropy, one sampled negative per position (Sec. III-E)
cold_start = 0.0          # > 0: TIGER's cold-start split (its Sec. 4.3, Fig. 5): train without this
                          # share of the test targets (data.unseen_items), then measure whether the
                          # model finds them (chapter 4); the run folder gets "-cold<share>"
# the model (SASRecConfig)
n_layer = 2               # self-attention blocks (paper: 2)
n_head = 1                # paper: 1
d_model = 64              # paper: 50
dropout = 0.5             # paper: 0.5 on the sparse Amazon datasets (0.2 on MovieLens-1M)
# training
batch_size = 128          # training sequences per step (chapter 3; ~3.6 training pairs each on
                          # Beauty); paper: 128
lr = 0.005                # paper: 0.001, Adam with beta2 = 0.98
weight_decay = 0.0        # AdamW's decoupled weight decay on the matrices (paper: none)
schedule = "constant"     # constant (the paper) | cosine: to 0 at max_steps (tiger.py's, no warmup)
max_steps = 24000         # ~30 minutes of the ce loss on a 2-core CPU beside another run; ~80
                          # epochs of Beauty (paper: up to 200); early stopping may end it sooner
seed = 1337
# evaluation and model selection (validation split only; the test split is read once, at the end)
eval_every = 1000         # steps between validation evaluations (all validation users)
patience = 5              # stop after this many evaluations without a better validation Recall@10
eval_batch_size = 1024
device = "auto"           # auto (cuda if available, else cpu) | cpu | cuda
precision = "auto"        # auto: bf16 autocast where the hardware has it, as tiger.py | bf16 | fp32
DEFAULTS = data.settings(globals())
RANGES = {  # what check_settings accepts
    **{k: "[1, inf)" for k in ("n_layer", "n_head", "d_model", "batch_size", "max_steps",
                               "eval_every", "patience", "eval_batch_size")},
    "dropout": "[0, 1)", "cold_start": "[0, 0.5]", "lr": "(0, 1]", "weight_decay": "[0, 1]",
    "seed": "[0, inf)",
    "loss": ("ce", "bce"), "schedule": ("constant", "cosine"), "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "bf16", "fp32"),
}


# ----------------------------------------------------------------------------------------------
# 2. The model (paper Sec. III). A history s_1 .. s_n (oldest first, n <= 20) becomes the matrix
# E^ = [M_s1 + P_1; ...; M_sn + P_n] (eq. 1): item embedding plus a learned embedding of the
# position. The positions count from the oldest item of the history (0 = the first item the model
# reads), so a history looks the same to the model wherever it sits in the user's sequence, in
# training and in evaluation alike (chapter 3 depends on it). Then b blocks of causal self-attention
# and a point-wise feed-forward network; the state F_t after item t predicts item t+1, and the score
# of item i is r_{i,t} = F_t . M_i with the input embeddings M reused ("shared item embedding",
# Sec. III-D): one table, n_items x d, is the whole vocabulary.

@dataclass
class SASRecConfig:
    n_items: int      # the catalogue: item ids 1..n_items, id 0 is padding
    max_len: int      # the longest history, data.MAX_HISTORY (20): the number of learned positions
    n_layer: int
    n_head: int
    d_model: int
    dropout: float


# the run settings that are SASRecConfig fields (the other two come from the dataset)
MODEL_KEYS = ("n_layer", "n_head", "d_model", "dropout")


class CausalSelfAttention(nn.Module):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = S W^Q, K = S W^K, V = S W^V (eq. 2),
    where position t may attend to positions 1..t only: "we modify the attention by forbidding all
    links between Q_i and K_j (j > i)" (Sec. III-B). The paper has no output projection after the
    heads (its feed-forward network mixes them), so neither do we."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        # W^Q, W^K, W^V side by side: one matrix product gives all three
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)                                 # 3 x (B, T, d)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])              # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # key after query
        att = self.attn_dropout(att.masked_fill(future, float("-inf")).softmax(-1))
        return (att @ v).transpose(1, 2).reshape(B, T, d)                     # heads side by side


class Block(nn.Module):
    """One self-attention block (Sec. III-C): g(x) = x + Dropout(g(LayerNorm(x))) for g the
    attention and then the feed-forward network FFN(S) = ReLU(S W1 + b1) W2 + b2 (eq. 3), both
    d x d. (The released code differs slightly: its residual adds the normalised x.)"""

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.norm_attn, self.attn = nn.LayerNorm(d), CausalSelfAttention(config)
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(config.dropout),
                                 nn.Linear(d, d))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm_attn(x)))
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class SASRec(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.d_model
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)   # M; row 0 = padding
        self.pos_emb = nn.Embedding(config.max_len, d)                       # P
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = nn.LayerNorm(d)   # on the last block's output (the released code has it)
        # embeddings of about unit length (std d^-1/2 per entry), so that the first scores F_t . M_i
        # (F_t is layer-normalised: length ~sqrt(d)) are of order 1; the padding row stays zero
        for table in (self.item_emb, self.pos_emb):
            nn.init.normal_(table.weight, std=d ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq):
        """seq: (B, T) item ids, oldest first, padded with 0 on the right (T <= max_len). Returns F,
        (B, T, d): row t summarises items 0..t and predicts item t+1. Padding needs no mask: it sits
        after every real item, and the causal mask already hides what comes after a position."""
        positions = torch.arange(seq.shape[1], device=seq.device)
        x = self.emb_drop(self.item_emb(seq) + self.pos_emb(positions))     # (B, T, d), eq. 1
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def scores(self, h):
        """h: (..., d) states. Returns r = h . M_i for every item, (..., n_items + 1): column i is
        item id i. Column 0, the padding item, is -inf: never recommended, never a softmax class."""
        r = h @ self.item_emb.weight.T
        r[..., 0] = float("-inf")
        return r


# ----------------------------------------------------------------------------------------------
# 3. Training. TIGER learns from data.split's training examples: for every item t >= 1 of a
# user's training part (all but the validation and test items) the pair (the up-to-20 items before
# t -> item t). SASRec learns from exactly these pairs, each once per epoch, laid out the way it
# learns best, as sequences with a loss at every position:
#   - a user's first 21 training items are one sequence: position j reads items 0..j and predicts
#     item j+1, which is TIGER's pair for target j+1 (its history is the whole prefix, as here). The
#     causal mask makes position j blind to what follows, and positions count from the first item,
#     so each position's prediction is exactly the one the model makes for that pair read alone;
#   - a later target t > 20 has a history that starts in mid-sequence (items t-20..t-1), which no
#     position of the first sequence reproduces (there those items sit at other positions, after
#     other items); it gets a sequence of its own, its 20-item history, with a loss at the last
#     position only. (Windows over the whole sequence with a loss everywhere, as the paper's code
#     does, would train on histories TIGER never sees: cut-off ones, 50 items long.)
# On Beauty: 131,413 pairs in 36,582 sequences (22,363 users' first ones, 14,219 long-history
# ones); test_training_rows_hold_exactly_tigers_pairs checks the pairs are the same.

@dataclass
class Rows:
    seq: np.ndarray       # (N, MAX_HISTORY) item ids, oldest first, padded with 0 on the right
    target: np.ndarray    # (N, MAX_HISTORY) the item to predict at each position, 0 = no loss there
    length: np.ndarray    # (N,) real items in seq (data.epoch_batches sorts by it)

    def __len__(self):
        return len(self.length)


def training_rows(train):
    """train: data.split's training Examples. Returns the Rows that hold exactly its pairs."""
    whole = train.position == train.length     # the history is the user's whole prefix (t <= 20)
    # per user, the whole-prefix example with the longest history: its positions hold all the others
    idx = np.flatnonzero(whole)
    idx = idx[np.lexsort((train.position[idx], train.user[idx]))]          # by user, then position
    first = idx[np.append(train.user[idx][1:] != train.user[idx][:-1], True)]  # each user's last
    later = np.flatnonzero(~whole)                                          # targets t > 20
    seq = train.history[np.concatenate([first, later])]                     # (N, 20)
    length = train.length[np.concatenate([first, later])]
    target = np.zeros_like(seq)
    target[:len(first), :-1] = seq[:len(first), 1:]   # a first sequence: each next item (0 after)
    rows = np.arange(len(seq))
    target[rows, length - 1] = train.target[np.concatenate([first, later])]  # and the example's own
    return Rows(seq, target, length)


def sample_negatives(positives, n_items, generator=None):
    """One negative per positive, uniform over the catalogue without that positive: a draw from
    1..n_items-1, moved up by one from the positive on. (The paper's code also avoids every item of
    the user's sequence; with 12k items and ~9 per user the difference is small.)"""
    neg = torch.randint(1, n_items, positives.shape, generator=generator, device=positives.device)
    return neg + (neg >= positives).long()


def loss_of(model, h, target, kind, negatives=None):
    """h: (B, T, d) the model's states; target: (B, T) the next item at each position, 0 where
    there is none. The mean over the positions with a target of
      ce:  -log softmax_i(r_i)[target], the softmax over all n_items items (column 0 is -inf)
      bce: -log sigma(r_target) - log(1 - sigma(r_negative)), one negative per position (the paper's
           eq. in Sec. III-E; `negatives` (P,) fixes them, else sample_negatives draws them)."""
    at = target > 0
    h, pos = h[at], target[at]                                        # (P, d), (P,)
    if kind == "ce":
        return F.cross_entropy(model.scores(h).float(), pos)
    if negatives is None:
        negatives = sample_negatives(pos, model.config.n_items)
    emb = model.item_emb.weight
    pos_logit = (h * emb[pos]).sum(-1).float()                        # (P,)
    neg_logit = (h * emb[negatives]).sum(-1).float()                  # (P,)
    return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
            + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))


def get_lr(step, lr, max_steps, schedule):
    """constant: the paper's; cosine: from lr down to 0 at max_steps."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max_steps)))


def make_optimizer(model, settings):
    # Adam with beta2 = 0.98 as the paper; decoupled weight decay (if any) on the matrices and the
    # embedding tables, not on the layer norms' scales and the biases (the 1-d parameters)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings["lr"], betas=(0.9, 0.98))


def train_step(model, opt, rows, idx, step, settings, dev, autocast):
    """One step on the rows at positions idx, padded to their longest; returns the loss tensor."""
    for group in opt.param_groups:
        group["lr"] = get_lr(step, settings["lr"], settings["max_steps"], settings["schedule"])
    n = int(rows.length[idx].max())
    seq = torch.from_numpy(rows.seq[idx, :n]).to(dev)                 # (B, n)
    target = torch.from_numpy(rows.target[idx, :n]).to(dev)           # (B, n)
    with autocast():  # bf16 matrix products (the largest: the scores of every item), or float32
        loss = loss_of(model, model(seq), target, settings["loss"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


# ----------------------------------------------------------------------------------------------
# 4. Evaluation (TIGER's Sec. 4, "Evaluation Metrics"). For each validation or test example, the
# state after the last history item scores the full catalogue, item 0 excluded; the top 20 go to
# eval.py's metrics, the very code that scores TIGER. History items stay in the ranking, as TIGER's
# beam search keeps them. Many papers remove them; we report that second set too (eval.py
# --drop_history does the same for TIGER). On these datasets it can only raise the numbers: no user
# buys an item twice, so a history item in the list is a certain miss.

@torch.no_grad()
def rank(model, history, length, k, batch_size, device):
    """history: (N, H) item ids, oldest first, 0-padded; length: (N,). Returns two (N, k) item-id
    rankings, best first: over the full catalogue, and over the catalogue without the history.
    In float32 even after training in bf16: bf16 keeps 8 bits of mantissa, and close scores would
    tie (and be ordered by the tie-break, not by the model)."""
    was_training = model.training
    model.eval()
    kept, removed = [], []
    for start in range(0, len(history), batch_size):
        n = torch.as_tensor(length[start:start + batch_size], device=device)  # (b,)
        seq = torch.as_tensor(history[start:start + batch_size, :int(n.max())], device=device)
        h = model(seq)                                                      # (b, T, d)
        last = h[torch.arange(len(seq), device=device), n - 1]              # (b, d)
        r = model.scores(last)                                              # (b, n_items + 1)
        kept.append(r.topk(k, dim=1).indices.cpu())
        r = r.scatter(1, seq, float("-inf"))        # the history out (padding hits item 0)
        removed.append(r.topk(k, dim=1).indices.cpu())
    model.train(was_training)
    return torch.cat(kept), torch.cat(removed)


def evaluate(model, examples, batch_size, device):
    """Recall and NDCG at 5, 10, 20 for data.Examples (a validation or test split). Returns two
    dicts of eval.metrics: history kept (TIGER's protocol), history removed."""
    kept, removed = rank(model, examples.history, examples.length, max(evaluation.KS), batch_size,
                         device)
    target = torch.from_numpy(examples.target)
    return evaluation.metrics(kept, target), evaluation.metrics(removed, target)


# Cold start (TIGER's Sec. 4.3, Fig. 5). The paper's argument for Semantic IDs: a new item, in no
# training example, still has an ID computed from its content, which TIGER can generate. SASRec's
# new item has only its embedding row, which training never pulls towards any history (the item is
# never a target) and only pushes away (as a softmax column, or as a sampled negative). Trained on
# the cold-start split (--cold_start), SASRec ranks the whole catalogue, unseen items included; this
# measures how often it finds the held-out item, for the users whose held-out item is unseen and
# for the others, as eval.py's --cold_start does for TIGER (Recall@K, K = 1..20).

def cold_start_recalls(kept, targets, unseen):
    """kept: (N, 20) test rankings (history kept), targets: (N,) item ids, unseen: the unseen items.
    Returns {"users": {group: count}, group: [Recall@1 .. Recall@20]} for the groups
    "unseen_target" and "seen_target"."""
    targets = torch.as_tensor(targets)
    is_cold = torch.from_numpy(np.isin(targets.numpy(), unseen))
    groups = {"unseen_target": is_cold, "seen_target": ~is_cold}
    out = {"users": {g: int(m.sum()) for g, m in groups.items()}}
    for g, m in groups.items():
        out[g] = evaluation.recall_curve(kept[m], targets[m], evaluation.COLD_KS)
    return out


# ----------------------------------------------------------------------------------------------
# 5. The run: train with validation every eval_every steps, keep the best checkpoint, read the
# test split once with it. Then the machinery a real run needs: settings checked at the door, a
# run folder that is never overwritten silently (and locked while a run writes it), checkpoints
# that carry their config and a fingerprint of the data they were trained on.

def validate_settings(s):
    data.check_settings(s, RANGES)
    if s["d_model"] % s["n_head"]:
        raise data.InputError(f"bad config: d_model ({s['d_model']}) must be a multiple of n_head "
                              f"({s['n_head']}): the heads split the model's width")
    if s["run"]:
        data.check_run_name(s["run"])
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise data.InputError("device=cuda but no CUDA GPU is visible; use --device=cpu or auto")


def run_folder(s):
    name = data.dataset_name(s["dataset"])
    cold = f"-cold{float(s['cold_start'])!r}" if s["cold_start"] > 0 else ""
    return os.path.join(s["out_dir"], name, "sasrec", s["run"] or s["loss"] + cold)


def data_fingerprint(ds):
    """What a checkpoint was trained on: its catalogue size and the users' sequences (checksum)."""
    return {"n_items": ds.n_items, "sequences_md5": data.md5(np.concatenate(ds.sequences))}


def load_model(path, ds, dev="cpu"):
    """The model a best.pt holds, for dataset ds (refused if the checkpoint was trained on other
    data). Loaded with weights_only=True: tensors and plain values only, nothing unpickled."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = SASRec(SASRecConfig(**ckpt["model_config"])).to(dev)
        model.load_state_dict(ckpt["model"])
        trained_on = ckpt["data_fingerprint"]
    except FileNotFoundError:
        raise data.InputError(f"checkpoint {path} not found") from None
    except Exception as e:
        raise data.InputError(f"{path} is not a checkpoint written by sasrec.py "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    if trained_on != data_fingerprint(ds):
        raise data.InputError(f"{path} was trained on another version of dataset {ds.name}")
    return model


def train(s, run_dir, argv=()):
    """The run. s: its checked settings; run_dir is locked. Returns what it writes to
    metrics.json."""
    t0 = time.time()
    best_path, metrics_path, config_path = (os.path.join(run_dir, f)
                                            for f in ("best.pt", "metrics.json", "config.json"))
    earlier = [f for f in (best_path, metrics_path, config_path) if os.path.exists(f)]
    if earlier and not s["overwrite"]:
        names = ", ".join(os.path.basename(f) for f in earlier)
        raise data.InputError(f"{run_dir} holds an earlier run ({names}); start it over with "
                              f"--overwrite, or name a new run with --run=NAME")
    dev = data.pick_device(s["device"])
    provenance = data.provenance("baselines/sasrec.py", list(argv), dev)
    ds = data.load_dataset(s["dataset"])
    unseen = data.unseen_items(ds, s["cold_start"])   # cold start: no training example holds them
    train_ex, valid, test = data.split(ds, unseen)
    rows = training_rows(train_ex)
    torch.manual_seed(s["seed"])
    model_config = SASRecConfig(ds.n_items, data.MAX_HISTORY, **{k: s[k] for k in MODEL_KEYS})
    model = SASRec(model_config).to(dev)
    opt = make_optimizer(model, s)
    autocast = tiger.make_autocast(dev, s["precision"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"SASRec on {ds.name} ({ds.n_items:,} items, loss {s['loss']}): {n_params / 1e6:.2f}M "
          f"parameters, device {dev}, "
          f"{'bf16 autocast' if autocast is not contextlib.nullcontext else 'float32'}")
    print(f"training pairs: {len(train_ex):,} in {len(rows):,} sequences; {len(valid):,} valid, "
          f"{len(test):,} test examples")
    if len(unseen):
        print(f"cold start: {len(unseen)} unseen items, in no training example; all items ranked")
    for f in earlier:  # everything loaded: only now is the earlier run removed (--overwrite)
        os.remove(f)
    # config.json: the settings, and what eval.py's report files the run under (the model, and its
    # item identifiers: the plain item ids, where TIGER's are Semantic IDs)
    data.write_json(config_path, {**s, "model": "sasrec", "ids": "item"})
    identity = {"model_config": asdict(model_config), "settings": s,
                "data_fingerprint": data_fingerprint(ds)}

    steps_per_epoch = math.ceil(len(rows) / s["batch_size"])
    best, best_step, bad_evals, log, batches = -1.0, 0, 0, [], (None, None)
    model.train()
    bar = tqdm(range(s["max_steps"]), desc="train")
    t_train = time.time()
    for step in bar:
        epoch, i = divmod(step, steps_per_epoch)
        if batches[0] != epoch:  # a seeded shuffle per epoch, sequences of similar length together
            batches = (epoch, data.epoch_batches(rows, s["batch_size"], [s["seed"], epoch],
                                                 by_length=True))
        loss = train_step(model, opt, rows, batches[1][i], step, s, dev, autocast)
        evaluate_now = (step + 1) % s["eval_every"] == 0 or step + 1 == s["max_steps"]
        if step % 50 == 0 or evaluate_now:  # nothing non-finite is ever validated or saved
            if not math.isfinite(loss.item()):
                raise data.InputError(f"the training loss became {loss.item()} at step {step + 1}; "
                                      f"lower --lr and start over with --overwrite")
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if evaluate_now:
            metrics, _ = evaluate(model, valid, s["eval_batch_size"], dev)
            improved = metrics["recall@10"] > best
            best, bad_evals = (metrics["recall@10"], 0) if improved else (best, bad_evals + 1)
            log.append({"step": step + 1, "loss": loss.item(), **metrics})
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}, valid recall@10 "
                       f"{metrics['recall@10']:.4f} ndcg@10 {metrics['ndcg@10']:.4f}"
                       f"{' (best)' * improved}")
            if improved:
                best_step = step + 1
                tiger.save_checkpoint(best_path, {**identity, "model": model.state_dict(),
                                                  "step": best_step})
            if bad_evals >= s["patience"]:
                tqdm.write(f"early stop: no better validation recall@10 in {s['patience']} "
                           f"evaluations")
                break
    bar.close()
    train_s = time.time() - t_train   # the training loop, its validations included

    # The test split is read exactly once, with the checkpoint that was best on validation.
    model = load_model(best_path, ds, dev)
    results = {"best_step": best_step, "n_params": n_params,
               "steps": step + 1, "s_per_step": round(train_s / (step + 1), 4)}
    for name, examples in (("valid", valid), ("test", test)):
        results[name], results[name + "_history_removed"] = evaluate(model, examples,
                                                                      s["eval_batch_size"], dev)
        results[name + "_most_popular"] = evaluation.most_popular(ds, examples)
    if len(unseen):  # Fig. 5's measure: the same test ranking, its users split by held-out item
        kept, _ = rank(model, test.history, test.length, max(evaluation.COLD_KS),
                       s["eval_batch_size"], dev)
        results["test_cold_start"] = cold_start_recalls(kept, test.target, unseen)
    results["wall_s"] = round(time.time() - t0, 1)
    results["provenance"] = provenance
    results["data_fingerprint"] = identity["data_fingerprint"]
    results["log"] = log
    data.write_json(metrics_path, results)
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    print(f"\n{'':30s}" + "".join(f"{k:>11s}" for k in keys))
    for label, key in (("SASRec, validation", "valid"), ("SASRec, test", "test"),
                       ("SASRec, test, history removed", "test_history_removed"),
                       ("most popular, test", "test_most_popular")):
        print(f"{label:30s}" + "".join(f"{results[key][k]:11.4f}" for k in keys))
    if len(unseen):
        c = results["test_cold_start"]
        print(f"cold start, test Recall@10: {c['unseen_target'][9]:.4f} for the "
              f"{c['users']['unseen_target']} users whose held-out item is unseen, "
              f"{c['seen_target'][9]:.4f} for the other {c['users']['seen_target']}")
    print(f"wall time {results['wall_s'] / 60:.1f} min; best checkpoint {best_path} "
          f"(step {results['best_step']}); metrics {metrics_path}")
    return results


def main(argv):
    """`python baselines/sasrec.py [config file] [--key=value ...]`: train, select on validation,
    test once."""
    settings = data.configure(DEFAULTS, argv)
    validate_settings(settings)
    run_dir = run_folder(settings)
    with data.folder_lock(run_dir):  # one live run per folder
        return train(settings, run_dir, argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except data.InputError as e:
        sys.exit(f"error: {e}")
