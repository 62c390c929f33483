"""
tiger.py -- the generative retriever of TIGER (paper Sec. 3.2 and 4), trained and evaluated.

A sequence-to-sequence transformer reads a user token and the Semantic IDs of the user's last 20
items (the CPU default leaves the user token out, Table 8's ablation, which does better here) and
generates the Semantic ID of the next item, one code at a time. Beam search over the codes, kept
to valid IDs, gives a ranked list of items.

Part I is the method, in one straight line:
  1. config: the run's settings as plain globals
     (`python tiger.py config/tiger_paper.py --lr=0.003`)
  2. the model, written by hand in T5's manner and described by one TIGERConfig: RMSNorm, relative
     position bias, attention, ReLU MLP, encoder and decoder layers, the output layer
  3. decoding: prefix tables of the valid IDs, constrained beam search, sampling at a temperature,
     cold-start candidates and the epsilon rule, scoring a whole split
  4. training: input dropout, learning-rate schedule, optimizer, weight average, the loop with
     validation-only model selection, one final test
Part II is the workshop: settings checked at the door, the run folder (resume, overwrite),
checkpoints that carry their Semantic IDs, data-parallel processes (torchrun), the speed
benchmark, the command line.

Run `python prepare.py && python tiger.py`; on several GPUs (or CPU processes),
`torchrun --standalone --nproc_per_node=N tiger.py`: the lines marked "DDP:" are all it changes.
"""
import contextlib
import copy
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import eval as evaluation  # eval.py: the metrics ("eval" would shadow the builtin)

# ==============================================================================================
# Part I. The method.

# ----------------------------------------------------------------------------------------------
# 1. Config. Paper values (Sec. 4, "Sequence to Sequence Model Training") in the comments; the
# defaults are the CPU recipe (results/README.md has how each was chosen); config/tiger_paper.py
# is the paper's. The model settings among these become the model's own TIGERConfig (chapter 2).
# Steps count from 0 inside the training loop; "step N" in logs and checkpoints means N steps done.
dataset = "beauty"        # beauty | sports | toys, or a dataset folder
ids = "rqkmeans"          # which Semantic IDs (prepare.py --ids): rqkmeans (the CPU default) |
                          # rqvae (the paper's, Sec. 3.1) | lsh | random (Table 2)
out_dir = "out"           # the IDs are in out/<dataset>/<ids>/, this run goes to .../<ids>/<run>/
run = "tiger"             # name of this run's folder (letters, digits, . _ -)
overwrite = False         # start over in a run folder that holds an earlier run (else: an error)
resume = False            # continue the run in <run folder>/ckpt.pt
cold_start = 0.0          # > 0: the cold-start experiment (Sec. 4.3; paper 0.05): train without
                          # this share of the test targets (data.unseen_items), on the IDs
                          # prepare.py --cold_start built in out/<dataset>/<ids>-cold<share>/;
                          # eval.py --cold_start scores it
fit_with = ""             # e.g. "sports,toys": train on the IDs prepare.py --fit_with learnt
                          # together with those datasets' items (App. E, Table 10), in
                          # out/<dataset>/<ids>-with-<datasets>/
# the model (TIGERConfig)
n_layer = 2               # encoder layers and decoder layers (paper: 4 + 4)
n_head = 2                # paper: 6
head_dim = 32             # paper: 64 (attention works in 6 x 64 = 384 dims, wider than the model)
d_model = 64              # paper: 128
d_ff = 256                # paper: MLP 1024, ReLU
dropout = 0.0             # paper: 0.1, where T5 drops: embeddings, sublayer outputs, attention
                          # probabilities, MLP hidden units. Off here (results log: "no dropout")
softmax = "level"         # level: decoder position l scores only level l's codes (~256-way softmax)
                          # full: T5's softmax over the whole vocabulary (T5X, so the paper)
n_user_buckets = 2000     # paper: 2,000 hashed user tokens (Sec. 4)
user_token = False        # True: the encoder reads the user token first (Sec. 4, the paper's
                          # TIGER); False: the history alone, Table 8's ablation, better on
                          # validation here
# input dropout, training only (beyond the paper, which uses neither)
item_dropout = 0.15       # hide each history item (all its L tokens) with this probability
user_dropout = 0.0        # with user_token: hide the user token with this probability
# training
batch_size = 256          # paper: 256
by_length = True          # batches of similar history length (data.epoch_batches); paper: not said
optimizer = "adamw"       # adamw | adafactor (T5X, the paper's framework, uses Adafactor; torch's
                          # lacks T5X's parameter-scale step size)
lr = 0.003                # peak learning rate (paper: 0.01)
weight_decay = 0.1        # adamw only (decoupled)
warmup_steps = 300        # paper: 10k steps at constant lr, then inverse square root decay
schedule = "cosine"       # cosine (warmup, then cosine decay to 0 at max_steps) | rsqrt (paper's)
max_steps = 12000         # paper: 200k (Beauty, Sports), 100k (Toys)
grad_clip = 1.0           # clip the global gradient norm (paper: not said)
ema = 0.999               # > 0: validate, keep and test a moving average of the weights with this
                          # decay per step, not the weights themselves (0 = off; paper: none)
seed = 1337
# evaluation and model selection (validation split only; the test split is read once, at the end)
beam_size = 40            # beams kept, and the length of the returned ranking (paper: not said)
eval_every = 3000         # steps between validation evaluations (each decodes every validation
                          # user; with the cosine schedule and EMA the last one has so far always
                          # been best)
eval_users = 0            # validation users for model selection: 0 = all, n > 0 = a fixed random n
eval_batch_size = 512
patience = 3              # stop after this many evaluations without a better validation Recall@10
bench = False             # measure speed instead of training: train examples/s, eval users/s,
                          # memory
profile = False           # with bench: where the time goes (torch.profiler's top operations)
device = "auto"           # auto (cuda if available, else cpu) | cpu | cuda
precision = "auto"        # auto: bf16 autocast on a GPU and on a CPU with native bf16 (AVX512-BF16
                          # or AMX), else float32 | bf16 | fp32. T5X also computes in bf16.
# the run's settings start from these; the command line overrides
DEFAULTS = data.settings(globals())


# ----------------------------------------------------------------------------------------------
# 2. The model. T5 (the paper used T5X) is the reference: pre-norm residual blocks with RMSNorm, no
# biases, ReLU MLP, and no absolute position embeddings; instead each attention score gets a learned
# bias that depends on the (bucketed) distance between query and key, shared by all layers of a
# stack. Everything a TIGER needs to know about its shape is in its TIGERConfig, kept as
# model.config and saved in every checkpoint, so a checkpoint alone rebuilds its model.
# For decoding (chapter 3) each decoder layer keeps a cache {"self": {k, v}, "cross": {k, v}}: the
# keys/values of the tokens generated so far, and of the encoder output, computed once.

@dataclass
class TIGERConfig:
    vocab_size: int   # data.Tokenizer.vocab_size: PAD, BOS, every level's codes, the user tokens
    levels: list      # [(first token, number of codes)] per Semantic-ID level (Tokenizer.levels)
    n_layer: int      # encoder layers, and as many decoder layers
    n_head: int
    head_dim: int
    d_model: int
    d_ff: int
    dropout: float
    softmax: str      # "level" | "full" (TIGER.code_logprobs)

    def __post_init__(self):
        # levels as tuples of ints, also after a round trip through a checkpoint
        self.levels = [(int(first), int(n)) for first, n in self.levels]


# the run settings that are TIGERConfig fields (the other two come from the Semantic-ID tokenizer)
MODEL_KEYS = [f.name for f in fields(TIGERConfig) if f.name not in ("vocab_size", "levels")]


def model_config_for(tokenizer, settings):
    return TIGERConfig(tokenizer.vocab_size, tokenizer.levels,
                       **{k: settings[k] for k in MODEL_KEYS})


class RMSNorm(nn.Module):
    # T5's LayerNorm: scale only, no mean subtraction, no bias
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        # one expression, as it always was: computing the rsqrt first changes the rounding of
        # training runs (the 2026-12-05 results log entry)
        return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                             + self.eps).to(x.dtype)


