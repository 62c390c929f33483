"""
tiger.py -- the generative retriever of TIGER (paper Sec. 3.2 and 4), trained and evaluated.

A sequence-to-sequence transformer reads a user token and the Semantic IDs of the user's last 20 items
and generates the Semantic ID of the next item, one code at a time. Beam search over the codes, kept to
valid IDs, gives a ranked list of items. This file holds, in reading order:

  1. config (plain globals; `python tiger.py config/tiger_paper.py --lr=0.003` overrides them)
  2. the model, written by hand in T5's manner: RMSNorm, relative position bias, attention, ReLU MLP,
     encoder and decoder layers, the output head
  3. beam search with a KV cache, constrained to valid Semantic IDs by prefix tables
  4. training with teacher forcing, validation-only model selection, early stopping, resumable
     checkpoints, and a final test evaluation of the best checkpoint

Run `python prepare.py && python tiger.py`.
"""
import contextlib
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import prepare  # prepare.py writes (and validates) the Semantic IDs; its atomic writer is reused here
import eval as evaluation  # eval.py: metrics and the evaluation loop ("eval" would shadow the builtin)

# ----------------------------------------------------------------------------------------------
# 1. Config. Paper values (Sec. 4, "Sequence to Sequence Model Training") in the comments; the defaults
# are the CPU setting measured in the README (about 14-16 min on 2 cores); config/tiger_paper.py is the paper's.
dataset = "beauty"        # beauty | sports | toys
ids = "rqvae"             # which Semantic IDs (prepare.py --ids): rqvae | lsh | random | rqkmeans
out_dir = "out"           # prepare.py wrote out/<dataset>/<ids>/codes.npy; we write out/<dataset>/<ids>/<run>/
run = "tiger"             # name of this run's folder
# model
n_layer = 2               # encoder layers and decoder layers (paper: 4 + 4)
n_head = 2                # paper: 6
head_dim = 32             # paper: 64 (so attention works in 6 x 64 = 384 dims, wider than the model)
d_model = 64              # paper: 128
d_ff = 256                # paper: MLP 1024, ReLU
dropout = 0.0             # paper: 0.1, on the embeddings and each sublayer's output as in T5. Off here: on a
                          # CPU it doubles a step and did not pay off within the budget (README)
inner_dropout = True      # dropout also on attention probabilities and MLP hidden units, as T5 does; False
                          # keeps the cheap part (these two are 3/4 of the elements dropout draws for)
item_dropout = 0.15       # training only: hide each history item (all its L tokens) with this probability, a
                          # cheap input-level regulariser (one random number per item); paper: none (README)
user_dropout = 0.5        # training only: hide the user token with this probability (paper: none). 2,000 hashed
                          # buckets seem to let the small model memorise users' training sequences; half the
                          # time it must predict from the history alone (validation R@10 0.0704 vs 0.0638, README)
tie_embeddings = False    # output layer = input embedding table (T5 v1.0 does this; T5 v1.1, T5X's default, not)
head = "level"            # level: the decoder's position l scores only level l's codes (a softmax over ~256)
                          # full: T5's softmax over the whole vocabulary (T5X, so the paper); see README
n_user_buckets = 2000     # paper: 2,000 hashed user tokens
# training
batch_size = 256          # paper: 256
by_length = True          # batches of similar history length (data.epoch_batches); paper: not said
optimizer = "adamw"       # adamw | adafactor (T5X, the paper's framework, uses Adafactor)
lr = 0.003                # peak learning rate (paper: 0.01)
weight_decay = 0.1        # adamw only (decoupled); 0.1 beat 0.01, 0.2 and 0.3 here (README)
warmup_steps = 300        # paper: 10k steps at constant lr, then inverse square root decay
schedule = "cosine"       # cosine (warmup, then cosine decay to 0 at max_steps) | rsqrt (the paper's)
max_steps = 12000         # paper: 200k
grad_clip = 1.0
label_smoothing = 0.0     # share of each level's target mass spread evenly over its codes (paper: none)
ema = 0.999               # > 0: validate, keep and test an exponential moving average of the weights with
                          # this decay per step instead of the weights themselves (0 = off; paper: none). The
                          # decay ramps up (update_ema) and reaches 0.999 only at step ~9,000, where the average
                          # spans ~1,000 steps: better validation early on and a little at the end (README)
