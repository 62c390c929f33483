"""
rqvae.py -- the Semantic-ID chapter of nanoTIGER: content embeddings in, unique integer IDs out.

TIGER's first stage (paper Sec. 3.1, and Sec. 4 "RQ-VAE Implementation Details"):

  1. k-means in plain torch (k-means++ start, Lloyd iterations with a rule for empty clusters)
  2. the residual quantizer: 3 levels x 256 codewords of dimension 32, one codebook per level
  3. the RQ-VAE: encoder 768 -> 512 -> 256 -> 128 -> 32, the quantizer, a mirrored decoder,
     its loss (reconstruction + codebook + beta * commitment) and training loop
  4. the collision token (Sec. 3.1): a last code that numbers the items sharing the same codes
  5. the ID schemes the paper compares against (Table 2): LSH Semantic IDs and Random IDs,
     plus RQ-KMeans (residual k-means, no autoencoder), which several later systems use and which
     is nanoTIGER's CPU default: its IDs train a better retriever here (README, Table 2)
  6. statistics: codebook usage, perplexity, collisions, and the hierarchy of Fig. 4 as text

Every scheme has the same interface: make_ids(emb, cfg) -> (codes, extra stats, model), where
codes is an (n_items, L) int64 table whose rows are all different. These six chapters are Part I;
Part II checks the settings at the door and holds `python rqvae.py`. `python rqvae.py` trains on
one dataset and prints the statistics; `python prepare.py` is the script that writes the artefacts.
"""
import math
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import data

# ==============================================================================================
# Part I. The method.

# ----------------------------------------------------------------------------------------------
# Config. prepare.py takes these same settings (its DEFAULTS start from these), so a flag like
# --n_epochs=500 means the same thing to both scripts.

dataset = 'beauty'
ids = 'rqkmeans'          # rqkmeans: the CPU default (beyond the paper; better downstream here,
                          # see the README) | rqvae: the paper's (config/rqvae_paper.py)
                          # | lsh | random (Table 2)
seed = 1337
device = 'auto'           # auto (cuda if available, else cpu) | cpu | cuda
# the RQ-VAE (Sec. 4, "RQ-VAE Implementation Details"); paper values in the comments
n_levels = 3              # paper: 3 levels of codes (+ 1 collision code)
codebook_size = 256       # paper: 256 codewords per level
latent_dim = 32           # paper: codewords of dimension 32
beta = 0.25               # paper: beta = 0.25 (commitment weight)
optimizer = 'adamw'       # paper: 'adagrad' with lr 0.4, which diverged in our CPU test
lr = 1e-3                 # paper: 0.4 (with Adagrad)
batch_size = 1024         # paper: batch size 1024
n_epochs = 50             # paper: 20000, for high codebook usage; dead-code resets make 50 enough
kmeans_iters = 20         # Lloyd iterations of k-means codebook initialisation (paper: not stated)
reset_dead_codes = True   # beyond the paper: re-seed codewords unused in an epoch
# the baselines of Table 2
lsh_codes = 4             # paper: m = 4 codes ...
lsh_bits = 8              # ... each from h = 8 random hyperplanes, so 2^8 = 256 values per code
random_codes = 4          # paper: Random IDs are m = 4 codes ...
random_codebook_size = 255  # ... drawn uniformly from 255 values
collision_size = 256      # the collision code has this many values; a larger group is an error
cold_start = 0.0          # > 0: IDs for the cold-start experiment (Sec. 4.3; paper 0.05): this
                          # share of the test targets is unseen (data.unseen_items), left out of the
                          # RQ-VAE's training and of the collision numbering; written to
                          # out/<dataset>/<ids>-cold<share>/
fit_with = ''             # other datasets whose items also train the RQ-VAE, e.g. 'sports,toys':
                          # Semantic IDs learnt on the items of several datasets, then used for this
                          # one (App. E, Table 10); written to out/<dataset>/<ids>-with-<datasets>/
DEFAULTS = data.settings(globals())  # prepare.py takes these same settings


# ----------------------------------------------------------------------------------------------
# 1. k-means in plain torch. Used twice: to initialise the RQ-VAE codebooks on the first batch
# (Sec. 3.1 initialises the codebooks by k-means clustering) and as the whole quantizer in
# RQ-KMeans.

