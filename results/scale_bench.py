"""What nanoTIGER costs from 10k to 1M items: a measurement for the results log (issue #29 part 2),
not part of nanoTIGER. It writes nothing outside a temporary folder.

    OMP_NUM_THREADS=1 python results/scale_bench.py        # from the repo root: beauty, 10k..1M
    python results/scale_bench.py --sizes=10000,100000 --rqvae_sizes=10000 --users=1024
    python results/scale_bench.py --smoke                   # seconds: checks the script (a test)

The catalogues. Beauty, Sports and Toys ship 42,382 real item embeddings (all-mpnet-base-v2, unit
length). A synthetic item is a point between a real item and one of its 10 nearest real neighbours
(at a uniform random place on the segment), moved by a little Gaussian noise (a quarter of the
median distance between real neighbours) and scaled back to unit length: new products among the
real ones, inside the real clusters (beauty products, sports gear, toys and their sub-categories).
It is fair to the costs, which depend on the sizes (items, dimensions, codes, prefixes), not on
where the points lie; it is harsh on the IDs: 1M items packed into the space of 42k real ones are
more crowded than a real catalogue of 1M products, so the collisions below are an upper end.
--sizes=beauty is the real Beauty catalogue (12,101 items), the reference for the synthetic 10k.

Every stage of every size runs in a fresh process, so its peak resident memory (ru_maxrss: all the
process held, Python and torch included) is that stage's own. Time is the process's CPU time (one
thread), which other jobs on the machine inflate less than the wall time, printed beside it.
  ids     RQ-KMeans as prepare.py builds it (rqvae.rqkmeans_ids: 3 levels x 256 codes, 20 Lloyd
          iterations), then the collision token without a bound: code usage, collisions, the largest
          collision group (above collision_size = 256 prepare.py would stop with an error)
  rqvae   --rqvae_sizes only: the RQ-VAE (rqvae.train_rqvae) for --rqvae_epochs epochs; its time per
          epoch times 50, the default n_epochs, is the extrapolated build
  tables  tiger.PrefixTables (a dense allowed table and sorted keys per level): build time and the
          bytes of its tensors; then the dense tables it replaced (allowed + next, each of shape
          (n_prefixes, level size)), the same way
  beam    tiger.evaluate (constrained beam search, beam 40, batches of 512, bf16 autocast where the
          CPU has it: the default) over --users users; the default model, randomly initialised (a
          beam's cost depends on the model's shape and the tables, not on what it learnt); random
          items in histories with the lengths of Beauty's validation users. Then one batch's beams
          against the dense tables' beams: they must be equal
  train   a training step of the default model (tiger.train_step, batch 256). The model hardly
          grows with the catalogue: its vocabulary is the 3 x 256 codes, the user buckets and the
          collision codes, the only part that follows the catalogue (as wide as its largest
          collision group), and a step reads 256 histories whatever the number of items. So it is
          measured at the smallest and largest sizes only
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import rqvae  # noqa: E402
import tiger  # noqa: E402

OPTS = {"sizes": "beauty,10000,100000,1000000", "rqvae_sizes": "10000,100000", "rqvae_epochs": 2,
        "users": 2048, "beam_size": 40, "train_steps": 20, "threads": 1, "smoke": False,
        "stage": "", "size": "", "work": ""}
if __name__ == "__main__":   # (test_all.py imports this file for dense_tables: no options then)
    for arg in sys.argv[1:]:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in OPTS:
            sys.exit(f"error: unknown option --{key}; known: {', '.join(OPTS)}")
        OPTS[key] = type(OPTS[key])(value) if value else True
    if OPTS["smoke"]:  # a tiny catalogue, a few users and steps, k-means cut short
        OPTS.update(sizes="3000", rqvae_sizes="3000", rqvae_epochs=1, users=64, train_steps=2)
    torch.set_num_threads(OPTS["threads"])
KMEANS_ITERS = 2 if OPTS["smoke"] else rqvae.DEFAULTS["kmeans_iters"]


# ---- measuring ---------------------------------------------------------------------------------

def clock():
    return time.process_time(), time.perf_counter()


def since(start):
    """(CPU seconds, wall seconds) since start = clock()."""
    cpu, wall = clock()
    return cpu - start[0], wall - start[1]


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB -> bytes


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- the catalogues ----------------------------------------------------------------------------

POOL = ("beauty", "sports", "toys")


def real_embeddings(name):
    return np.load(os.path.join(ROOT, "data", name, "item_emb.npy")).astype(np.float32)


def catalogue(size, work, seed=0):
    """(n_items, 768) float32 unit vectors: Beauty's own, or `size` synthetic ones (docstring)."""
    if size == "beauty":
        return real_embeddings("beauty")
    pool = np.concatenate([real_embeddings(d) for d in POOL])                    # (42382, D)
    pool = pool[:4000] if OPTS["smoke"] else pool
    path = os.path.join(work, "neighbours.npy")
    if not os.path.exists(path):  # each real item's 10 nearest others (the first is itself)
        x = torch.from_numpy(pool)
        np.save(path, torch.cat([torch.cdist(b, x).topk(11, largest=False).indices[:, 1:]
                                 for b in x.split(4096)]).numpy())
    neighbours = np.load(path)
    rng = np.random.default_rng(seed)
    sample = torch.from_numpy(pool[rng.choice(len(pool), 2000, replace=False)])
    nearest = torch.cdist(sample, torch.from_numpy(pool)).topk(2, largest=False).values[:, 1]
    sigma = nearest.median().item() / 4 / np.sqrt(pool.shape[1])  # noise length: a quarter of it
    out = np.empty((int(size), pool.shape[1]), dtype=np.float32)
    for start in range(0, len(out), 1 << 16):
        n = min(1 << 16, len(out) - start)
        i = rng.integers(len(pool), size=n)                             # a real item ...
        j = neighbours[i, rng.integers(neighbours.shape[1], size=n)]    # ... and a neighbour
        t = rng.random((n, 1), dtype=np.float32)
        x = (1 - t) * pool[i] + t * pool[j] + sigma * rng.standard_normal(
            (n, pool.shape[1]), dtype=np.float32)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def id_table(work, size):
    return data.Tokenizer(np.load(os.path.join(work, f"ids_{size}.npy")))