seed = 1337
# evaluation and model selection (validation split only; the test split is read once, at the end)
beam_size = 40            # beams kept; also the length of the returned ranking (K <= beam_size). The paper
                          # does not say; on validation Recall@10, 40 beat 20 and came within 0.0002 of 80 (README)
eval_every = 1000         # steps between validation evaluations
eval_users = 0            # validation users for model selection in training: 0 = all of them, n > 0 = a fixed
                          # random subset of n (cheaper, but noisier: a subset of 5,000 has a standard error ~2x)
eval_batch_size = 512
patience = 3              # stop after this many evaluations without a better validation Recall@10
resume = False            # continue from <run folder>/ckpt.pt
bench = False             # measure speed instead of training: train examples/s, eval users/s, peak memory
device = "auto"           # auto (cuda if available, else cpu) | cpu | cuda
precision = "auto"        # auto: bf16 autocast on a GPU, and on a CPU with native bf16 (AVX512-BF16 or AMX),
                          # else float32 | bf16 | fp32. T5X also computes in bf16.
CONFIG_KEYS = [k for k in list(globals()) if not k.startswith("_") and k.islower()
               and isinstance(globals()[k], (int, float, str, bool))]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}  # main() starts from these, whatever ran before


# ----------------------------------------------------------------------------------------------
# 2. The model. T5 (the paper used T5X) is the reference: pre-norm residual blocks with RMSNorm, no
# biases, ReLU MLP, and no absolute position embeddings; instead each attention score gets a learned
# bias that depends on the (bucketed) distance between query and key, shared by all layers of a stack.

class RMSNorm(nn.Module):
    # T5's LayerNorm: scale only, no mean subtraction, no bias
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype)


class RelativePositionBias(nn.Module):
    # T5's relative position bias: distances are put into 32 buckets, half exact (small distances) and
    # half log-spaced up to 128; the encoder looks both ways, the decoder only back.
    def __init__(self, n_head, bidirectional, n_buckets=32, max_distance=128):
        super().__init__()
        self.bidirectional, self.n_buckets, self.max_distance = bidirectional, n_buckets, max_distance
        self.bias = nn.Embedding(n_buckets, n_head)

    def bucket(self, rel):  # rel = key position - query position, (Tq, Tk) long
        n = self.n_buckets
        if self.bidirectional:
            n //= 2
            offset = (rel > 0).long() * n     # keys after the query get their own half of the buckets
            rel = rel.abs()
        else:
            offset = torch.zeros_like(rel)
            rel = (-rel).clamp(min=0)         # the decoder only sees the past
        exact = n // 2
        log_bucket = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                              * (n - exact)).long()
        return offset + torch.where(rel < exact, rel, log_bucket.clamp(max=n - 1))

    def forward(self, q_len, k_len, q_start=0):
        device = self.bias.weight.device
        q = torch.arange(q_start, q_start + q_len, device=device)
        k = torch.arange(k_len, device=device)
        return self.bias(self.bucket(k[None, :] - q[:, None])).permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)