class RelativePositionBias(nn.Module):
    """T5's relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
    with a Unified Text-to-Text Transformer", Sec. 2.1): one learned scalar per head and distance
    bucket, added to the attention scores. The decoder only looks back: its 32 buckets count
    distances into the past, the first half exactly (0..15), the second half log-spaced up to 128.
    The encoder looks both ways: keys before the query get buckets 0..15 and keys after it 16..31,
    each half again split into exact and log-spaced distances. Example (encoder): three keys back
    is bucket 3, three keys ahead is bucket 16 + 3."""

    def __init__(self, n_head, bidirectional, n_buckets=32, max_distance=128):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = n_buckets, max_distance
        self.bias = nn.Embedding(n_buckets, n_head)

    def bucket(self, rel):
        """rel: (Tq, Tk) long, key position - query position. Returns each pair's bucket (Tq, Tk):
        with n the buckets of one direction (n_buckets, or half of them in the encoder, where a key
        after the query adds n), a distance d below n/2 is its own bucket; beyond, n/2 +
        floor(log(d / (n/2)) / log(max_distance / (n/2)) * n/2), capped at n - 1. The decoder
        puts every future key (d < 0) in bucket 0; the causal mask hides them anyway."""
        n = self.n_buckets
        if self.bidirectional:
            n //= 2
            offset = (rel > 0).long() * n  # keys after the query get their own half of the buckets
            rel = rel.abs()
        else:
            offset = torch.zeros_like(rel)
            rel = (-rel).clamp(min=0)      # the decoder only sees the past
        exact = n // 2
        log_bucket = exact + (torch.log(rel.float().clamp(min=1) / exact)
                              / math.log(self.max_distance / exact) * (n - exact)).long()
        return offset + torch.where(rel < exact, rel, log_bucket.clamp(max=n - 1))

    def forward(self, q_len, k_len, q_start=0):
        device = self.bias.weight.device
        q = torch.arange(q_start, q_start + q_len, device=device)
        k = torch.arange(k_len, device=device)
        buckets = self.bucket(k[None, :] - q[:, None])                  # (Tq, Tk)
        return self.bias(buckets).permute(2, 0, 1).unsqueeze(0)         # (1, H, Tq, Tk)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        width = config.n_head * config.head_dim   # heads x head_dim, may differ from d_model (T5)
        self.q = nn.Linear(config.d_model, width, bias=False)
        self.k = nn.Linear(config.d_model, width, bias=False)
        self.v = nn.Linear(config.d_model, width, bias=False)
        self.o = nn.Linear(width, config.d_model, bias=False)
        self.attn_dropout = config.dropout       # on the attention probabilities, as T5

    def split(self, x):  # (B, T, H*hd) -> (B, H, T, hd)
        return x.view(x.shape[0], x.shape[1], self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x, source, bias, cache=None, cross=False):
        """x: (B, Tq, d) queries; source: (B, Tk, d) keys/values; bias: added to the scores,
        broadcast to (B, H, Tq, Tk), -inf where a key must not be seen. cache (decoding only): a
        dict holding this layer's keys/values; self-attention appends to it, cross-attention fills
        it once."""
        q = self.split(self.q(x))
        if cache is not None and cross and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.split(self.k(source)), self.split(self.v(source))
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        # > 1 only in beam search's cross-attention (B*n queries, B keys)
        beams = q.shape[0] // k.shape[0]
        if beams > 1:  # the n beams of a user share that user's encoder keys/values, so
            # their queries are stacked as n query positions of one row instead of copying the
            # keys/values n times: (B*n, H, Tq, hd) -> (B, H, n*Tq, hd)
            q = q.view(k.shape[0], beams, self.n_head, -1, self.head_dim)
            q = q.transpose(1, 2).flatten(2, 3)
        # softmax(q k^T / sqrt(head_dim) + bias) v, written out. At these sizes (short sequences,
        # narrow heads) the explicit form is also the faster one on a CPU: torch's fused
        # scaled_dot_product_attention has a slow backward pass when the bias needs a gradient,
        # and T5's learned position bias does (`python tiger.py --bench --profile` shows it)
        att = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5 + bias.to(q.dtype)  # (B, H, Tq, Tk)
        att = F.dropout(att.softmax(-1), self.attn_dropout, self.training)
        y = att @ v                                                                 # (B, H, Tq, hd)
        if beams > 1:  # (B, H, n*Tq, hd) -> (B*n, H, Tq, hd)
            y = y.view(k.shape[0], self.n_head, beams, -1, self.head_dim)
            y = y.transpose(1, 2).flatten(0, 1)
        return self.o(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    # one layer: self-attention, (decoder only) cross-attention to the encoder output, then the MLP;
    # each as x + dropout(sublayer(norm(x)))
    def __init__(self, config, cross):
        super().__init__()
        d = config.d_model
        self.norm_self, self.self_attn = RMSNorm(d), Attention(config)
        self.cross = cross
        if cross:
            self.norm_cross, self.cross_attn = RMSNorm(d), Attention(config)
        self.norm_mlp = RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.d_ff, bias=False), nn.ReLU(),
                                 nn.Dropout(config.dropout), nn.Linear(config.d_ff, d, bias=False))
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, self_bias, memory=None, cross_bias=None, cache=None):
        h = self.norm_self(x)
        x = x + self.resid_dropout(self.self_attn(h, h, self_bias, cache=cache and cache["self"]))
        if self.cross:
            x = x + self.resid_dropout(self.cross_attn(self.norm_cross(x), memory, cross_bias,
                                                       cache=cache and cache["cross"], cross=True))
        return x + self.resid_dropout(self.mlp(self.norm_mlp(x)))