# ---- the stages, one process each ---------------------------------------------------------------

def stage_embed(size, work):
    """The catalogue, written for the stages that need it (making it takes memory of its own)."""
    start = clock()
    emb = catalogue(size, work)
    np.save(os.path.join(work, f"emb_{size}.npy"), emb)
    return {"n_items": len(emb), "embed_cpu_s": since(start)[0]}


def embeddings(work, size):
    return np.load(os.path.join(work, f"emb_{size}.npy"))  # float32, as data.load_dataset has it


def stage_ids(size, work):
    emb = embeddings(work, size)
    start = clock()
    codes, quantization_error = rqvae.rqkmeans_ids(emb, rqvae.DEFAULTS["n_levels"],
                                                   rqvae.DEFAULTS["codebook_size"], KMEANS_ITERS,
                                                   rqvae.DEFAULTS["seed"])
    cpu, wall = since(start)
    ids = rqvae.add_collision_token(codes, collision_size=len(codes))
    np.save(os.path.join(work, f"ids_{size}.npy"), ids)
    stats = rqvae.id_stats(ids, data.Tokenizer(ids).level_sizes)
    return {"ids_cpu_s": cpu, "ids_wall_s": wall, "ids_peak": peak_rss(),
            "emb_bytes": emb.nbytes, "usage": stats["usage"],
            "in_collisions": stats["items_in_collisions"] / len(ids),
            "largest_group": stats["largest_collision_group"],
            "quantization_error": quantization_error}


def stage_rqvae(size, work):
    emb = embeddings(work, size)
    cfg = rqvae.DEFAULTS
    start = clock()
    model, _ = rqvae.train_rqvae(emb, cfg["n_levels"], cfg["codebook_size"], cfg["latent_dim"],
                                 cfg["beta"], cfg["optimizer"], cfg["lr"], cfg["batch_size"],
                                 OPTS["rqvae_epochs"], cfg["kmeans_iters"],
                                 cfg["reset_dead_codes"], cfg["seed"], progress=False)
    rqvae.rqvae_codes(model, emb)
    cpu, wall = since(start)
    return {"rqvae_epochs": OPTS["rqvae_epochs"], "rqvae_cpu_s": cpu, "rqvae_wall_s": wall,
            "rqvae_peak": peak_rss(), "rqvae_50_epochs_cpu_s": cpu / OPTS["rqvae_epochs"] * 50}