class Attention(nn.Module):
    def __init__(self, drop):
        super().__init__()
        inner = n_head * head_dim
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.drop = drop  # dropout on the attention probabilities

    def split(self, x):  # (B, T, H*hd) -> (B, H, T, hd)
        return x.view(x.shape[0], x.shape[1], n_head, head_dim).transpose(1, 2)

    def forward(self, x, source, bias, cache=None, static=False):
        """x: (B, Tq, d) queries; source: (B, Tk, d) keys/values; bias: added to the scores, broadcast to
        (B, H, Tq, Tk), -inf where a key must not be seen. cache (decoding only): a dict holding this
        layer's keys/values; self-attention appends to it, cross-attention (static) computes it once."""
        q = self.split(self.q(x))
        if cache is not None and static and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.split(self.k(source)), self.split(self.v(source))
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        beams = q.shape[0] // k.shape[0]
        if beams > 1:  # beam search: the n beams of a user share that user's encoder keys/values, so
            # their queries are stacked as n query positions of one row instead of copying the
            # keys/values n times: (B*n, H, Tq, hd) -> (B, H, n*Tq, hd)
            q = q.view(k.shape[0], beams, n_head, -1, head_dim).transpose(1, 2).flatten(2, 3)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=self.drop if self.training else 0.0)  # (B, H, n*Tq, hd)
        if beams > 1:
            y = y.view(k.shape[0], n_head, beams, -1, head_dim).transpose(1, 2).flatten(0, 1)
        return self.o(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    # one layer: self-attention, (decoder only) cross-attention to the encoder output, then the MLP;
    # each as x + dropout(sublayer(norm(x)))
    def __init__(self, cross):
        super().__init__()
        inner = dropout if inner_dropout else 0.0  # on attention probabilities and MLP hidden units
        self.norm_self, self.self_attn = RMSNorm(d_model), Attention(inner)
        self.cross = cross
        if cross:
            self.norm_cross, self.cross_attn = RMSNorm(d_model), Attention(inner)
        self.norm_mlp = RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.ReLU(), nn.Dropout(inner),
                                 nn.Linear(d_ff, d_model, bias=False))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, self_bias, memory=None, cross_bias=None, cache=None):
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, h, self_bias, cache=cache and cache["self"]))
        if self.cross:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), memory, cross_bias,
                                              cache=cache and cache["cross"], static=True))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