class TIGER(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.d_model
        # one vocabulary for encoder and decoder (data.py)
        self.embed = nn.Embedding(config.vocab_size, d)
        self.enc_pos = RelativePositionBias(config.n_head, bidirectional=True)
        self.dec_pos = RelativePositionBias(config.n_head, bidirectional=False)
        self.encoder = nn.ModuleList([Block(config, cross=False) for _ in range(config.n_layer)])
        self.decoder = nn.ModuleList([Block(config, cross=True) for _ in range(config.n_layer)])
        self.enc_norm, self.dec_norm = RMSNorm(d), RMSNorm(d)
        # on the embeddings and the encoder output (T5)
        self.emb_dropout = nn.Dropout(config.dropout)
        # the output layer: a score per token
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        # initialisation: normal, std 0.02 for the two token tables, std d_model^-1/2 for every
        # other matrix
        for p in self.parameters():
            if p.dim() == 2:
                token_table = p is self.embed.weight or p is self.lm_head.weight
                nn.init.normal_(p, std=0.02 if token_table else d ** -0.5)

    def encode(self, enc):
        """enc: (B, T) tokens, PAD on the right. Returns memory (B, T, d) and the cross-attention
        bias (B, 1, 1, T): -inf at padding, so the decoder never reads it."""
        pad = enc == data.PAD
        cross_bias = torch.zeros(enc.shape, device=enc.device).masked_fill(pad, float("-inf"))
        cross_bias = cross_bias[:, None, None, :]
        bias = self.enc_pos(enc.shape[1], enc.shape[1]) + cross_bias  # (B, H, T, T) for every layer
        x = self.emb_dropout(self.embed(enc))
        for block in self.encoder:
            x = block(x, bias)
        return self.emb_dropout(self.enc_norm(x)), cross_bias

    def decode(self, dec_in, memory, cross_bias, caches=None, start=0):
        """dec_in: (B, Tq) decoder tokens at positions start..start+Tq-1. Returns the decoder's
        output states (B, Tq, d); code_logprobs() turns them into scores. With caches (one dict per
        layer) earlier positions come from the cache, so start > 0 needs only the new token:
        incremental decoding for beam search."""
        tq = dec_in.shape[1]
        bias = self.dec_pos(tq, start + tq, q_start=start)  # (1, H, Tq, Tk)
        if tq > 1:  # the causal mask: future keys get -inf (one new token with a cache needs none)
            future = torch.ones(tq, start + tq, dtype=torch.bool,
                                device=dec_in.device).triu(start + 1)
            bias = bias.masked_fill(future, float("-inf"))
        x = self.emb_dropout(self.embed(dec_in))
        for i, block in enumerate(self.decoder):
            x = block(x, bias, memory, cross_bias, cache=caches[i] if caches is not None else None)
        return self.dec_norm(x)

    def code_logprobs(self, h, level):
        """h: (..., d) decoder states at the position that generates level `level`. Returns the
        log-probabilities of that level's codes, (..., n_codes), in float32.
        Beam search never considers another level's tokens there (nor user tokens), so
        softmax="level" scores only this level's rows of the output layer: a softmax over the
        level's codes instead of the whole vocabulary, for a fraction of the output layer's work.
        softmax="full" is T5's softmax over the whole vocabulary, read at this level's tokens (the
        probabilities then sum to less than 1)."""
        first, n = self.config.levels[level]
        if self.config.softmax == "level":
            return F.log_softmax((h @ self.lm_head.weight[first:first + n].T).float(), dim=-1)
        return F.log_softmax(self.lm_head(h).float(), dim=-1)[..., first:first + n]

    def forward(self, enc, dec_in, target=None):
        """Teacher forcing. enc (B, T), dec_in (B, L) = [BOS, c_0 .. c_{L-2}], target (B, L) the
        tokens of the next item. Returns the decoder states (B, L, d) and the loss: the mean over
        the batch and the L levels of -log p(c_l | c_<l, user, history)."""
        h = self.decode(dec_in, *self.encode(enc))
        if target is None:
            return h, None
        losses = []
        for l, (first, _) in enumerate(self.config.levels):
            logp = self.code_logprobs(h[:, l], l)                          # (B, n_codes)
            losses.append(-logp.gather(1, (target[:, l] - first)[:, None])[:, 0])  # (B,)
        return h, torch.cat(losses).mean()


# ----------------------------------------------------------------------------------------------
# 3. Decoding (Sec. 3.2). The model factorises an item's probability over its L codes,
#     log p(item | user, history) = sum_l log p(c_l | c_<l, user, history),
# and beam search keeps the beam_size best prefixes level by level, so it returns items ranked by
# that sum. Constrained, it only extends a prefix with codes that lead to a real item: the prefix
# tables below answer that with a gather and a binary search per step. Constraining is beyond the
# paper, which decodes freely and drops the invalid IDs (Fig. 6), leaving prefix-constrained
# decoding to future work; `eval.py --constrained=False` decodes freely and counts them.

class PrefixTables:
    """Constrained decoding tables, built once from the (n_items, L) Semantic-ID table.

    Every distinct prefix of length l gets an id: its rank among them in sorted order (the empty
    prefix is 0). Per level l, two structures answer beam search's two questions:
      allowed[l][p, c]  (n_prefixes_l, size_l) bool: does code c extend prefix p to a prefix of a
                        real item? One gather per step gives every beam's mask of valid codes.
      keys[l]           (n_prefixes_{l+1},) sorted: p * size_l + c for every prefix of length l+1,
                        written as its parent p and last code c. Prefixes sorted by their codes
                        sort by (p, c) too, so a prefix's id is its position in keys[l]: child()
                        finds it by binary search (torch.searchsorted).
    Why not a dense next[l][p, c] table of child ids beside allowed: at the collision level p runs
    over ~n_items prefixes and c over the largest collision group, at 8 bytes a cell: gigabytes
    for a million items (results/scale_bench.py; the results log has its numbers). keys[l] takes
    8 bytes per prefix; allowed 1 byte per cell, at most n_items x collision_size at the collision
    level (packing 8 cells a byte, or lists of each prefix's codes, would shrink that further).
    items_of() follows child() down the levels to map a finished ID back to its item."""

    def __init__(self, tokenizer, device="cpu", items=None):
        # items: the item ids decoding may return (default all; cold start: the seen items only)
        items = np.arange(1, len(tokenizer.codes) + 1) if items is None else np.asarray(items)
        codes = tokenizer.codes[items - 1]
        self.sizes = tokenizer.level_sizes
        prefix = np.zeros(len(codes), dtype=np.int64)  # each item's length-0 prefix: the empty one
        self.allowed, self.keys = [], []
        for l, size in enumerate(self.sizes):
            allowed = np.zeros((prefix.max() + 1, size), dtype=bool)
            allowed[prefix, codes[:, l]] = True
            # each item's prefix of length l+1 as (parent, code); its rank among the distinct
            # ones is its id, so np.unique's sorted keys and inverse are keys[l] and the new ids
            keys, prefix = np.unique(prefix * size + codes[:, l], return_inverse=True)
            self.allowed.append(torch.from_numpy(allowed).to(device))
            self.keys.append(torch.from_numpy(keys).to(device))
        # a full-length prefix is one item's whole ID (IDs are unique): its id -> that item's id
        item_of_prefix = np.zeros(len(codes), dtype=np.int64)
        item_of_prefix[prefix] = items
        self.item_of_prefix = torch.from_numpy(item_of_prefix).to(device)

    def child(self, level, prefix, code):
        """The id of prefix + (code,) (same shapes), -1 where no item starts with it (or where
        prefix is -1)."""
        keys = self.keys[level]
        key = prefix * self.sizes[level] + code
        i = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)  # where key is, if present
        return torch.where(keys[i] == key, i, -1)

    def prefix_of(self, codes):
        """codes (..., l) -> the id of that length-l prefix (...), -1 if no item starts with it."""
        codes = codes.to(self.allowed[0].device)
        prefix = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for l in range(codes.shape[-1]):  # one level at a time; -1 (no such prefix) stays -1
            prefix = self.child(l, prefix, codes[..., l])
        return prefix

    def items_of(self, codes):
        """codes (..., L) -> item ids (...), 0 where the tuple is no item (an invalid ID)."""
        prefix = self.prefix_of(codes)
        return torch.where(prefix >= 0, self.item_of_prefix[prefix.clamp(min=0)],
                           torch.zeros_like(prefix))


def conditioned_gumbels(parent, g):
    """The top-down Gumbel trick of stochastic beam search (Kool et al. 2019, "Stochastic Beams and
    Where to Find Them", eq. 23 and App. B.3, in its stable form). parent: (B, n) the perturbed
    score of each prefix; g: (B, n, size) its children's own perturbed scores. Returns the
    children's scores conditioned on their maximum being the parent's: (B, n, size)."""
    z = g.max(-1, keepdim=True).values                              # (B, n, 1)
    # v = parent - g + log(1 - exp(g - z)); then -log(exp(-parent) - exp(-z) + exp(-g)), stably
    v = parent.unsqueeze(-1) - g + torch.log(-torch.expm1((g - z).clamp(max=0)))
    out = parent.unsqueeze(-1) - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))
    return torch.where(torch.isfinite(z) & torch.isfinite(g), out,
                       torch.full_like(out, float("-inf")))