def sq_dist(x, c, x_sq=None):
    """Squared Euclidean distances (N, K) between rows of x (N, D) and rows of c (K, D).

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix product instead of an (N, K, D) tensor.
    x_sq: ||x||^2 as (N, 1), when the caller has it (k-means asks for distances to the same points
    hundreds of times). Written in place on the (N, K) product: no temporary of x's size, which
    at 1M items is 3 GB (results/scale_bench.py)."""
    x_sq = row_sq_norms(x) if x_sq is None else x_sq
    d = (x @ c.T).mul_(-2).add_(x_sq).add_((c * c).sum(1))
    return d.clamp_min_(0)  # rounding can make a true 0 slightly negative


def row_sq_norms(x, chunk=1 << 16):
    """||x_i||^2 of every row of x (N, D), as (N, 1), a chunk of rows at a time (no N x D copy)."""
    return torch.cat([(b * b).sum(1, keepdim=True) for b in x.split(chunk)])


def lloyd_step(x, centroids, x_sq=None):
    """One Lloyd iteration, in place: assign every point of x (N, D) to its nearest centroid (k, D),
    move every centroid to the mean of its points. Each of the two steps can only lower the
    objective. Returns the objective (sum of squared distances to the assigned centroid) before
    the move. x_sq: the rows' squared norms (N, 1), if known (sq_dist)."""
    k = centroids.shape[0]
    dist, assign = sq_dist(x, centroids, x_sq).min(1)                   # (N,), (N,)
    counts = torch.bincount(assign, minlength=k)                        # (k,)
    sums = torch.zeros_like(centroids).index_add_(0, assign, x)         # (k, D)
    filled = counts > 0
    centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(x.dtype)
    # Empty clusters: move each to one of the points farthest from their centroid (a different
    # point for each). That point's distance drops to 0 and no other point's distance grows,
    # so the objective still cannot rise, and the cluster is no longer empty.
    n_empty = int((~filled).sum())
    if n_empty:
        centroids[~filled] = x[dist.topk(n_empty).indices]
    return dist.sum().item()


def kmeans(x, k, n_iter=20, seed=0):
    """Cluster x (N, D) into k clusters. Returns centroids (k, D), assignment (N,), and the
    objective before each Lloyd iteration (n_iter,)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    g = torch.Generator(device='cpu').manual_seed(seed)
    x_sq = row_sq_norms(x)                                              # (N, 1), once
    # k-means++ start (Arthur & Vassilvitskii 2007): each new centroid is a point drawn with
    # probability proportional to its squared distance to the nearest centroid chosen so far, so
    # the start is spread over the data. One pass over the points per centroid, k passes in all.
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[torch.randint(n, (1,), generator=g).item()]
    nearest = sq_dist(x, centroids[:1], x_sq).squeeze(1)               # (N,)
    for j in range(1, k):
        p = nearest.cpu().double()
        i = torch.multinomial(p / p.sum(), 1, generator=g).item() if p.sum() > 0 else j
        centroids[j] = x[i]
        nearest = torch.minimum(nearest, sq_dist(x, centroids[j:j + 1], x_sq).squeeze(1))
    objective = [lloyd_step(x, centroids, x_sq) for _ in range(n_iter)]
    return centroids, sq_dist(x, centroids, x_sq).argmin(1), objective

# ----------------------------------------------------------------------------------------------
# 2. The residual quantizer (Sec. 3.1, Fig. 3). Level d picks the codeword e_{c_d} of its own
# codebook nearest to the residual r_d; the next residual is r_{d+1} = r_d - e_{c_d}, starting from
# r_0 = z, the encoder output. The quantized vector is the sum of the chosen codewords.

class ResidualQuantizer(nn.Module):
    def __init__(self, n_levels, codebook_size, dim):
        super().__init__()
        self.codebooks = nn.Parameter(torch.randn(n_levels, codebook_size, dim))  # (L, K, D)

    @torch.no_grad()
    def init_kmeans(self, z, n_iter, seed):
        """Set each codebook to the k-means centroids of its level's residuals of z (B, D)."""
        r = z
        for d in range(self.codebooks.shape[0]):
            c, assign, _ = kmeans(r, self.codebooks.shape[1], n_iter, seed + d)
            self.codebooks[d] = c
            r = r - c[assign]

    def forward(self, z):
        """z (B, D) -> codes (B, L), codewords (L, B, D), residuals (L+1, B, D).

        residuals[d] is r_d, the input of level d; residuals[L] is what is left after the last
        level, so z == codewords.sum(0) + residuals[L] (up to rounding). Codeword e_{c_d} comes out
        of the codebook with its gradient (the codebook loss trains it); the next residual subtracts
        it detached, so each codebook is trained only by its own level's term of the loss."""
        r, codes, codewords, residuals = z, [], [], [z]
        for cb in self.codebooks:                                       # cb: (K, D)
            c = sq_dist(r.detach(), cb.detach()).argmin(1)              # (B,) nearest codeword
            # e = cb[c], written as a one-hot matrix product: its backward is a matrix product too,
            # so training is bit-for-bit reproducible (cb[c]'s backward adds rows in thread order)
            e = nn.functional.one_hot(c, cb.shape[0]).to(cb.dtype) @ cb  # (B, D)
            r = r - e.detach()
            codes.append(c); codewords.append(e); residuals.append(r)
        return torch.stack(codes, 1), torch.stack(codewords), torch.stack(residuals)