def drop_input_tokens(enc, id_length):
    """enc: (B, 1 + n*L) encoder tokens [user, item_1 codes, ..., item_n codes]. Each history item is
    replaced by PAD tokens with probability item_dropout, and the user token with probability
    user_dropout (but never where no history token is left); attention already skips PAD keys, so the
    token simply vanishes from that example. Training only: evaluation always reads everything."""
    B, T = enc.shape
    hidden = torch.rand(B, (T - 1) // id_length, device=enc.device) < item_dropout  # (B, n) one draw per item
    hidden = F.pad(hidden.repeat_interleave(id_length, dim=1), (1, 0))              # (B, T), user kept
    if user_dropout > 0:  # (no draw when off, so runs without it keep their random stream)
        # the user token goes only where a real history token stays: an encoder with no key at all
        # has nothing to attend to (a softmax over an empty set is NaN)
        keeps_history = ((enc != data.PAD) & ~hidden)[:, 1:].any(1)                 # (B,)
        hidden[:, 0] = (torch.rand(B, device=enc.device) < user_dropout) & keeps_history
    return enc.masked_fill(hidden, data.PAD)


class TIGER(nn.Module):
    def __init__(self, vocab_size, levels):
        """levels: [(first token, number of codes)] of each Semantic-ID level (data.Tokenizer.levels):
        decoder position l generates a code of level l."""
        super().__init__()
        self.levels = levels
        self.embed = nn.Embedding(vocab_size, d_model)   # one vocabulary for encoder and decoder (data.py)
        self.enc_pos = RelativePositionBias(n_head, bidirectional=True)
        self.dec_pos = RelativePositionBias(n_head, bidirectional=False)
        self.encoder = nn.ModuleList([Block(cross=False) for _ in range(n_layer)])
        self.decoder = nn.ModuleList([Block(cross=True) for _ in range(n_layer)])
        self.enc_norm, self.dec_norm = RMSNorm(d_model), RMSNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:  # one table both reads a code and scores it as the next one
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():  # small init keeps early training stable
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "embed" in name or "head" in name else d_model ** -0.5)

    def encode(self, enc):
        """enc: (B, T) tokens, PAD on the right. Returns memory (B, T, d) and the cross-attention
        bias (B, 1, 1, T) that hides padding from the decoder."""
        pad_bias = torch.zeros(enc.shape, device=enc.device).masked_fill(enc == data.PAD, float("-inf"))
        pad_bias = pad_bias[:, None, None, :]
        bias = self.enc_pos(enc.shape[1], enc.shape[1]) + pad_bias  # (B, H, T, T), shared by all layers
        x = self.drop(self.embed(enc))
        for block in self.encoder:
            x = block(x, bias)
        return self.drop(self.enc_norm(x)), pad_bias

    def decode(self, dec_in, memory, cross_bias, caches=None, start=0):
        """dec_in: (B, Tq) decoder tokens at positions start..start+Tq-1. Returns the decoder's output
        states (B, Tq, d); code_logprobs() turns them into scores. With caches (one dict per layer)
        earlier positions come from the cache, so start > 0 needs only the new token: incremental
        decoding for beam search."""
        tq = dec_in.shape[1]
        bias = self.dec_pos(tq, start + tq, q_start=start)  # (1, H, Tq, Tk)
        if tq > 1:  # the causal mask: future keys get -inf (one new token with a cache needs none)
            future = torch.ones(tq, start + tq, dtype=torch.bool, device=dec_in.device).triu(start + 1)
            bias = bias.masked_fill(future, float("-inf"))
        x = self.drop(self.embed(dec_in))
        for i, block in enumerate(self.decoder):
            x = block(x, bias, memory, cross_bias, cache=caches[i] if caches is not None else None)
        return self.dec_norm(x)

    def code_logprobs(self, h, level):
        """h: (..., d) decoder states at the position that generates level `level`. Returns the
        log-probabilities of that level's codes, (..., n_codes), in float32.
        Beam search never considers another level's tokens there (nor user tokens), so head="level"
        scores only this level's rows of the output layer: a 256-way softmax instead of a ~2,800-way
        one, and a tenth of the output layer's work. head="full" is T5's softmax over the whole
        vocabulary, read at this level's tokens (the probabilities then sum to less than 1)."""
        first, n = self.levels[level]
        if head == "level":
            return F.log_softmax((h @ self.head.weight[first:first + n].T).float(), dim=-1)
        return F.log_softmax(self.head(h).float(), dim=-1)[..., first:first + n]

    def forward(self, enc, dec_in, target=None):
        """Teacher forcing. enc (B, T), dec_in (B, L) = [BOS, c_0 .. c_{L-2}], target (B, L) the tokens
        of the next item. Returns the decoder states (B, L, d) and the mean cross-entropy per code."""
        if self.training and (item_dropout > 0 or user_dropout > 0):
            enc = drop_input_tokens(enc, len(self.levels))
        h = self.decode(dec_in, *self.encode(enc))
        if target is None:
            return h, None
        losses = []
        for l, (first, _) in enumerate(self.levels):
            logp = self.code_logprobs(h[:, l], l)                       # (B, n_codes)
            nll = -logp.gather(1, (target[:, l] - first)[:, None])[:, 0]  # (B,)
            # label smoothing: the target is (1 - eps) on the right code + eps spread over all codes
            if label_smoothing > 0:
                nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
            losses.append(nll)
        return h, torch.cat(losses).mean()

    # ------------------------------------------------------------------------------------------
    # 3. Beam search. The decoder emits one code per level; at level l only the tokens of level l are
    # candidates, and (constrained) only the codes that extend the beam's prefix to a prefix of some
    # real item: `tables` below. Scores are exact sequence log-probabilities under the model.

    @torch.no_grad()
    def beam_search(self, enc, tables, beam_size, constrained=True):
        """enc: (B, T) encoder tokens. Returns (codes (B, beam, L) long, scores (B, beam)), best first.
        A returned ID with score -inf is a filler (fewer valid IDs than beams)."""
        B, L, dev = enc.shape[0], len(self.levels), enc.device
        memory, cross_bias = self.encode(enc)
        caches = [{"self": {}, "cross": {}} for _ in self.decoder]
        tokens = torch.full((B, 1), data.BOS, device=dev)       # the current last token of each beam
        state = torch.zeros(B, 1, dtype=torch.long, device=dev)  # prefix id of each beam (tables)
        scores = torch.zeros(B, 1, device=dev)                   # log p(prefix) of each beam
        codes = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)
        for level in range(L):
            n_beam = tokens.shape[1]
            h = self.decode(tokens.view(-1, 1), memory, cross_bias, caches, start=level)      # (B*n, 1, d)
            lo, size = self.levels[level]
            logp = self.code_logprobs(h[:, 0], level).view(B, n_beam, size)                  # this level's codes
            if constrained:
                logp = logp.masked_fill(~tables.allowed[level][state], float("-inf"))
            cand = (scores.unsqueeze(-1) + logp).view(B, -1)                                   # (B, n*size)
            k = min(beam_size, cand.shape[1])
            scores, flat = cand.topk(k, dim=1)                                                 # (B, k)
            parent, code = flat // size, flat % size
            codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, level)), code[..., None]], -1)
            if constrained:
                state = tables.next[level][state.gather(1, parent), code].clamp(min=0)
            tokens = code + lo
            # keep each beam's cached keys/values: rows are (user, beam); pick the parents' rows
            # (the cross-attention cache stays one copy per user: Attention stacks the beams' queries)
            rows = (parent + torch.arange(B, device=dev)[:, None] * n_beam).view(-1)
            for c in caches:
                c["self"]["k"], c["self"]["v"] = c["self"]["k"][rows], c["self"]["v"][rows]
        return codes, scores