@torch.no_grad()
def beam_search(model, enc, tables, beam_size, constrained=True, temperature=0.0, generator=None,
                n_levels=None):
    """enc: (B, T) encoder tokens. Returns (codes (B, beam, L) long, scores (B, beam)); scores are
    log p(item) (up to float rounding). At level l only level l's codes are candidates, and
    (constrained) only those that extend the beam's prefix to a prefix of some real item. A
    returned ID with score -inf is a filler (fewer valid IDs than beams). n_levels < L stops
    after that many levels: the best prefixes and their log p(prefix) (cold start, below).

    temperature = 0: beam search, best first. temperature T > 0: a sample of beam_size distinct
    items without replacement from q_T(item) = prod_l softmax(logits_l / T) (kept to valid IDs when
    constrained), in the order drawn, by stochastic beam search: every prefix carries a Gumbel-
    perturbed log q_T, and the beam keeps the largest (Gumbel-top-k over whole IDs, level by level).
    A larger T flattens q_T: more diverse recommendations (paper Sec. 4.3, Table 3). The paper says
    "temperature-based sampling" and no more; sampling without replacement is our choice, so
    that the K recommendations are K distinct items."""
    levels = model.config.levels
    L = len(levels) if n_levels is None else n_levels
    assert 1 <= L <= len(levels), f"n_levels must be 1..{len(levels)}"
    B, dev = enc.shape[0], enc.device
    memory, cross_bias = model.encode(enc)
    caches = [{"self": {}, "cross": {}} for _ in model.decoder]
    tokens = torch.full((B, 1), data.BOS, device=dev)        # the current last token of each beam
    prefix = torch.zeros(B, 1, dtype=torch.long, device=dev)  # prefix id of each beam (tables)
    scores = torch.zeros(B, 1, device=dev)                    # log p(prefix) of each beam
    logq_prefix = torch.zeros(B, 1, device=dev)               # sampling: log q_T(prefix) per beam
    perturbed = torch.zeros(B, 1, device=dev)                 # ... and its Gumbel-perturbed value
    codes = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)
    for level in range(L):
        n_beam = tokens.shape[1]
        h = model.decode(tokens.view(-1, 1), memory, cross_bias, caches, start=level)  # (B*n, 1, d)
        first, size = levels[level]
        logp = model.code_logprobs(h[:, 0], level).view(B, n_beam, size)  # log p(c_l | c_<l, ...)
        if constrained:
            logp = logp.masked_fill(~tables.allowed[level][prefix], float("-inf"))
        cand = scores.unsqueeze(-1) + logp                  # (B, n, size): running sum over levels
        key = cand                                          # what the beam keeps the largest of
        if temperature > 0:
            # log q_T of every child prefix (B, n, size): softmax(logits / T) over the allowed codes
            logq = logq_prefix.unsqueeze(-1) + torch.log_softmax(logp / temperature, -1)
            u = torch.rand(logq.shape, device=dev, generator=generator).clamp(min=1e-12)
            gumbel = logq - torch.log(-torch.log(u))        # each child's own perturbed log q_T ...
            key = conditioned_gumbels(perturbed, gumbel)    # ... conditioned on its parent's
            logq_prefix = logq.view(B, -1)
        k = min(beam_size, size * n_beam)
        top, flat = key.view(B, -1).topk(k, dim=1)          # (B, k)
        scores, perturbed = cand.view(B, -1).gather(1, flat), top
        if temperature > 0:
            logq_prefix = logq_prefix.gather(1, flat)
        parent, code = flat // size, flat % size
        codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, level)),
                           code[..., None]], -1)
        if constrained:  # (a filler beam reaches no prefix, -1; clamp keeps it a valid index)
            prefix = tables.child(level, prefix.gather(1, parent), code).clamp(min=0)
        tokens = code + first
        # keep each beam's cached keys/values: rows are (user, beam); pick the parents' rows
        # (the cross-attention cache stays one copy per user: Attention stacks the beams' queries)
        rows = (parent + torch.arange(B, device=dev)[:, None] * n_beam).view(-1)
        for cache in caches:
            cache["self"]["k"] = cache["self"]["k"][rows]
            cache["self"]["v"] = cache["self"]["v"][rows]
    if temperature > 0:  # a filler (score -inf) must not outrank a drawn item
        scores = torch.where(torch.isfinite(perturbed), scores,
                             torch.full_like(scores, float("-inf")))
    return codes, scores


def ranked_items(tables, codes, scores):
    """Beam search's output as a ranking: (B, beam) item ids, 0 for an invalid ID or a filler."""
    items = tables.items_of(codes)
    return torch.where(torch.isfinite(scores), items, torch.zeros_like(items))


# Cold start (Sec. 4.3, Fig. 5). A model trained without the unseen items (data.unseen_items) has
# never seen their last code, the collision token, but their first L-1 codes come from their
# content. The paper's rule: a predicted ID returns the seen item with that ID, and the unseen items
# whose first L-1 codes match join the candidates; epsilon is the largest share of unseen items in
# the top K. The paper decodes freely, so a predicted ID may start with an unseen item's prefix.
# Decoding constrained to the seen items' IDs would almost never do so (nearly every item is alone
# in its L-1 code prefix), so the unseen items get their own constrained search over the first L-1
# levels, kept to the prefixes of all items. Where the paper is silent, we define:
#   seen ranking    the usual constrained beam search over the seen items' IDs, by log p(item)
#   unseen ranking  the same beam search stopped after L-1 levels, over the prefixes of all items;
#                   each unseen item under a returned prefix scores log p(prefix)
#   the top K       both rankings merged by score (seen first on a tie); walking down the merge, a
#                   seen item is always taken, an unseen one only while fewer than floor(epsilon*K)
#                   are taken. epsilon = 0 gives the seen ranking, epsilon = 1 the plain merge.
# An unseen item's score lacks the factor p(c_L | ...) <= 1 of a seen one, which favours it: the
# cap is what keeps the unseen items from crowding out the seen ones.
# Cold start lives here, beside beam search, and not in eval.py: which IDs the model may return is
# decoding, the method of Sec. 4.3; eval.py only drives it (--cold_start) and measures it.

def unseen_table(tables, codes, unseen):
    """(n_prefixes, G) item ids: the unseen items under each (L-1)-code prefix, 0-padded (G = the
    most under one prefix). tables: PrefixTables over all items; codes: the (n_items, L) table."""
    L = codes.shape[1]
    unseen_codes = codes[np.asarray(unseen) - 1, :L - 1]
    prefix = tables.prefix_of(torch.from_numpy(unseen_codes)).cpu().numpy()  # (n_unseen,)
    order = np.argsort(prefix, kind="stable")
    p = prefix[order]
    start = np.searchsorted(p, p)                  # where each prefix's run starts
    rank = np.arange(len(p)) - start               # position inside its prefix
    n_prefixes = tables.allowed[L - 1].shape[0]
    table = np.zeros((n_prefixes, rank.max() + 1 if len(p) else 1), dtype=np.int64)
    table[p, rank] = np.asarray(unseen)[order]
    return torch.from_numpy(table).to(tables.allowed[0].device)


@torch.no_grad()
def unseen_candidates(model, enc, tables, table, beam_size):
    """The unseen ranking of a batch: (B, beam*G) item ids and scores log p(prefix) (-inf: none).
    tables: over all items (prefixes of unseen items too); table: unseen_table()."""
    codes, scores = beam_search(model, enc, tables, beam_size,
                                n_levels=len(model.config.levels) - 1)
    items = table[tables.prefix_of(codes).clamp(min=0)]                            # (B, beam, G)
    scores = scores.float().unsqueeze(-1).expand(items.shape)
    scores = torch.where((items > 0) & torch.isfinite(scores), scores,
                         torch.full_like(scores, float("-inf")))
    return items.flatten(1), scores.flatten(1)


def epsilon_top_k(seen, seen_scores, unseen, unseen_scores, k, epsilon):
    """The top k under the epsilon rule above. seen (B, n), unseen (B, m): item ids, with their
    scores (-inf: no item). Returns (B, k) item ids, best first, 0 where there are fewer than k."""
    cap = math.floor(epsilon * k + 1e-9)           # at most this many unseen items
    items = torch.cat([seen, unseen], 1)
    scores = torch.cat([seen_scores.float(), unseen_scores.float()], 1)
    is_unseen = torch.cat([torch.zeros_like(seen, dtype=torch.bool),
                           torch.ones_like(unseen, dtype=torch.bool)], 1)
    # the merge; seen first on a tie
    order = scores.sort(dim=1, descending=True, stable=True).indices
    items, scores, is_unseen = (items.gather(1, order), scores.gather(1, order),
                                is_unseen.gather(1, order))
    unseen_ahead = is_unseen.long().cumsum(1) - is_unseen.long()  # unseen items before this one,
    # taken or not: once the cap is reached, every later unseen item is refused anyway
    taken = torch.isfinite(scores) & (~is_unseen | (unseen_ahead < cap))
    position = taken.long().cumsum(1)                             # 1-based, among the taken
    row, col = (taken & (position <= k)).nonzero(as_tuple=True)
    top = torch.zeros(len(items), k, dtype=items.dtype, device=items.device)
    top[row, position[row, col] - 1] = items[row, col]
    return top