def dense_tables(tokenizer, items=None):
    """The reference: constrained decoding as PrefixTables did it before it kept sorted keys, with
    a dense next[l] (n_prefixes_l, size_l) table of child ids (-1: none) beside allowed[l], and
    every prefix's id its rank among the distinct rows codes[:, :l]. Returns (allowed, next,
    item_of_prefix), and a tables object that beam_search can use. items: the item ids decoding
    may return (default all). The one reference of the old tables: this benchmark measures them,
    test_all.py checks the new ones against them."""
    items = np.arange(1, len(tokenizer.codes) + 1) if items is None else np.asarray(items)
    codes = tokenizer.codes[items - 1]
    L = codes.shape[1]
    prefix_id = [np.zeros(len(codes), dtype=np.int64)] + [
        np.unique(codes[:, :l], axis=0, return_inverse=True)[1].reshape(-1)
        for l in range(1, L + 1)]
    allowed, nxt = [], []
    for l, size in enumerate(tokenizer.level_sizes):
        a = np.zeros((prefix_id[l].max() + 1, size), dtype=bool)
        n = np.full(a.shape, -1, dtype=np.int64)
        a[prefix_id[l], codes[:, l]] = True
        n[prefix_id[l], codes[:, l]] = prefix_id[l + 1]
        allowed.append(torch.from_numpy(a))
        nxt.append(torch.from_numpy(n))
    item_of_prefix = np.zeros(len(codes), dtype=np.int64)
    item_of_prefix[prefix_id[L]] = items
    dense = tiger.PrefixTables.__new__(tiger.PrefixTables)  # its methods, the dense tables' lookup
    dense.allowed, dense.item_of_prefix = allowed, torch.from_numpy(item_of_prefix)
    dense.child = lambda l, p, c: torch.where(p >= 0, nxt[l][p.clamp(min=0), c], p)
    return allowed, nxt, dense


def stage_tables(size, work):
    tok = id_table(work, size)
    before, start = peak_rss(), clock()
    tables = tiger.PrefixTables(tok)
    cpu, _ = since(start)
    out = {"tables_cpu_s": cpu, "tables_bytes": nbytes(tables.allowed + tables.keys
                                                       + [tables.item_of_prefix]),
           "tables_peak": peak_rss(), "prefixes": [len(a) for a in tables.allowed],
           "level_sizes": tok.level_sizes}
    del tables
    start = clock()
    allowed, nxt, dense = dense_tables(tok)
    out.update(dense_cpu_s=since(start)[0], dense_peak_gain=peak_rss() - before,
               dense_bytes=nbytes(allowed + nxt + [dense.item_of_prefix]))
    return out


def users(n_items, n_users, seed=0):
    """n_users validation-like examples: Beauty's validation history lengths, random items."""
    rng = np.random.default_rng(seed)
    _, valid, _ = data.split(data.load_dataset("beauty"))
    length = rng.choice(valid.length, n_users)
    history = rng.integers(1, n_items + 1, (n_users, valid.history.shape[1]))
    history[np.arange(history.shape[1]) >= length[:, None]] = 0
    return data.Examples(user=np.zeros(n_users, dtype=np.int64), history=history, length=length,
                         target=rng.integers(1, n_items + 1, n_users), position=length)


def default_model(tok):
    s = dict(tiger.DEFAULTS)
    torch.manual_seed(s["seed"])
    autocast = tiger.make_autocast("cpu", s["precision"])
    return tiger.TIGER(tiger.model_config_for(tok, s)), s, autocast


def stage_beam(size, work):
    tok = id_table(work, size)
    tables = tiger.PrefixTables(tok)
    model, s, autocast = default_model(tok)
    examples = users(len(tok.codes), OPTS["users"])
    tiger.evaluate(model, examples, tok, None, tables, OPTS["beam_size"], s["eval_batch_size"],
                   "cpu", limit=min(64, OPTS["users"]), progress=False, autocast=autocast)  # warm
    start = clock()
    tiger.evaluate(model, examples, tok, None, tables, OPTS["beam_size"], s["eval_batch_size"],
                   "cpu", progress=False, autocast=autocast)
    cpu, wall = since(start)
    out = {"beam_users_per_cpu_s": len(examples) / cpu, "beam_peak": peak_rss(),
           "beam_users_per_wall_s": len(examples) / wall}
    # the same beams with the dense tables of before, on one batch (they must be equal)
    batch = data.make_batch(examples, np.arange(min(256, len(examples))), tok, None)["enc"]
    with autocast():
        got = tiger.beam_search(model, batch, tables, OPTS["beam_size"])
        want = tiger.beam_search(model, batch, dense_tables(tok)[2], OPTS["beam_size"])
    out["same_beams_as_dense"] = all(torch.equal(a, b) for a, b in zip(got, want))
    return out


def stage_train(size, work):
    tok = id_table(work, size)
    model, s, autocast = default_model(tok)
    opt = tiger.make_optimizer(model, s)
    examples = users(len(tok.codes), s["batch_size"] * 4, seed=1)
    batches = [data.make_batch(examples, idx, tok, None)
               for idx in np.split(np.arange(len(examples)), 4)]
    tiger.train_step(model, opt, batches[0], 0, s, "cpu", autocast)  # warm
    start = clock()
    for step in range(OPTS["train_steps"]):
        tiger.train_step(model, opt, batches[step % 4], step + 1, s, "cpu", autocast)
    cpu, wall = since(start)
    return {"train_examples_per_cpu_s": OPTS["train_steps"] * s["batch_size"] / cpu,
            "train_peak": peak_rss()}