# ----------------------------------------------------------------------------------------------
# 3. The RQ-VAE (Sec. 3.1; its sizes in Sec. 4): an MLP autoencoder with the residual quantizer
# in its 32-d bottleneck.

def mlp(dims):
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())  # no activation after the last layer: the latent is unbounded
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(self, in_dim=768, latent_dim=32, n_levels=3, codebook_size=256):
        super().__init__()
        # paper: 768 -> 512 -> 256 -> 128 -> 32
        self.encoder = mlp([in_dim, 512, 256, 128, latent_dim])
        self.quantizer = ResidualQuantizer(n_levels, codebook_size, latent_dim)
        self.decoder = mlp([latent_dim, 128, 256, 512, in_dim])    # the mirror image

    def forward(self, x, beta=0.25):
        """x (B, 768) -> x_hat (B, 768), codes (B, L), losses: a dict of scalars.

        The loss of Sec. 3.1: L = L_recon + L_rqvae, with
          L_recon = ||x - x_hat||^2
          L_rqvae = sum_d ||sg[r_d] - e_{c_d}||^2 + beta ||r_d - sg[e_{c_d}]||^2
        Squared norms are summed over dimensions and averaged over the batch, as the equations
        read."""
        z = self.encoder(x)                                     # (B, 32)
        codes, e, r = self.quantizer(z)                         # (B, L), (L, B, 32), (L+1, B, 32)
        # moves the codewords to the residuals
        codebook = ((r[:-1].detach() - e) ** 2).sum(-1).mean(1).sum()
        # keeps the encoder near its codewords
        commit = ((r[:-1] - e.detach()) ** 2).sum(-1).mean(1).sum()
        z_q = e.sum(0)                                          # (B, 32) the quantized latent
        # Straight-through estimator: the forward pass decodes z_q, the backward pass copies the
        # decoder's gradient to z as if quantisation were the identity, so the encoder learns.
        z_q = z + (z_q - z).detach()
        x_hat = self.decoder(z_q)
        recon = ((x - x_hat) ** 2).sum(-1).mean()
        loss = recon + codebook + beta * commit
        return x_hat, codes, {'loss': loss, 'recon': recon, 'codebook': codebook, 'commit': commit}