@torch.no_grad()
def evaluate(model, examples, tokenizer, user_tok, tables, beam_size, batch_size, device,
             constrained=True, limit=0, progress=True, autocast=contextlib.nullcontext,
             temperature=0.0, seed=0, category=None, return_items=False, drop_history=False):
    """Beam search (or, temperature > 0, seeded sampling) for every example of a split (validation
    or test), then eval.py's metrics (with category, the diversity ones too; return_items: also the
    rankings (N, beam) and the held-out items (N,), in evaluation order). limit > 0 uses a fixed
    random subset of `limit` examples for cheaper model selection (random: the users early in the
    file have longer histories than the average user); drop_history: each ranking without the
    user's history items (eval.without_history; not our protocol). Returns a dict."""
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    was_training = model.training
    model.eval()
    subset = np.arange(len(examples))
    if 0 < limit < len(examples):
        subset = np.sort(np.random.default_rng(0).choice(len(examples), limit, replace=False))
    # similar lengths: less padding
    order = subset[np.argsort(examples.length[subset], kind="stable")]
    starts = range(0, len(order), batch_size)
    rank, world = ddp_place()
    if world > 1:  # DDP: each process decodes its own run of the batches one process would decode,
        # so every user is decoded in the very same batch (same padding, same numbers)
        per_rank = math.ceil(len(starts) / world)
        starts = starts[rank * per_rank:(rank + 1) * per_rank]
    all_items, all_targets = [], []
    for start in tqdm(starts, desc="eval", leave=False, disable=not progress or rank > 0):
        rows = order[start:start + batch_size]
        batch = data.make_batch(examples, rows, tokenizer, user_tok)
        with autocast():
            codes, scores = beam_search(model, batch["enc"].to(device), tables, beam_size,
                                        constrained, temperature, generator)
        items = ranked_items(tables, codes, scores).cpu()                # (B, beam)
        if drop_history:
            items = evaluation.without_history(items, examples.history[rows])
        all_items.append(items)
        all_targets.append(batch["target_item"])
    if world > 1:  # DDP: every process gets every process's rankings, in rank order (which is one
        # process's order); a list of tensors per process, so a process may hold none
        parts = [None] * world
        dist.all_gather_object(parts, (all_items, all_targets))
        all_items = [t for items, _ in parts for t in items]
        all_targets = [t for _, targets in parts for t in targets]
    model.train(was_training)
    items, targets = torch.cat(all_items), torch.cat(all_targets)
    metrics = evaluation.metrics(items, targets, invalid=not constrained, category=category)
    return (metrics, items, targets) if return_items else metrics


# ----------------------------------------------------------------------------------------------
# 4. Training: teacher forcing on the L codes of each target item, model selection on validation,
# the test split read once at the end.

def drop_input_tokens(enc, id_length, item_dropout, user_dropout, user_token=True):
    """Input dropout (beyond the paper), training only. enc: (B, 1 + n*L) encoder tokens
    [user, item_1 codes, ..., item_n codes] ((B, n*L) without the user token). Each history item
    is replaced by PAD tokens with probability item_dropout, and the user token with probability
    user_dropout; attention already skips PAD keys, so the token simply vanishes from that example.
    One random number per item and per example, not per activation. An example always keeps one
    real token: an encoder with no key at all has nothing to attend to (a softmax over an empty
    set is NaN)."""
    B, T = enc.shape
    u = int(user_token)                                                 # user column first, or none
    n = (T - u) // id_length                                            # items per history
    hidden = torch.rand(B, n, device=enc.device) < item_dropout         # (B, n) a draw per item
    hidden = F.pad(hidden.repeat_interleave(id_length, dim=1), (u, 0))  # (B, T), user kept
    # the user token stays, so a key is always left (and no draw for it: runs without it keep
    # their random stream)
    if user_token and user_dropout == 0:
        return enc.masked_fill(hidden, data.PAD)
    keeps_history = ((enc != data.PAD) & ~hidden)[:, u:].any(1)         # (B,)
    if not user_token:  # the history is all there is: a row that would lose every item keeps them
        return enc.masked_fill(hidden & keeps_history[:, None], data.PAD)
    hidden[:, 0] = (torch.rand(B, device=enc.device) < user_dropout) & keeps_history
    return enc.masked_fill(hidden, data.PAD)


def get_lr(step, lr, warmup_steps, max_steps, schedule):
    """The learning rate at step (from 0)."""
    if schedule == "rsqrt":  # the paper: constant for warmup_steps, then lr * sqrt(warmup / step)
        return lr * min(1.0, math.sqrt(warmup_steps / max(step, 1)))
    if step < warmup_steps:  # cosine: linear warmup, then a cosine decay to 0 at max_steps
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, settings):
    if settings["optimizer"] == "adafactor":
        return torch.optim.Adafactor(model.parameters(), lr=settings["lr"])
    # AdamW with the Transformer's beta2 = 0.98 (Vaswani et al. 2017), and no weight decay on the
    # norms' scales (the only 1-d parameters)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings["lr"], betas=(0.9, 0.98))


@torch.no_grad()
def update_ema(ema_model, model, step, decay):
    """ema_model <- d * ema_model + (1 - d) * model, parameter by parameter, d = min(decay,
    (1 + step) / (10 + step)): the average spans roughly the last step / 9 steps (it never
    remembers the random initialisation for long) until d reaches `decay`."""
    d = min(decay, (1 + step) / (10 + step))
    for a, p in zip(ema_model.parameters(), model.parameters()):
        a.lerp_(p, 1 - d)


def train_step(model, opt, batch, step, settings, dev, autocast):
    """One teacher-forced step on one batch. Returns the batch's mean loss (a tensor; reading it
    syncs a GPU)."""
    s = settings
    for group in opt.param_groups:
        group["lr"] = get_lr(step, s["lr"], s["warmup_steps"], s["max_steps"], s["schedule"])
    enc, dec_in, target = batch["enc"].to(dev), batch["dec_in"].to(dev), batch["target"].to(dev)
    if s["item_dropout"] > 0 or s["user_dropout"] > 0:
        enc = drop_input_tokens(enc, target.shape[1], s["item_dropout"], s["user_dropout"],
                                s["user_token"])
    # DDP: each process holds the whole batch and its input dropout (drawn from the same random
    # stream on every process) and trains on its rows rank, rank + world, ... DDP averages the
    # processes' gradients with equal weights, so each process's mean loss is weighted by its
    # share of the batch: the average is then the gradient of the whole batch's mean loss, also
    # for an epoch's last, shorter batch (a process left without a row there takes one, weight 0).
    # (With --dropout > 0 each process drops units of its own rows: a run as random as one
    # process's, but not the same draw.)
    rank, world = ddp_place()
    if world > 1:
        rows = torch.arange(rank, len(enc), world, device=dev)
        share = len(rows) * world / len(enc)
        rows = rows if len(rows) else rows.new_zeros(1)
        enc, dec_in, target = enc[rows], dec_in[rows], target[rows]
    with autocast():
        _, loss = model(enc, dec_in, target)
    opt.zero_grad(set_to_none=True)
    if world > 1:
        loss = loss * share  # DDP
    loss.backward()           # DDP: the processes' gradients are averaged here, during backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
    opt.step()
    if world > 1:  # DDP: report the whole batch's mean loss, the same on every process
        loss = loss.detach()
        dist.all_reduce(loss)
        loss = loss / world
    return loss