class PrefixTables:
    """Constrained decoding tables, built once from the (n_items, L) Semantic-ID table.

    Every distinct prefix of length l gets an id. allowed[l][p, c] says whether code c at level l
    extends prefix p to a prefix of a real item, and next[l][p, c] gives the id of that longer prefix
    (-1 if none). Beam search then needs two gathers per step and no Python dictionaries. At the end,
    items_of() maps finished code tuples back to item ids (a sorted mixed-radix key, searchsorted)."""

    def __init__(self, tokenizer, device="cpu"):
        codes = tokenizer.codes
        n, L = codes.shape
        sizes = tokenizer.level_sizes
        prefix_id = [np.zeros(n, dtype=np.int64)]  # level 0: the empty prefix, id 0, for every item
        for l in range(1, L + 1):
            prefix_id.append(np.unique(codes[:, :l], axis=0, return_inverse=True)[1].reshape(-1))
        self.allowed, self.next = [], []
        for l in range(L):
            n_prefix = prefix_id[l].max() + 1
            allowed = np.zeros((n_prefix, sizes[l]), dtype=bool)
            nxt = np.full((n_prefix, sizes[l]), -1, dtype=np.int64)
            allowed[prefix_id[l], codes[:, l]] = True
            nxt[prefix_id[l], codes[:, l]] = prefix_id[l + 1]
            self.allowed.append(torch.from_numpy(allowed).to(device))
            self.next.append(torch.from_numpy(nxt).to(device))
        # to map any code tuple (valid or not) back to an item: mixed-radix number -> item id
        self.radix = np.cumprod([1] + sizes[::-1])[:-1][::-1].copy()  # (L,)
        keys = codes @ self.radix
        order = np.argsort(keys)
        self.sorted_keys = torch.from_numpy(keys[order]).to(device)
        self.sorted_items = torch.from_numpy(order + 1).to(device)
        self.radix_t = torch.from_numpy(self.radix).to(device)

    def items_of(self, codes):
        """codes (..., L) -> item ids (...), 0 where the tuple is no item (an invalid ID)."""
        keys = (codes * self.radix_t).sum(-1)  # (CUDA has no integer matmul)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp(max=len(self.sorted_keys) - 1)
        return torch.where(self.sorted_keys[pos] == keys, self.sorted_items[pos], torch.zeros_like(keys))


# ----------------------------------------------------------------------------------------------
# 4. Training with teacher forcing, model selection on validation, test once at the end.

def get_lr(step):
    if schedule == "rsqrt":  # the paper: constant for warmup_steps, then lr * sqrt(warmup / step)
        return lr * min(1.0, math.sqrt(warmup_steps / max(step, 1)))
    if step < warmup_steps:  # cosine: linear warmup, then a cosine decay to 0 at max_steps
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model):
    if optimizer == "adafactor":
        return torch.optim.Adafactor(model.parameters(), lr=lr)
    # AdamW, with no weight decay on the norms' scales (the only 1-d parameters)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def train_step(model, opt, batch, step, dev, autocast):
    """One teacher-forced step: cross-entropy on the L codes of each target item. Returns the loss."""
    for group in opt.param_groups:
        group["lr"] = get_lr(step)
    with autocast():
        _, loss = model(batch["enc"].to(dev), batch["dec_in"].to(dev), batch["target"].to(dev))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss


@torch.no_grad()
def update_ema(averaged, model, step):
    """averaged <- decay * averaged + (1 - decay) * model, parameter by parameter. The decay ramps up as
    (1 + step) / (10 + step), so the average spans roughly the last step / 9 steps (it never remembers the
    random initialisation for long) until it reaches `ema`: at step ~9,000 for 0.999, ~19,000 for 0.9995."""
    decay = min(ema, (1 + step) / (10 + step))
    for a, p in zip(averaged.parameters(), model.parameters()):
        a.lerp_(p, 1 - decay)


def cpu_has_bf16():
    # torch's CPU feature probes are private (torch.cpu._is_*); a build without them counts as "no"
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def make_autocast(dev):
    """The context every forward pass runs in: bf16 autocast (matrix products in bfloat16; norms,
    softmaxes and the loss in float32) or nothing (float32). precision=auto takes bf16 where the
    hardware has it: a GPU, or a CPU with AVX512-BF16 / AMX. Other CPUs emulate bf16, slower than
    float32. See the README for what it changes on our 2-core CPU."""
    if precision == "bf16" or (precision == "auto" and (dev == "cuda" or cpu_has_bf16())):
        return lambda: torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext


def check_config(config):
    problems = []
    for key in ("n_layer", "n_head", "head_dim", "d_model", "d_ff", "batch_size", "max_steps",
                "eval_every", "eval_batch_size", "n_user_buckets", "patience"):
        if config[key] < 1:
            problems.append(f"{key} must be >= 1 (got {config[key]})")
    if config["beam_size"] < 10:
        problems.append(f"beam_size must be >= 10: the metrics go up to K = 10 (got {config['beam_size']})")
    for key in ("eval_users", "warmup_steps"):
        if config[key] < (1 if key == "warmup_steps" and config["schedule"] == "rsqrt" else 0):
            problems.append(f"{key} is too small (got {config[key]})")
    for key, allowed in (("optimizer", ("adamw", "adafactor")), ("schedule", ("cosine", "rsqrt")),
                         ("device", ("auto", "cpu", "cuda")), ("head", ("level", "full")),
                         ("precision", ("auto", "bf16", "fp32"))):
        if config[key] not in allowed:
            problems.append(f"{key} must be one of {', '.join(allowed)} (got {config[key]!r})")
    for key in ("dropout", "item_dropout", "user_dropout", "label_smoothing", "ema"):
        if not 0 <= config[key] < 1:
            problems.append(f"{key} must be in [0, 1) (got {config[key]})")
    if config["lr"] <= 0:
        problems.append(f"lr must be > 0 (got {config['lr']})")
    if config["device"] == "cuda" and not torch.cuda.is_available():
        problems.append("device=cuda but no CUDA GPU is visible; use --device=cpu or auto")
    if problems:
        raise data.InputError("bad config: " + "; ".join(problems))