def train_rqvae(emb, n_levels=3, codebook_size=256, latent_dim=32, beta=0.25, optimizer='adamw',
                lr=1e-3, batch_size=1024, n_epochs=50, kmeans_iters=20, reset_dead_codes=True,
                seed=0, device='cpu', progress=True):
    """Train an RQ-VAE on emb (N, 768).
    Returns the model (eval mode, on device) and per-epoch logs."""
    torch.manual_seed(seed)
    x = torch.as_tensor(emb, dtype=torch.float32, device=device)       # (N, 768), all of it fits
    model = RQVAE(x.shape[1], latent_dim, n_levels, codebook_size).to(device)
    g = torch.Generator(device='cpu').manual_seed(seed)
    # codebooks start as k-means centroids of the first batch, level by level on the residuals
    first = x[torch.randperm(len(x), generator=g)[:batch_size]]
    with torch.no_grad():
        model.quantizer.init_kmeans(model.encoder(first), kmeans_iters, seed)
    # The paper's optimizer is Adagrad with lr 0.4. We start its accumulator at 0.1, the default of
    # TensorFlow and JAX (the paper's likely stack); torch's default 0 makes the first step move
    # every weight by a full +-lr = 0.4. Even so it diverged on this data in our test, so the
    # default is AdamW.
    if optimizer == 'adagrad':
        opt = torch.optim.Adagrad(model.parameters(), lr=lr, initial_accumulator_value=0.1)
    elif optimizer == 'adamw':
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        raise data.InputError(f"unknown optimizer '{optimizer}'; use --optimizer=adagrad or adamw")
    log = []
    bar = tqdm(range(n_epochs), desc='rqvae', disable=not progress, mininterval=1)
    for epoch in bar:
        perm = torch.randperm(len(x), generator=g).to(device)
        used = torch.zeros(n_levels, codebook_size, dtype=torch.bool, device=device)
        sums = Counter()
        for start in range(0, len(x), batch_size):
            xb = x[perm[start:start + batch_size]]
            _, codes, losses = model(xb, beta)
            opt.zero_grad(set_to_none=True)
            losses['loss'].backward()
            opt.step()
            used[torch.arange(n_levels, device=device).unsqueeze(0), codes] = True
            for k, v in losses.items():
                sums[k] += v.item() * len(xb)
        # Beyond the paper (option reset_dead_codes): a codeword no item chose during the whole
        # epoch gets no gradient and would stay dead; move it onto the current residual of a random
        # item at its level, where it will be chosen. It matters most early: in the first epoch the
        # encoder drifts away from its k-means-initialised codebooks and most codes die; without
        # resets they come back only slowly. The paper instead trains 20k epochs. Not after the
        # last epoch, so every final codeword has been trained.
        if reset_dead_codes and epoch < n_epochs - 1:
            with torch.no_grad():
                z = model.encoder(x[perm[:batch_size]])
                _, _, r = model.quantizer(z)                            # (L+1, B, 32)
                for d in range(n_levels):
                    dead = (~used[d]).nonzero().squeeze(1)
                    if len(dead):
                        pick = torch.randint(r.shape[1], (len(dead),), generator=g).to(device)
                        model.quantizer.codebooks[d, dead] = r[d, pick]
        usage = used.float().mean(1).tolist()
        log.append({'epoch': epoch, **{k: v / len(x) for k, v in sums.items()}, 'usage': usage})
        if not math.isfinite(log[-1]['loss']):  # diverged: every code from here on would be noise
            raise data.InputError(f"the RQ-VAE loss became {log[-1]['loss']} in epoch {epoch + 1}; "
                                  f"lower --lr (or use --optimizer=adamw)")
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}", usage='/'.join(f'{u:.2f}' for u in usage))
    return model.eval(), log


@torch.no_grad()
def rqvae_codes(model, emb, device='cpu', batch=1 << 16):
    """Codes (N, L) of every item and its reconstruction error ||x - x_hat||^2, averaged over
    items. A batch of items at a time: the whole catalogue at once would hold ~5 KB of
    activations per item (5 GB at 1M items)."""
    codes, sq_error = [], 0.0
    for x in torch.as_tensor(emb, dtype=torch.float32, device=device).split(batch):
        x_hat, c, _ = model(x)
        codes.append(c)
        sq_error += ((x - x_hat) ** 2).sum().item()
    return torch.cat(codes).cpu().numpy(), sq_error / len(emb)

# ----------------------------------------------------------------------------------------------
# 4. The collision token (Sec. 3.1, "Handling collisions"): items whose codes are all equal get
# one more code that numbers them, 0, 1, 2, ... in item-id order (an item alone with its codes
# gets 0). Every ID is then unique and its prefix is unchanged. The token is one more level of the
# vocabulary, so it needs a bound: a group larger than collision_size would need an out-of-range
# code; we stop with an error that says how to get smaller groups rather than silently wrapping or
# widening the level.