def train(s, run_dir, argv=()):
    """The run: teacher-forced training, validation every eval_every steps with the best checkpoint
    kept (model selection on validation only), then the test split, read once, with that
    checkpoint. s: the run's settings (DEFAULTS overridden by the command line); run_dir: its
    folder, locked by main(). Returns the metrics written to run_dir/metrics.json. How a run folder
    is started, resumed or overwritten, and what a checkpoint holds, is Part II's business."""
    t0 = time.time()
    # DDP: under torchrun, each of its processes runs this function, with the same seed, data
    # order and weights. Rank 0 alone prints and touches the run folder; what it reads there (or
    # its refusal) reaches the others through from_rank0. One process is rank 0 of 1.
    rank, world = ddp_place()
    saved = from_rank0(lambda: open_run_folder(s, run_dir))  # a ckpt.pt to resume from, or None
    dev = data.pick_device(s["device"])
    provenance = data.provenance("tiger.py", list(argv), dev)  # the code as it is at the start
    if world > 1:
        provenance["processes"] = world  # DDP
    # the data: each item's Semantic ID (prepare.py), as tokens; the leave-one-out split (App. C)
    ds = data.load_dataset(s["dataset"])
    codes = data.load_codes(ds, s["ids"], s["out_dir"], s["dataset"], s["cold_start"],
                            s["fit_with"])
    unseen = data.unseen_items(ds, s["cold_start"])   # cold start: items no training example holds
    fingerprint = check_same_data(saved, ids_fingerprint(codes, ds, unseen), run_dir)
    tokenizer = data.Tokenizer(codes, s["n_user_buckets"])
    user_tok = tokenizer.user_tokens(ds.users) if s["user_token"] else None  # (n_users,) or None
    tables = PrefixTables(tokenizer, dev, np.flatnonzero(data.seen_items(ds, unseen)) + 1)
    train_ex, valid, test = data.split(ds, unseen)
    # the model and its optimizer
    torch.manual_seed(s["seed"])
    model = TIGER(model_config_for(tokenizer, s)).to(dev)
    opt = make_optimizer(model, s)
    autocast = make_autocast(dev, s["precision"])
    if rank == 0:  # DDP
        describe_run(s, ds, tokenizer, model, autocast, train_ex, valid, test, unseen)
    # eval_model is what is validated, kept as best.pt and tested: the moving average of the
    # weights when ema > 0 (the default), else the trained model itself
    eval_model = copy.deepcopy(model) if s["ema"] > 0 else model
    # DDP: the wrapper starts every process from rank 0's weights and averages the gradients in
    # each backward(), so every process takes the same optimizer step and the weights stay equal.
    # `model` stays the plain TIGER: averaged, validated and saved as in one process.
    trained = DDP(model) if world > 1 else model
    if s["bench"]:
        return benchmark(trained, opt, train_ex, valid, tokenizer, user_tok, tables, s, dev,
                         autocast)
    progress = restore(saved, model, eval_model, opt, s, dev)  # step 0, or where the run stopped
    # what every checkpoint carries (DDP: rank 0 writes the run's config.json)
    identity = from_rank0(lambda: start_writing(s, run_dir, model, codes, fingerprint))

    steps_per_epoch = math.ceil(len(train_ex) / s["batch_size"])
    model.train()
    bar = tqdm(range(progress["step"], s["max_steps"]), initial=progress["step"],
               total=s["max_steps"], desc="train", disable=rank > 0)  # DDP: rank 0's bar only
    n_seen, t_last, epoch_batches = 0, time.time(), (None, None)
    for step in bar:
        # the batches of an epoch are a function of (seed, epoch) alone: a resumed run sees the
        # very batches it would have seen
        epoch, i = divmod(step, steps_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, data.epoch_batches(train_ex, s["batch_size"],
                                                       [s["seed"], epoch], s["by_length"]))
        batch = data.make_batch(train_ex, epoch_batches[1][i], tokenizer, user_tok)
        loss = train_step(trained, opt, batch, step, s, dev, autocast)
        if s["ema"] > 0:
            update_ema(eval_model, model, step, s["ema"])
        n_seen += len(batch["target"])
        evaluate_now = (step + 1) % s["eval_every"] == 0 or step + 1 == s["max_steps"]
        if step % 20 == 0 or evaluate_now:   # stop before anything non-finite is saved
            stop_if_diverged(loss, model, step, progress, run_dir)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            ex_s=f"{n_seen / (time.time() - t_last):.0f}",
                            lr=f"{opt.param_groups[0]['lr']:.2e}")
        if not evaluate_now:
            continue
        # model selection: validation Recall@10 of the averaged weights; the test split untouched
        metrics = evaluate(eval_model, valid, tokenizer, user_tok, tables, s["beam_size"],
                           s["eval_batch_size"], dev, limit=s["eval_users"], autocast=autocast)
        improved = metrics["recall@10"] > progress["best"]
        progress.update(step=step + 1, best=max(progress["best"], metrics["recall@10"]),
                        bad_evals=0 if improved else progress["bad_evals"] + 1,
                        log=progress["log"] + [{"step": step + 1, "loss": loss.item(), **metrics}])
        if rank == 0:  # DDP: every process holds the same metrics; rank 0 says and saves them
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}, valid recall@10 "
                       f"{metrics['recall@10']:.4f} ndcg@10 {metrics['ndcg@10']:.4f}"
                       + " (best)" * improved)
            save_checkpoints(run_dir, identity, model, eval_model, opt, progress, improved, t0,
                             dev)
        n_seen, t_last = 0, time.time()
        if progress["bad_evals"] >= s["patience"]:
            if rank == 0:  # DDP
                tqdm.write(f"early stop: no better validation recall@10 in {s['patience']} "
                           f"evaluations")
            break
    bar.close()

    # The test split is read exactly once, with the checkpoint that was best on validation.
    best = from_rank0(lambda: load_checkpoint(os.path.join(run_dir, "best.pt")))  # DDP: rank 0's
    model.load_state_dict(best["model"])
    results = {"best_step": best["step"], "n_params": sum(p.numel() for p in model.parameters())}
    for name, examples in (("valid", valid), ("test", test)):
        results[name] = evaluate(model, examples, tokenizer, user_tok, tables, s["beam_size"],
                                 s["eval_batch_size"], dev, autocast=autocast)
        results[name + "_most_popular"] = evaluation.most_popular(ds, examples, unseen)
    results.update(wall_s=round(progress["wall_s"] + time.time() - t0, 1), provenance=provenance,
                   ids_fingerprint=fingerprint, log=progress["log"])
    if rank == 0:  # DDP
        finish_run(run_dir, results, ds.name, s["ids"])
    return results


# ==============================================================================================
# Part II. The workshop: what real use needs around the method. Settings checked at the door, the
# precision, the run folder (start, resume, overwrite), checkpoints that carry their Semantic IDs,
# the speed benchmark, and the command line. Nothing here changes what the method computes.

RANGES = {  # what validate_settings accepts; beam_size >= 10 because the metrics go up to K = 10
    **{k: "[1, inf)" for k in ("n_layer", "n_head", "head_dim", "d_model", "d_ff", "n_user_buckets",
                               "batch_size", "max_steps", "eval_every", "eval_batch_size",
                               "patience")},
    **{k: "[0, 1)" for k in ("dropout", "item_dropout", "user_dropout", "ema")},
    **{k: "[0, inf)" for k in ("warmup_steps", "eval_users", "seed")},
    "cold_start": "[0, 0.5]", "beam_size": "[10, inf)", "lr": "(0, 1]", "weight_decay": "[0, 1]",
    "grad_clip": "(0, inf)", "ids": data.ID_SCHEMES, "softmax": ("level", "full"),
    "optimizer": ("adamw", "adafactor"), "schedule": ("cosine", "rsqrt"),
    "device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp32"),
}
# settings that say where a run lives or how fast it is scored, not what it trains: --resume may
# change them
BOOKKEEPING = ("resume", "overwrite", "out_dir", "run", "device", "eval_batch_size", "bench",
               "profile")


def validate_settings(settings):
    """Every setting checked at the door (RANGES, and the rules that tie settings together)."""
    data.check_settings(settings, RANGES)
    if settings["schedule"] == "rsqrt" and settings["warmup_steps"] < 1:
        raise data.InputError("bad config: warmup_steps must be >= 1 with schedule=rsqrt")
    data.check_run_name(settings["run"])
    if settings["user_dropout"] > 0 and not settings["user_token"]:
        raise data.InputError("bad config: user_dropout hides the user token, but user_token=False "
                              "leaves it out altogether; set --user_dropout=0")
    if settings["resume"] and settings["overwrite"]:
        raise data.InputError("bad config: --resume continues a run and --overwrite starts it "
                              "over; give one of them")
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise data.InputError("device=cuda but no CUDA GPU is visible; use --device=cpu or auto")
    settings["fit_with"] = ",".join(data.fit_with_names(settings["fit_with"]))  # one spelling


def make_autocast(dev, precision):
    """The context every forward pass runs in: bf16 autocast (matrix products in bfloat16; norms,
    softmaxes and the loss in float32) or nothing (float32). precision=auto takes bf16 where the
    hardware has it: a GPU, or a CPU with AVX512-BF16 / AMX. Other CPUs emulate bf16, slower than
    float32. Returns a function that opens the context: `with autocast(): ...`."""
    # torch's CPU feature probes are private (torch.cpu._is_*); a build without them counts as "no"
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                           "_is_amx_tile_supported")]
    cpu_bf16 = any(probe is not None and probe() for probe in probes)
    if precision == "bf16" or (precision == "auto" and (dev == "cuda" or cpu_bf16)):
        return lambda: torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ---- the run folder: start, resume, overwrite ---------------------------------------------------

def run_paths(run_dir):
    return {name: os.path.join(run_dir, name + ext) for name, ext in
            (("ckpt", ".pt"), ("best", ".pt"), ("metrics", ".json"), ("config", ".json"))}