def save_atomic(obj, path):
    # prepare.write_atomic: a temp file beside the target, then a rename; a crash never leaves half a file
    if path.endswith(".json"):
        prepare.write_json(path, obj)
    else:
        prepare.write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    """Load a checkpoint saved by train(), without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise data.InputError(f"checkpoint {path} not found; train one with `python tiger.py`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.InputError(f"checkpoint {path} is corrupt or not a nanoTIGER checkpoint ({type(e).__name__}: "
                              f"{str(e)[:200]}); delete it and train again")
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise data.InputError(f"checkpoint {path} lacks model/config/step; it was not written by tiger.py")
    return ckpt


def build(config, ckpt=None):
    """Set the module config from `config`, load the Semantic IDs and build everything a run needs.
    Returns (ds, splits, tokenizer, user_tok, tables, model, device)."""
    globals().update(config)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    ds = data.load_dataset(dataset)
    codes = prepare.load_codes(dataset, ids, out_dir, ds.n_items)
    tokenizer = data.Tokenizer(codes, n_user_buckets)
    user_tok = tokenizer.user_tokens(ds.users)
    tables = PrefixTables(tokenizer, dev)
    torch.manual_seed(seed)
    model = TIGER(tokenizer.vocab_size, tokenizer.levels).to(dev)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return ds, data.split(ds), tokenizer, user_tok, tables, model, dev


def main(argv):
    t0 = time.time()
    config = data.configure(DEFAULTS, argv)
    check_config(config)
    run_dir = os.path.join(config["out_dir"], os.path.basename(os.path.normpath(config["dataset"])),
                           config["ids"], config["run"])
    ckpt_path, best_path = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "best.pt")
    ckpt = load_checkpoint(ckpt_path) if config["resume"] else None
    if ckpt is not None:  # a resumed run must be the same run: only the bookkeeping keys may differ
        bookkeeping = ("resume", "device", "eval_batch_size")
        missing = [k for k in config if k not in ckpt["config"] and k not in bookkeeping]
        if missing:
            raise data.InputError(f"--resume: {ckpt_path} was written by an older tiger.py, before the "
                                  f"option(s) {', '.join(missing)} existed, so it cannot be resumed; start "
                                  f"afresh without --resume (eval.py --ckpt= can still score its best.pt "
                                  f"when those options act only in training)")
        changed = [k for k in config if k not in bookkeeping
                   and ckpt["config"].get(k) != config[k]]
        if changed:
            raise data.InputError(f"--resume: {ckpt_path} was trained with a different config ({', '.join(changed)}); "
                                  f"resume with the same settings, or start afresh without --resume")
    ds, (train, valid, test), tokenizer, user_tok, tables, model, dev = build(config, ckpt)
    os.makedirs(run_dir, exist_ok=True)
    save_atomic(config, os.path.join(run_dir, "config.json"))
    n_params = sum(p.numel() for p in model.parameters())
    autocast = make_autocast(dev)
    print(f"TIGER on {dataset} ({ids} IDs of length {tokenizer.id_length}, vocab {tokenizer.vocab_size}): "
          f"{n_params / 1e6:.2f}M parameters, device {dev}, "
          f"{'bf16 autocast' if autocast is not contextlib.nullcontext else 'float32'}")
    print(f"examples: {len(train):,} train, {len(valid):,} valid, {len(test):,} test")
    opt = make_optimizer(model)
    if bench:
        return benchmark(model, opt, train, valid, tokenizer, user_tok, tables, dev, autocast)
    # `averaged` is the model that is validated, kept as best.pt and tested: the moving average of the
    # weights when ema > 0 (the default), else the trained model itself
    averaged = copy.deepcopy(model) if ema > 0 else model

    step, best, bad_evals, log = 0, -1.0, 0, []
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        if ema > 0:
            averaged.load_state_dict(ckpt["ema"])
        step, best, bad_evals, log = ckpt["step"], ckpt["best"], ckpt["bad_evals"], ckpt["log"]
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and dev == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        if bad_evals >= patience:  # the run had already stopped early: nothing left to train
            step = max_steps
        print(f"resumed from {ckpt_path} at step {step}")

    # The data order is a function of (seed, epoch) alone, so a resumed run sees the same batches.
    steps_per_epoch = math.ceil(len(train) / batch_size)
    model.train()
    bar = tqdm(range(step, max_steps), initial=step, total=max_steps, desc="train")
    seen, t_last, batches = 0, time.time(), {}
    for step in bar:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch not in batches:
            batches = {epoch: data.epoch_batches(train, batch_size, [seed, epoch], by_length)}
        batch = data.make_batch(train, batches[epoch][i], tokenizer, user_tok)
        loss = train_step(model, opt, batch, step, dev, autocast)
        if ema > 0:
            update_ema(averaged, model, step)
        seen += len(batch["target"])
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", ex_s=f"{seen / (time.time() - t_last):.0f}",
                            lr=f"{get_lr(step):.2e}")
        if (step + 1) % eval_every == 0 or step + 1 == max_steps:
            metrics = evaluation.evaluate(averaged, valid, tokenizer, user_tok, tables, beam_size, eval_batch_size,
                                          dev, limit=eval_users, autocast=autocast)
            improved = metrics["recall@10"] > best
            best, bad_evals = (metrics["recall@10"], 0) if improved else (best, bad_evals + 1)
            log.append({"step": step + 1, "loss": loss.item(), **metrics})
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}, valid recall@10 {metrics['recall@10']:.4f} "
                       f"ndcg@10 {metrics['ndcg@10']:.4f}{' (best)' if improved else ''}")
            if improved:
                save_atomic({"model": averaged.state_dict(), "config": config, "step": step + 1}, best_path)
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": config,
                         "ema": averaged.state_dict() if ema > 0 else None,
                         "step": step + 1, "best": best, "bad_evals": bad_evals, "log": log,
                         "rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state_all() if dev == "cuda" else None}, ckpt_path)
            seen, t_last = 0, time.time()
            if bad_evals >= patience:
                tqdm.write(f"early stop: no better validation recall@10 in {patience} evaluations")
                break
    bar.close()

    # The test split is touched exactly once, with the checkpoint that was best on validation.
    best_ckpt = load_checkpoint(best_path)
    model.load_state_dict(best_ckpt["model"])
    results = {"best_step": best_ckpt["step"], "n_params": n_params}
    for name, split in (("valid", valid), ("test", test)):
        results[name] = evaluation.evaluate(model, split, tokenizer, user_tok, tables, beam_size,
                                            eval_batch_size, dev, autocast=autocast)
        results[name + "_most_popular"] = evaluation.most_popular(ds, split)
    results["wall_s"] = round(time.time() - t0, 1)
    results["log"] = log
    save_atomic(results, os.path.join(run_dir, "metrics.json"))
    print_results(results, os.path.basename(os.path.normpath(dataset)))
    print(f"wall time {results['wall_s'] / 60:.1f} min; best checkpoint {best_path} (step {results['best_step']}); "
          f"metrics {os.path.join(run_dir, 'metrics.json')}")
    return results


def benchmark(model, opt, train, valid, tokenizer, user_tok, tables, dev, autocast, steps=30, users=2048):
    """`python tiger.py --bench`: speed of the configured model on this machine (nothing is saved)."""
    batches = data.epoch_batches(train, batch_size, seed, by_length)
    t = time.time()
    for i in range(steps):
        train_step(model, opt, data.make_batch(train, batches[i], tokenizer, user_tok), i, dev, autocast)
    train_speed = steps * batch_size / (time.time() - t)
    t = time.time()
    evaluation.evaluate(model, valid, tokenizer, user_tok, tables, beam_size, eval_batch_size, dev,
                        limit=users, progress=False, autocast=autocast)
    eval_speed = users / (time.time() - t)
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        try:
            import resource  # standard library, Unix only: peak resident memory of this process (KiB on Linux)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
        except ImportError:  # Windows
            peak = float("nan")
    print(f"train {train_speed:,.0f} examples/s (batch {batch_size}, by_length={by_length}); "
          f"eval {eval_speed:,.0f} users/s (beam {beam_size}); peak memory {peak:.2f} GiB "
          f"({'GPU' if dev == 'cuda' else 'process RSS'})")
    return {"train_examples_s": train_speed, "eval_users_s": eval_speed, "peak_gib": peak}


PAPER = {"beauty": (0.0454, 0.0321, 0.0648, 0.0384), "sports": (0.0264, 0.0181, 0.0400, 0.0225),
         "toys": (0.0521, 0.0371, 0.0712, 0.0432)}  # Table 1: Recall@5, NDCG@5, Recall@10, NDCG@10


def print_results(results, name):
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    print(f"\n{'':22s}" + "".join(f"{k:>11s}" for k in keys))
    for label, row in (("TIGER, validation", results["valid"]), ("TIGER, test", results["test"]),
                       ("most popular, test", results["test_most_popular"])):
        print(f"{label:22s}" + "".join(f"{row[k]:11.4f}" for k in keys))
    if name in PAPER:
        print(f"{'paper (Table 1), test':22s}" + "".join(f"{v:11.4f}" for v in PAPER[name]))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except data.InputError as e:
        sys.exit(f"error: {e}")