def add_collision_token(codes, collision_size=256, seen=None):
    """codes (N, m) int -> (N, m + 1) int64, the last column numbering items with equal codes.
    seen: (N,) bool, cold start only: the seen items of a group are numbered first, exactly as if
    the unseen ones did not exist; unseen items follow (so every ID stays unique)."""
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    unseen = np.zeros(n, dtype=bool) if seen is None else ~np.asarray(seen, dtype=bool)
    # rows sorted by codes, then seen before unseen; remaining ties keep item-id order (stable)
    order = np.lexsort(np.vstack([unseen[None], codes.T[::-1]]))
    s = codes[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (s[1:] != s[:-1]).any(1)        # first row of each run of equal codes
    start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    token = np.empty(n, dtype=np.int64)
    token[order] = np.arange(n) - start             # rank inside the group
    if n and token.max() >= collision_size:
        i = order[start[np.argmax(np.arange(n) - start)]]
        raise data.InputError(
            f"{token.max() + 1} items share the codes {codes[i].tolist()}, more than the "
            f"{collision_size} values of the collision token; spread the items out (train the "
            f"RQ-VAE longer with --n_epochs, turn on --reset_dead_codes=True) or raise "
            f"--collision_size")
    return np.concatenate([codes, token[:, None]], axis=1)

# ----------------------------------------------------------------------------------------------
# 5. The other ID schemes. Same interface: embeddings in, integer codes out; make_ids adds the
# collision token to each the same way. (Beyond the paper, which counts m = 4 codes for LSH and
# Random IDs: the fifth, the collision token, makes every ID unique, as the RQ-VAE's are.)

def lsh_hash(x, planes):
    """The LSH code of Table 2: code j = sum_i 2^(i-1) 1[w_ji . x > 0].
    x (N, D), planes (m, h, D): h hyperplanes for each of m codes -> (N, m) codes in [0, 2^h)."""
    bits = (torch.einsum('nd,mhd->nmh', x, planes) > 0).long()  # (N, m, h)
    return (bits * 2 ** torch.arange(planes.shape[1])).sum(-1)  # bit i (from 1) weighs 2^(i-1)


def lsh_ids(emb, n_codes=4, n_bits=8, seed=0):
    """LSH Semantic IDs (Table 2): random Gaussian hyperplanes, their own n_bits for each of the
    n_codes codes. (N, D) -> (N, n_codes) in [0, 2^n_bits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(emb, dtype=torch.float32)
    return lsh_hash(x, torch.randn(n_codes, n_bits, x.shape[1], generator=g)).numpy()


def random_ids(n_items, n_codes=4, codebook_size=255, seed=0):
    """Random IDs (Table 2): every code drawn uniformly from codebook_size values. (N, n_codes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(codebook_size, (n_items, n_codes), generator=g).numpy()


def rqkmeans_ids(emb, n_levels=3, codebook_size=256, n_iter=20, seed=0, device='cpu', fit=None):
    """RQ-KMeans (beyond the paper): residual k-means directly on the embeddings, no autoencoder.
    fit: (M, D) the embeddings the centroids are learnt from (cold start: the seen items only;
    App. E: more datasets' items too); None = emb itself. Every row of emb then takes, level by
    level, the centroid nearest to its residual. Returns codes (N, n_levels) and the squared norm of
    the final residual, averaged over emb's items.
    Memory: emb, one float32 copy of it (the residuals, updated in place a chunk of rows at a
    time) and an (N, K) distance matrix, no other N x D tensor: 7.5 GB at its peak for 1M items
    (results/scale_bench.py); a new residual per level and N x D temporaries would double that."""
    def residuals(a):  # a float32 copy, ours to update in place
        return torch.as_tensor(a, dtype=torch.float32, device=device).clone()
    r, r_fit = residuals(emb), None if fit is None else residuals(fit)              # (N, D), (M, D)
    codes = []
    for d in tqdm(range(n_levels), desc='rqkmeans'):
        if r_fit is None:   # the centroids are learnt on emb itself: k-means assigns every row
            c, assign, _ = kmeans(r, codebook_size, n_iter, seed + d)                # c: (K, D)
        else:
            c, assign_fit, _ = kmeans(r_fit, codebook_size, n_iter, seed + d)
            assign = sq_dist(r, c).argmin(1)                                         # (N,)
            subtract_rows(r_fit, c, assign_fit)
        subtract_rows(r, c, assign)                                   # r_{d+1} = r_d - e_{c_d}
        codes.append(assign)
    return torch.stack(codes, 1).cpu().numpy(), row_sq_norms(r).mean().item()


def subtract_rows(r, c, assign, chunk=1 << 16):
    """r[i] -= c[assign[i]] for every row, in place, a chunk of rows at a time."""
    for start in range(0, len(r), chunk):
        r[start:start + chunk] -= c[assign[start:start + chunk]]


def level_sizes(cfg):
    """The number of values of each level of the IDs cfg['ids'] makes, collision token last."""
    scheme = cfg['ids']
    if scheme in data.LEARNT_IDS:
        sizes = [cfg['codebook_size']] * cfg['n_levels']
    elif scheme == 'lsh':
        sizes = [2 ** cfg['lsh_bits']] * cfg['lsh_codes']
    elif scheme == 'random':
        sizes = [cfg['random_codebook_size']] * cfg['random_codes']
    else:
        raise data.InputError(f"unknown ID scheme '{scheme}'; use --ids= one of "
                              f"{', '.join(data.ID_SCHEMES)}")
    return sizes + [cfg['collision_size']]


def make_ids(emb, cfg, device='cpu', seen=None, also_fit=None):
    """The one entry point: emb (N, 768), cfg a dict of the settings above (cfg['ids']: the scheme).
    seen: (N,) bool, cold start: only these items' embeddings train the RQ-VAE (or RQ-KMeans's
    centroids) and only they are numbered by the collision token; every item gets its codes.
    also_fit: (M, 768), rqvae or rqkmeans, the items of other datasets (App. E): they train the
    quantizer beside emb's items but get no codes, so the collision token numbers this dataset's
    items only. Returns codes (N, L) int64 with the collision
    token last, extra statistics, and the model (or None)."""
    scheme, model, extra = cfg['ids'], None, {}   # (check_config has checked cfg at the door)
    fit = emb if seen is None else emb[np.asarray(seen, dtype=bool)]  # never an unseen embedding
    if also_fit is not None:
        fit = np.concatenate([fit, also_fit])                         # (N + M, 768)
    if scheme == 'rqvae':
        model, log = train_rqvae(fit, cfg['n_levels'], cfg['codebook_size'], cfg['latent_dim'],
                                 cfg['beta'], cfg['optimizer'], cfg['lr'], cfg['batch_size'],
                                 cfg['n_epochs'], cfg['kmeans_iters'], cfg['reset_dead_codes'],
                                 cfg['seed'], device)
        codes, extra['recon_error'] = rqvae_codes(model, emb, device)
    elif scheme == 'rqkmeans':
        codes, extra['quantization_error'] = rqkmeans_ids(emb, cfg['n_levels'],
                                                          cfg['codebook_size'], cfg['kmeans_iters'],
                                                          cfg['seed'], device, fit)
    elif scheme == 'lsh':
        codes = lsh_ids(emb, cfg['lsh_codes'], cfg['lsh_bits'], cfg['seed'])
    else:
        codes = random_ids(len(emb), cfg['random_codes'], cfg['random_codebook_size'], cfg['seed'])
    return add_collision_token(codes, cfg['collision_size'], seen), extra, model


def build_model(cfg, in_dim=768):
    """An untrained RQVAE shaped by cfg (prepare.py loads rqvae.pt into it)."""
    return RQVAE(in_dim, cfg['latent_dim'], cfg['n_levels'], cfg['codebook_size'])

# ----------------------------------------------------------------------------------------------
# 6. Statistics. Codebook usage is the paper's own health check ("high codebook usage (>= 80%)");
# perplexity = exp(entropy of the code distribution) is the number of equally used codes that
# would give the same entropy; collisions say how much work the collision token does.

def id_stats(codes, sizes):
    """codes (N, L) with the collision token last; sizes: the number of values of each level."""
    n, m = codes.shape[0], codes.shape[1] - 1       # m semantic levels, then the collision token
    usage, perplexity = [], []
    for l in range(m):
        counts = np.bincount(codes[:, l], minlength=sizes[l])
        p = counts[counts > 0] / n
        usage.append(float((counts > 0).sum() / sizes[l]))
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
    # groups of equal semantic codes
    _, group_size = np.unique(codes[:, :m], axis=0, return_counts=True)
    _, prefix3 = np.unique(codes[:, :3], axis=0, return_counts=True)
    return {'n_items': int(n), 'id_length': int(m + 1), 'usage': usage, 'perplexity': perplexity,
            'distinct_prefixes': int(len(group_size)),
            'distinct_3code_prefixes': int(len(prefix3)),
            'unique_3code_prefix_share': float((prefix3 == 1).sum() / n),
            'items_in_collisions': int(group_size[group_size > 1].sum()),
            'largest_collision_group': int(group_size.max())}


def category_structure(codes, items, top=5, per_code=3):
    """The hierarchy of Fig. 4 as a number and as text.

    same_category_share: among pairs of items that share their first code (both with a known
    second-level category), the share that also share the second-level category. Random first
    codes give the dataset's base rate (pairs_base_rate, over all item pairs); a Semantic ID whose
    first level groups similar items gives much more."""
    ids, names = data.item_categories(items, depth=2)                  # 'Makeup > Nails'
    cat = [names[i] if i >= 0 else None for i in ids[1:]]
    known = np.array([c is not None for c in cat])
    if not known.any():
        return None
    def pairs(counter):
        return sum(k * (k - 1) // 2 for k in counter.values())
    first = codes[:, 0]
    same_code = Counter(first[known].tolist())
    same_both = Counter((f, c) for f, c, k in zip(first.tolist(), cat, known) if k)
    base = (pairs(Counter(c for c in cat if c is not None))
            / max(1, known.sum() * (known.sum() - 1) // 2))
    def top_categories(members, names):
        counts = Counter(names[i] or '(no category)' for i in members)
        return ', '.join(f'{c} {k / len(members):.0%}' for c, k in counts.most_common(per_code))
    lines = []
    for code, count in Counter(first.tolist()).most_common(top):
        members = np.flatnonzero(first == code)
        lines.append(f'first code {code:3d} ({count} items): {top_categories(members, cat)}')
    # one level down, as in Fig. 4: the second codes inside the most populated first code, with
    # the full category paths of their items (the finer level should split the coarse category)
    full = [' > '.join(it.get('categories') or []) or None for it in items]
    code = Counter(first.tolist()).most_common(1)[0][0]
    inside = np.flatnonzero(first == code)
    second = codes[inside, 1] if codes.shape[1] > 1 else np.zeros(0, dtype=np.int64)
    for code2, count in Counter(second.tolist()).most_common(per_code):
        members = inside[second == code2]
        lines.append(f'  first code {code}, second code {code2:3d} ({count} items): '
                     f'{top_categories(members, full)}')
    return {'same_category_share': pairs(same_both) / max(1, pairs(same_code)),
            'pairs_base_rate': base, 'fig4_text': lines}


def report(scheme, stats):
    """Print the statistics of one scheme in a few lines."""
    print(f"{scheme}: ID length {stats['id_length']}, {stats['n_items']} items")
    print(f"  codebook usage per level: {' '.join(f'{u:.1%}' for u in stats['usage'])}")
    print(f"  perplexity per level:     {' '.join(f'{p:.1f}' for p in stats['perplexity'])}")
    for k in ('recon_error', 'quantization_error'):
        if k in stats:
            print(f"  {k.replace('_', ' ')}: {stats[k]:.4f} "
                  f"(mean squared norm of the embeddings: 1.0)")
    print(f"  distinct 3-code prefixes: {stats['distinct_3code_prefixes']} "
          f"({stats['unique_3code_prefix_share']:.1%} of items alone in theirs)")
    print(f"  items in collisions: {stats['items_in_collisions']}, largest collision group: "
          f"{stats['largest_collision_group']}")
    if stats.get('category'):
        c = stats['category']
        print(f"  pairs sharing the first code that share the 2nd-level category: "
              f"{c['same_category_share']:.1%} (any two items: {c['pairs_base_rate']:.1%})")
        for line in c['fig4_text']:
            print('   ', line)


def all_stats(codes, cfg, extra, items):
    return {**id_stats(codes, level_sizes(cfg)), **extra,
            'category': category_structure(codes, items)}

# ==============================================================================================
# Part II. The workshop: the settings checked at the door, and `python rqvae.py`.

# the settings each scheme depends on: prepare.py rebuilds a scheme's IDs when one of these changes
SCHEME_KEYS = {
    'rqvae': ['n_levels', 'codebook_size', 'latent_dim', 'beta', 'optimizer', 'lr', 'batch_size',
              'n_epochs', 'kmeans_iters', 'reset_dead_codes', 'collision_size'],
    'rqkmeans': ['n_levels', 'codebook_size', 'kmeans_iters', 'collision_size'],
    'lsh': ['lsh_codes', 'lsh_bits', 'collision_size'],
    'random': ['random_codes', 'random_codebook_size', 'collision_size'],
}
assert tuple(SCHEME_KEYS) == data.ID_SCHEMES
RANGES = {  # what check_config accepts (data.check_settings)
    **{k: '[1, inf)' for k in ('n_levels', 'latent_dim', 'batch_size', 'n_epochs', 'kmeans_iters',
                               'lsh_codes', 'random_codes')},
    # a level of size K makes the decoder's prefix tables (n_prefixes, K): keep K in the thousands
    'codebook_size': '[2, 4096]', 'random_codebook_size': '[2, 4096]', 'lsh_bits': '[1, 12]',
    'collision_size': '[1, inf)', 'seed': '[0, inf)', 'cold_start': '[0, 0.5]',
    'beta': '[0, inf)', 'lr': '(0, 10]', 'ids': data.ID_SCHEMES, 'optimizer': ('adamw', 'adagrad'),
    'device': ('auto', 'cpu', 'cuda'),
}


def check_config(config, n_items):
    """The settings' ranges, and whether the dataset is big enough for them."""
    data.check_settings(config, RANGES)
    others = data.fit_with_names(config['fit_with'])
    if others and config['ids'] not in data.LEARNT_IDS:
        raise data.InputError(f"--fit_with trains the quantizer on more items; it works with "
                              f"--ids=rqvae or rqkmeans only (got --ids={config['ids']})")
    if others and config['cold_start'] > 0:
        raise data.InputError("--fit_with and --cold_start cannot be combined (the other datasets "
                              "would bring in items the cold-start experiment keeps unseen)")
    if data.dataset_name(config['dataset']) in others:
        raise data.InputError(f"--fit_with={config['fit_with']} names the dataset itself; list the "
                              f"other datasets only, e.g. --dataset=beauty --fit_with=sports,toys")
    if config['ids'] in data.LEARNT_IDS:
        # k-means needs at least one point per codeword: the RQ-VAE initialises its codebooks on
        # one batch, RQ-KMeans clusters all items
        points = min(n_items, config['batch_size']) if config['ids'] == 'rqvae' else n_items
        if points < config['codebook_size']:
            source = 'items of the first batch' if config['ids'] == 'rqvae' else 'items'
            raise data.InputError(f"codebook_size {config['codebook_size']} is larger than the "
                                  f"{points} {source} the codebooks are initialised from; use "
                                  f"--codebook_size={points} or fewer"
                                  + (" (or a larger --batch_size)" if points < n_items else ""))


# ----------------------------------------------------------------------------------------------
if __name__ == '__main__':
    # `python rqvae.py [config file] [--key=value ...]`: build one ID scheme and print its
    # statistics (nothing is written; prepare.py writes the artefacts).
    try:
        config = data.configure(DEFAULTS, sys.argv[1:])
        ds = data.load_dataset(config['dataset'])
        check_config(config, ds.n_items)
        t0 = time.time()
        dev = data.pick_device(config['device'])
        unseen = data.unseen_items(ds, config['cold_start'])
        seen = data.seen_items(ds, unseen) if len(unseen) else None
        codes, extra, _ = make_ids(ds.item_emb, config, dev, seen,
                                   data.fit_with_embeddings(config['fit_with']))
        report(config['ids'], all_stats(codes, config, extra, ds.items))
        print(f"  took {time.time() - t0:.0f} s on {dev}")
    except data.InputError as e:
        sys.exit(f'error: {e}')