def open_run_folder(s, run_dir):
    """The rules of a run folder, checked before any work: --resume needs a ckpt.pt trained with
    the same settings (returned, loaded); without it, a folder holding an earlier run is refused
    unless --overwrite (which removes it only once everything else has loaded: start_writing)."""
    paths = run_paths(run_dir)
    earlier = [p for key, p in paths.items() if key != "config" and os.path.exists(p)]
    if not s["resume"]:
        if earlier and not s["bench"] and not s["overwrite"]:
            names = ", ".join(os.path.basename(p) for p in earlier)
            raise data.InputError(f"{run_dir} holds an earlier run ({names}); continue it with "
                                  f"--resume, start it over with --overwrite, or name a new run "
                                  f"with --run=NAME")
        return None
    if not os.path.isfile(paths["ckpt"]):
        raise data.InputError(f"--resume: there is no {paths['ckpt']} to continue; start without "
                              f"--resume")
    ckpt = load_checkpoint(paths["ckpt"], for_resume=True)
    saved = ckpt["settings"]
    newer = [k for k in s if k not in BOOKKEEPING and k not in saved]
    if newer:
        raise data.InputError(f"--resume: {paths['ckpt']} was written before the option(s) "
                              f"{', '.join(newer)} existed, so it cannot be resumed; start afresh "
                              f"(eval.py can still score its best.pt)")
    same = {"dataset": data.dataset_name}   # 'beauty' and 'data/beauty/' are one dataset (the
    # data itself is compared by its fingerprint: check_same_data)
    changed = [k for k in s if k not in BOOKKEEPING
               and same.get(k, lambda v: v)(saved[k]) != same.get(k, lambda v: v)(s[k])]
    if changed:
        diff = ", ".join(f"{k}: {saved[k]!r} there, {s[k]!r} now" for k in changed)
        raise data.InputError(f"--resume: {paths['ckpt']} was trained with other settings "
                              f"({diff}); resume with the same settings, or start afresh")
    return ckpt


def check_same_data(saved, fingerprint, run_dir):
    """A resumed run must go on with the very Semantic IDs and data it started with."""
    if saved is not None and saved["ids_fingerprint"] != fingerprint:
        raise data.InputError(f"--resume: the Semantic IDs or data of this run changed after it "
                              f"started (prepare.py rebuilt {os.path.dirname(run_dir)}, or the "
                              f"dataset changed); it cannot go on with them. Score it with `python "
                              f"eval.py --ckpt={run_paths(run_dir)['best']}` (it keeps its own "
                              f"IDs), or start a new run")
    return fingerprint


def describe_run(s, ds, tokenizer, model, autocast, train_ex, valid, test, unseen):
    n_params = sum(p.numel() for p in model.parameters())
    print(f"TIGER on {ds.name} ({s['ids']} IDs of length {tokenizer.id_length}, vocab "
          f"{tokenizer.vocab_size}): {n_params / 1e6:.2f}M parameters, device "
          f"{next(model.parameters()).device.type}, "
          f"{'float32' if autocast is contextlib.nullcontext else 'bf16 autocast'}")
    print(f"examples: {len(train_ex):,} train, {len(valid):,} valid, {len(test):,} test")
    if len(unseen):
        print(f"cold start: {len(unseen)} unseen items, in no training example; validation and "
              f"test decode the seen items only (eval.py --cold_start adds the unseen ones)")


def restore(saved, model, eval_model, opt, s, dev):
    """The training state to start from: step 0, or the saved one of a resumed run (weights,
    optimizer, weight average, random state). Returns the progress dict that ckpt.pt keeps."""
    progress = {"step": 0, "best": -1.0, "bad_evals": 0, "log": [], "wall_s": 0.0}
    if saved is None:
        return progress
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    if s["ema"] > 0:
        eval_model.load_state_dict(saved["ema_model"])
    progress.update({k: saved[k] for k in ("step", "best", "bad_evals", "log")},
                    wall_s=saved.get("wall_s", 0.0))
    torch.set_rng_state(saved["rng"])
    if saved.get("cuda_rng") is not None and dev == "cuda":
        # cuda:0's draws (DDP: rank 0's, which every process continues on its own GPU)
        torch.cuda.set_rng_state(saved["cuda_rng"][0])
    if progress["bad_evals"] >= s["patience"]:  # it had stopped early: nothing left to train
        progress["step"] = s["max_steps"]
    if ddp_place()[0] == 0:  # DDP: rank 0 speaks
        print(f"resumed at step {progress['step']}")
    return progress


def start_writing(s, run_dir, model, codes, fingerprint):
    """Everything has loaded: only now is an --overwrite'n run removed, and config.json written.
    Returns what every checkpoint carries: enough to rebuild and score the model with nothing
    else (its config, the run's settings, the Semantic-ID table, the data's fingerprint)."""
    paths = run_paths(run_dir)
    if s["overwrite"]:
        for p in paths.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
    data.write_json(paths["config"], s)
    return {"model_config": asdict(model.config), "settings": s,
            "codes": torch.from_numpy(codes), "ids_fingerprint": fingerprint}


def stop_if_diverged(loss, model, step, progress, run_dir):
    """A non-finite loss or weight stops the run with the last good checkpoint kept."""
    if math.isfinite(loss.item()) and all(torch.isfinite(p).all() for p in model.parameters()):
        return
    kept = (f"{run_paths(run_dir)['ckpt']} keeps the state of step {progress['log'][-1]['step']}"
            if progress["log"] else "nothing was saved")
    raise data.InputError(f"the training loss became {loss.item()} at step {step + 1} (or the "
                          f"weights stopped being finite); the run stops here and {kept}. Lower "
                          f"--lr or --grad_clip and start over with --overwrite")