STAGES = {"embed": stage_embed, "ids": stage_ids, "rqvae": stage_rqvae, "tables": stage_tables,
          "beam": stage_beam, "train": stage_train}


# ---- the driver: every stage in its own process, then the table --------------------------------

def run_stage(stage, size, work):
    cmd = [sys.executable, os.path.abspath(__file__), f"--stage={stage}", f"--size={size}",
           f"--work={work}", f"--threads={OPTS['threads']}"] + ["--smoke"] * OPTS["smoke"]
    env = dict(os.environ, OMP_NUM_THREADS=str(OPTS["threads"]), TQDM_DISABLE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: stage {stage} at {size} items failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {stage:6s} {size:>8s}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def gb(b):
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def table(rows):
    """The Markdown table: one column per size."""
    sizes = list(rows)
    def line(name, fn):
        cells = []
        for size in sizes:
            try:
                cells.append(fn(rows[size]))
            except KeyError:
                cells.append("")
        return f"| {name} | " + " | ".join(cells) + " |"
    head = [f"{rows[s]['n_items']:,}" + (" (Beauty)" if s == "beauty" else "") for s in sizes]
    out = ["| items | " + " | ".join(head) + " |", "|---" * (len(sizes) + 1) + "|"]
    out += [
        line("RQ-KMeans IDs: CPU time (wall)",
             lambda r: f"{r['ids_cpu_s']:.0f} s ({r['ids_wall_s']:.0f} s)"),
        line("RQ-KMeans IDs: peak memory (of which the float32 embeddings)",
             lambda r: f"{gb(r['ids_peak'])} ({gb(r['emb_bytes'])})"),
        line("code usage per level", lambda r: " / ".join(f"{u:.0%}" for u in r["usage"])),
        line("items in collisions; largest group",
             lambda r: f"{r['in_collisions']:.1%}; {r['largest_group']}"),
        line("RQ-VAE: CPU time for n epochs; x 50 epochs (extrapolated)",
             lambda r: f"{r['rqvae_cpu_s']:.0f} s for {r['rqvae_epochs']}; "
                       f"{r['rqvae_50_epochs_cpu_s'] / 60:.0f} min"),
        line("RQ-VAE: peak memory", lambda r: gb(r["rqvae_peak"])),
        line("prefixes per level; level sizes",
             lambda r: f"{'/'.join(map(str, r['prefixes']))}; "
                       f"{'/'.join(map(str, r['level_sizes']))}"),
        line("prefix tables: build CPU time; bytes",
             lambda r: f"{r['tables_cpu_s']:.2f} s; {gb(r['tables_bytes'])}"),
        line("dense tables before #29: build CPU time; bytes",
             lambda r: f"{r['dense_cpu_s']:.2f} s; {gb(r['dense_bytes'])}"),
        line(f"beam search (beam {OPTS['beam_size']}): users/s of CPU (of wall)",
             lambda r: f"{r['beam_users_per_cpu_s']:.0f} ({r['beam_users_per_wall_s']:.0f})"),
        line("beam search: peak memory; beams = dense tables' beams",
             lambda r: f"{gb(r['beam_peak'])}; {'yes' if r['same_beams_as_dense'] else 'NO'}"),
        line("training step (batch 256): examples/s of CPU; peak memory",
             lambda r: f"{r['train_examples_per_cpu_s']:.0f}; {gb(r['train_peak'])}"),
    ]
    return "\n".join(out)


def main():
    if OPTS["stage"]:  # a child: one stage, its result as the last line of stdout
        result = STAGES[OPTS["stage"]](OPTS["size"], OPTS["work"])
        print(json.dumps(result))
        return
    sizes = OPTS["sizes"].split(",")
    numeric = [s for s in sizes if s != "beauty"]
    train_at = {numeric[0], numeric[-1]} if numeric else set(sizes)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as work:
        for size in sizes:
            rows[size] = run_stage("embed", size, work)
            rows[size].update(run_stage("ids", size, work))
            if size in OPTS["rqvae_sizes"].split(","):
                rows[size].update(run_stage("rqvae", size, work))
            os.remove(os.path.join(work, f"emb_{size}.npy"))
            rows[size].update(run_stage("tables", size, work))
            rows[size].update(run_stage("beam", size, work))
            if size in train_at:
                rows[size].update(run_stage("train", size, work))
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; "
          f"{os.uname().machine}, {os.cpu_count()} CPUs")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