def save_checkpoints(run_dir, identity, model, eval_model, opt, progress, improved, t0, dev):
    """best.pt: the validated weights, when they improved; ckpt.pt: the whole training state."""
    paths = run_paths(run_dir)
    if improved:
        save_checkpoint(paths["best"], {**identity, "model": eval_model.state_dict(),
                                        "step": progress["step"]})
    save_checkpoint(paths["ckpt"], {
        **identity, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "ema_model": eval_model.state_dict() if eval_model is not model else None,
        **{k: progress[k] for k in ("step", "best", "bad_evals", "log")},
        "wall_s": progress["wall_s"] + time.time() - t0, "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if dev == "cuda" else None})


def finish_run(run_dir, results, name, ids):
    path = run_paths(run_dir)["metrics"]
    data.write_json(path, results)
    evaluation.print_table(results, name, ids)
    print(f"wall time {results['wall_s'] / 60:.1f} min; best checkpoint "
          f"{run_paths(run_dir)['best']} (step {results['best_step']}); metrics {path}")


# ---- checkpoints: the weights, the configs, and the Semantic-ID table they were trained on -----

def save_checkpoint(path, obj):
    data.write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, for_resume=False):
    """A checkpoint written by train(), loaded without unpickling arbitrary objects: best.pt or
    ckpt.pt to score; for_resume, a ckpt.pt with the training state too."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        if os.path.isfile(os.path.join(folder, "ckpt.pt")):  # a run that has not validated yet
            raise data.InputError(f"checkpoint {path} not found: best.pt appears at the run's "
                                  f"first validation; score {os.path.join(folder, 'ckpt.pt')} "
                                  f"meanwhile")
        raise data.InputError(f"checkpoint {path} not found; train one with `python tiger.py` "
                              f"(it writes out/<dataset>/<ids>/<run>/best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        with open(path, "rb") as f:   # torch.save writes a zip archive; a bare pickle starts \x80
            pickle_stream = f.read(1) == b"\x80"
        named = re.search(r"GLOBAL (\S+)", str(e))   # the Python object the safe loader met
        if pickle_stream or named:   # unpickling it would run code: never done here
            raise data.InputError(f"refused to load {path}: it holds Python objects, not only "
                                  f"tensors and plain values, and unpickling it would run code"
                                  f"{f' ({named.group(1)})' if named else ''}; only checkpoints "
                                  f"written by tiger.py load") from None
        raise data.InputError(f"checkpoint {path} is corrupt or not a nanoTIGER checkpoint "
                              f"({type(e).__name__}); delete it and train again") from None
    if not isinstance(ckpt, dict) or not {"model", "step"} <= set(ckpt):
        raise data.InputError(f"{path} is not a checkpoint written by tiger.py")
    needed = {"model_config", "settings", "codes", "ids_fingerprint"}
    if not needed <= set(ckpt):
        raise data.InputError(f"{path} was written by an older tiger.py (it lacks "
                              f"{', '.join(sorted(needed - set(ckpt)))}); train it again")
    if for_resume:
        missing = {"optimizer", "ema_model", "best", "bad_evals", "log", "rng"} - set(ckpt)
        if missing:
            raise data.InputError(f"{path} is not a training checkpoint (ckpt.pt) to resume; it "
                                  f"lacks {', '.join(sorted(missing))}")
    return ckpt


def model_from_checkpoint(ckpt, dev="cpu"):
    """Rebuild the model a checkpoint scores with, from the checkpoint alone: its own TIGERConfig,
    the weights that were validated (the moving average in a ckpt.pt that keeps one), and the
    tokenizer of the Semantic IDs it was trained on. Returns (model, tokenizer, run settings)."""
    try:
        settings = {**DEFAULTS, **ckpt["settings"]}
        validate_settings({**settings, "device": "auto", "resume": False})
        tokenizer = data.Tokenizer(ckpt["codes"].numpy(), settings["n_user_buckets"])
        model_config = TIGERConfig(**ckpt["model_config"])
        if model_config != model_config_for(tokenizer, settings):
            raise data.InputError("its model config disagrees with its settings and Semantic IDs")
        if not {"codes_md5", "item_emb_md5", "sequences_md5"} <= set(ckpt["ids_fingerprint"]):
            raise data.InputError("its ids_fingerprint is incomplete")
        model = TIGER(model_config).to(dev)
        model.load_state_dict(ckpt["ema_model"] if ckpt.get("ema_model") is not None
                              else ckpt["model"])
    except (data.InputError, TypeError, KeyError, AttributeError, ValueError, RuntimeError) as e:
        raise data.InputError(f"the checkpoint's contents are inconsistent (hand-edited?): "
                              f"{str(e)[:300]}") from None
    return model, tokenizer, settings


def ids_fingerprint(codes, ds, unseen=()):
    """What a run's Semantic IDs and data are, as checksums: the ID table, the item embeddings it
    was built from, the users' sequences, and (cold start) the unseen items."""
    return {"codes_md5": data.md5(codes), "item_emb_md5": data.md5(ds.item_emb),
            "sequences_md5": data.md5(np.concatenate(ds.sequences)),
            **({"unseen_md5": data.md5(np.asarray(unseen))} if len(unseen) else {})}


# ---- data-parallel training: torchrun --------------------------------------------------------
# `torchrun --standalone --nproc_per_node=N tiger.py [config] [--flags]` starts N copies of this
# script and tells each its place in environment variables: RANK (0..WORLD_SIZE-1), WORLD_SIZE,
# LOCAL_RANK (its GPU on its machine), and where to meet (MASTER_ADDR, MASTER_PORT). They join one
# process group (NCCL between GPUs, gloo between CPU processes) and run the same program; the
# lines marked "DDP:" in Part I are what differs. `python tiger.py` sets none of these: one
# process, rank 0 of 1, and those lines do nothing.

def ddp_setup(settings):
    """Join the process group that torchrun started this process into (nothing for `python
    tiger.py`); refuses, on every process alike, a batch that the processes cannot share evenly."""
    if "RANK" not in os.environ:
        return
    world = int(os.environ["WORLD_SIZE"])
    if settings["batch_size"] % world:
        raise data.InputError(f"batch_size={settings['batch_size']} cannot be shared evenly by "
                              f"the {world} processes torchrun started; give a batch_size "
                              f"divisible by {world}, or another number of processes")
    dev = data.pick_device(settings["device"])
    if dev == "cuda":  # one GPU per process: from here on "cuda" is this process's own
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    try:
        dist.init_process_group("nccl" if dev == "cuda" else "gloo")
    except (ValueError, RuntimeError) as e:  # e.g. RANK set by hand, without the rendezvous
        raise data.InputError(f"the processes could not meet ({str(e)[:200]}); start them with "
                              f"torchrun (tiger.py then has RANK, WORLD_SIZE, MASTER_ADDR and "
                              f"MASTER_PORT), or unset RANK for one process") from None


def ddp_place():
    """(this process's rank, the number of processes): (0, 1) for `python tiger.py`."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(read):
    """read() on rank 0 alone, the one process that touches the run folder (its lock, its
    refusals, its checkpoints); every process gets the result, or rank 0's refusal as an
    InputError, so that all stop together and only rank 0 says why (the `__main__` block).
    One process: read()."""
    rank, world = ddp_place()
    if world == 1:
        return read()
    box = [None]
    if rank == 0:
        try:
            box = [(read(), None)]
        except data.InputError as e:
            box = [(None, str(e))]
    dist.broadcast_object_list(box, src=0)
    result, refusal = box[0]
    if refusal is not None:
        raise data.InputError(refusal)
    return result


def ddp_teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- speed, and the command line -------------------------------------------------------------

def benchmark(model, opt, train_ex, valid, tokenizer, user_tok, tables, settings, dev, autocast,
              steps=30, users=2048):
    """`python tiger.py --bench`: speed of the configured model on this machine (nothing is
    saved)."""
    s = settings

    # --profile: the operations that took the most time, printed after the block
    def profiled(what):
        if not s["profile"]:
            return contextlib.nullcontext()
        prof = torch.profiler.profile(on_trace_ready=lambda p: print(
            f"\n{what}: where the time goes\n"
            + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)))
        return prof

    batches = data.epoch_batches(train_ex, s["batch_size"], s["seed"], s["by_length"])
    for i in range(3):  # warm up (first calls allocate), then measure
        batch = data.make_batch(train_ex, batches[i], tokenizer, user_tok)
        train_step(model, opt, batch, i, s, dev, autocast)
    t = time.time()
    with profiled(f"{steps} training steps"):
        for i in range(steps):
            batch = data.make_batch(train_ex, batches[(i + 3) % len(batches)], tokenizer, user_tok)
            train_step(model, opt, batch, i, s, dev, autocast)
    train_speed = steps * s["batch_size"] / (time.time() - t)
    users = min(users, len(valid))
    t = time.time()
    with profiled(f"evaluating {users} users"):
        # DDP: model is the wrapper, which trains; the TIGER inside it decodes
        evaluate(getattr(model, "module", model), valid, tokenizer, user_tok, tables,
                 s["beam_size"], s["eval_batch_size"], dev, limit=users, progress=False,
                 autocast=autocast)
    eval_speed = users / (time.time() - t)
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        try:
            import resource  # standard library, Unix only: peak resident memory (KiB on Linux)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
        except ImportError:  # Windows
            peak = float("nan")
    rank, world = ddp_place()
    if rank == 0:  # under torchrun: all processes together, and rank 0's memory
        print(f"train {train_speed:,.0f} examples/s (batch {s['batch_size']}, "
              f"by_length={s['by_length']}); eval {eval_speed:,.0f} users/s (beam "
              f"{s['beam_size']}); peak memory {peak:.2f} GiB "
              f"({'GPU' if dev == 'cuda' else 'process RSS'}{', rank 0' * (world > 1)})")
    return {"train_examples_s": train_speed, "eval_users_s": eval_speed, "peak_gib": peak}


def main(argv):
    """`python tiger.py [config file] [--key=value ...]`: train, select on validation, test once."""
    settings = data.configure(DEFAULTS, argv)
    validate_settings(settings)
    ids_dir = data.ids_folder(settings["out_dir"], data.dataset_name(settings["dataset"]),
                              settings["ids"], settings["cold_start"], settings["fit_with"])
    run_dir = os.path.join(ids_dir, settings["run"])
    ddp_setup(settings)  # under torchrun: join the other processes
    try:
        with contextlib.ExitStack() as held:
            if not settings["bench"]:  # --bench measures only, writes nothing
                # one live run per folder: rank 0, the one that writes, holds its lock
                from_rank0(lambda: held.enter_context(data.folder_lock(run_dir)))
            return train(settings, run_dir, argv)
    finally:
        ddp_teardown()


if __name__ == "__main__":
    speaks = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 says why it stops
    try:
        main(sys.argv[1:])
    except data.InputError as e:
        sys.exit(f"error: {e}" if speaks else 1)
    except KeyboardInterrupt:  # Ctrl-C: nothing is half-written (every file is written atomically)
        if speaks:
            print("\ninterrupted: the run folder's ckpt.pt holds the state of its last validation; "
                  "continue with the same command and --resume", file=sys.stderr)
        sys.exit(130)
