"""
eval.py -- how TIGER is measured (paper Sec. 4, "Evaluation Metrics").

Leave-one-out: each user has exactly one held-out item; the model ranks the full catalogue (beam
search over Semantic IDs returns a ranked list of items), and
  Recall@K = share of users whose held-out item is in the top K
  NDCG@K   = mean over users of 1 / log2(rank + 1) if rank <= K else 0
             (one relevant item: IDCG = 1)

Part I is the measurement, pure functions:
  1. the metrics: Recall/NDCG@K, the invalid-ID rate of unconstrained decoding (Fig. 6), the
     diversity of a ranking (Entropy@K as in Sec. 4.3 / Table 3, coverage, the Gini index of
     exposure), the categories each kind of user is shown (Table 4)
  2. the baselines: most popular, and Semantic_KNN (the cold-start baseline of Sec. 4.3)
  3. the cold-start protocol (Fig. 5): Recall@1..20 of unseen-target and seen-target users
Part II is the workshop: the paper's numbers, the report of every finished run, and the drivers
that load a checkpoint written by tiger.py:
  python eval.py --ckpt=out/beauty/rqkmeans/tiger/best.pt [--split=test] [--constrained=False]
  python eval.py --ckpt=... --demo=3      # 3 users' histories and their top-10 with titles and IDs
  python eval.py --ckpt=... --split=valid --beam_size=80   # the same checkpoint, a wider beam
  python eval.py --ckpt=... --drop_history=True            # history items out of the ranking
  python eval.py --temperature=1.5 --beam_size=50          # sampled top-50: diversity (Table 3)
  python eval.py --history=B004756YJA,B004ZT0SSG,17        # recommend for any history (ids, ASINs)
  python eval.py --ckpt=out/beauty/rqkmeans-cold0.05/tiger/best.pt --cold_start   # Fig. 5
  python eval.py --report=out             # every finished run under out/, as Markdown tables
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data

KS = (5, 10, 20)    # the K of Recall@K / NDCG@K (the paper reports 5 and 10)

# ==============================================================================================
# Part I. The measurement.

# ----------------------------------------------------------------------------------------------
# 1. The metrics

def ranks_of(ranked, targets):
    """ranked: (N, K) item ids, best first; targets: (N,).
    Returns (N,) the 1-based rank of the first hit, 0 when the target is missing."""
    hit = torch.as_tensor(ranked) == torch.as_tensor(targets)[:, None]       # (N, K)
    first = hit.float().argmax(dim=1) + 1                                     # first hit position
    return torch.where(hit.any(dim=1), first, torch.zeros_like(first))


def recall_ndcg(ranks, ks=KS):
    """ranks: (N,) from ranks_of. Returns {'recall@K': ..., 'ndcg@K': ...} as floats."""
    ranks = torch.as_tensor(ranks).double()
    found = ranks > 0
    gain = torch.where(found, 1.0 / torch.log2(ranks.clamp(min=1) + 1), torch.zeros_like(ranks))
    out = {}
    for k in ks:
        inside = found & (ranks <= k)
        out[f"recall@{k}"] = inside.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(inside, gain, torch.zeros_like(gain)).mean().item()
    return out


def invalid_rate(items):
    """items: (N, K) item ids from unconstrained decoding, 0 where the ID is no item. The share of
    returned IDs that are invalid (Fig. 6 reports it per K)."""
    return (torch.as_tensor(items) == 0).double().mean().item()


def without_history(items, history):
    """items: (N, B) ranked item ids, best first; history: (N, H) each user's history, 0-padded.
    Returns (N, B): each list without the user's history items, in its order, 0-padded at the end.
    Many papers score this way; the paper does not say, and our protocol keeps them, as the beam
    returns them (--drop_history measures the difference). No dataset here holds a repeat purchase
    (test_no_dataset_repeats_an_item_in_a_users_sequence), so a history item in a list is a
    certain miss, and dropping it can only move the held-out item up."""
    items, history = torch.as_tensor(items), torch.as_tensor(history)
    drop = (items[:, :, None] == history[:, None, :]).any(-1) & (items > 0)      # (N, B)
    # a stable sort on the flag moves the kept items to the front, in their order
    order = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices         # (N, B)
    return torch.where(drop.gather(1, order), 0, items.gather(1, order))


def metrics(items, targets, invalid=False, category=None):
    """items: (N, K) ranked item ids (0 = no item), targets: (N,). Recall and NDCG at every K of KS
    the ranking is long enough for; (invalid=True) the invalid-ID rate of the top K for K = 1, 5,
    10, 20 (the points of Fig. 6 we report) and of the whole ranking; (category given, see
    entropy_at_k) Entropy@K (Table 3), and beyond the paper coverage@K and the Gini index at K = 10,
    20, 50."""
    out = recall_ndcg(ranks_of(items, targets), [k for k in KS if k <= items.shape[1]])
    if invalid:
        for k in (1, 5, 10, 20):
            if k <= items.shape[1]:
                out[f"invalid@{k}"] = invalid_rate(items[:, :k])
        out["invalid_rate"] = invalid_rate(items)
    if category is not None:
        n_items = len(category) - 1
        for k in (10, 20, 50):
            if k <= items.shape[1]:
                if (torch.as_tensor(category) >= 0).any():
                    out[f"entropy@{k}"] = entropy_at_k(items, category, k)
                out[f"coverage@{k}"] = coverage_at_k(items, n_items, k)
                out[f"gini@{k}"] = gini_at_k(items, n_items, k)
    return out


def entropy_at_k(items, category, k):
    """Entropy@K (paper Sec. 4.3, Table 3): per user, the entropy (in nats) of the distribution of
    the categories of the top-K recommended items, averaged over users. items: (N, >=K) item ids
    (0 = none); category: (n_items + 1,) a category id per item id, -1 where unknown (those items
    and item 0 are left out of the distribution; a user with none known is left out)."""
    cats = torch.as_tensor(category)[torch.as_tensor(items)[:, :k]]          # (N, K)
    n_cat = int(cats.max()) + 1
    counts = torch.zeros(len(cats), max(n_cat, 1), dtype=torch.float64)
    known = cats >= 0
    counts.scatter_add_(1, cats.clamp(min=0), known.double())                # (N, n_cat)
    total = counts.sum(1, keepdim=True)
    p = counts / total.clamp(min=1)
    h = -(p * torch.log(p.clamp(min=1e-300))).sum(1)                         # (N,)
    return h[total[:, 0] > 0].mean().item()


def coverage_at_k(items, n_items, k):
    """The share of the catalogue that appears in at least one user's top K."""
    shown = torch.unique(torch.as_tensor(items)[:, :k])
    return (shown > 0).sum().item() / n_items


def gini_at_k(items, n_items, k):
    """The Gini index of exposure: how unequally the top-K slots of all users are shared among the
    n_items items (0: every item shown equally often; near 1: a few items take every slot)."""
    exposure = torch.bincount(torch.as_tensor(items)[:, :k].reshape(-1), minlength=n_items + 1)[1:]
    x = exposure.double().sort().values                                      # ascending
    i = torch.arange(1, n_items + 1, dtype=torch.float64)
    return ((2 * i - n_items - 1) * x).sum().item() / (n_items * x.sum().item())


def category_mix(items, targets, category, names, k=10, n_targets=3, n_shown=3):
    """Table 4 as text: for the n_targets most common categories of the held-out items, the
    n_shown most common categories among those users' top-k recommendations, with their shares."""
    items, targets = torch.as_tensor(items)[:, :k], torch.as_tensor(targets)
    category = torch.as_tensor(category)
    target_cat = category[targets]
    lines = []
    common = torch.bincount(target_cat[target_cat >= 0]).argsort(descending=True)[:n_targets]
    for c in common.tolist():
        shown = category[items[target_cat == c]].reshape(-1)
        shown = shown[shown >= 0]
        counts = torch.bincount(shown, minlength=len(names))
        top = counts.argsort(descending=True)[:n_shown].tolist()
        mix = ", ".join(f"{names[i]} {counts[i].item() / len(shown):.0%}"
                        for i in top if counts[i] > 0)
        lines.append(f"target {names[c]} ({(target_cat == c).sum().item()} users): top-{k} {mix}")
    return lines


def recall_curve(items, targets, ks):
    """Recall@K for every K in ks. items: (N, >= max(ks)) item ids; a list of floats."""
    r = recall_ndcg(ranks_of(items, targets), ks)
    return [r[f"recall@{k}"] for k in ks]


# ----------------------------------------------------------------------------------------------
# 2. The baselines: what any recommender must beat (most popular), and what cold start is
# measured against (Semantic_KNN)

def most_popular(dataset, examples, unseen=(), k=max(KS), drop_history=False):
    """The most-popular baseline: every user gets the k items with most training interactions
    (data.training_part of each sequence, so nothing of validation or test is counted, nor a
    cold-start run's unseen items); drop_history=True: the k most popular of those not in the
    user's history (without_history, as --drop_history scores the model)."""
    counts = np.zeros(dataset.n_items + 1, dtype=np.int64)
    for seq in dataset.sequences:
        np.add.at(counts, data.training_part(seq, unseen), 1)
    spare = examples.history.shape[1] if drop_history else 0   # room for the dropped ones
    items = np.tile(np.argsort(-counts[1:], kind="stable")[:k + spare] + 1, (len(examples), 1))
    if drop_history:
        items = without_history(items, examples.history)[:, :k]
    return recall_ndcg(ranks_of(items, examples.target))


def semantic_knn(item_emb, history, length, k, query="last", batch_size=1024):
    """Semantic_KNN, the cold-start baseline of Sec. 4.3 ("we use the semantic representation
    space to perform the nearest-neighbor search"): the k items whose content embeddings are
    nearest (cosine) to a query built from the history, the history's own items left out. The paper
    does not say what the query is; query = "last": the last history item's embedding (the item a
    next purchase most resembles), "mean": the mean of the history's. item_emb: (n_items, d);
    history: (N, H) item ids, 0-padded; length: (N,). Returns (N, k) item ids, best first."""
    emb = torch.nn.functional.normalize(torch.as_tensor(item_emb, dtype=torch.float32), dim=1)
    emb = torch.cat([torch.zeros(1, emb.shape[1]), emb])                     # row 0: padding
    out = []
    for start in range(0, len(history), batch_size):
        h = torch.as_tensor(history[start:start + batch_size])               # (b, H)
        n = torch.as_tensor(length[start:start + batch_size])                # (b,)
        if query == "last":
            q = emb[h.gather(1, (n - 1)[:, None]).squeeze(1)]                # (b, d)
        else:
            q = emb[h].sum(1) / n[:, None]                                   # padding rows are 0
        sim = q @ emb.T                                                      # (b, n_items + 1)
        sim.scatter_(1, h, float("-inf"))                                    # the history out
        sim[:, 0] = float("-inf")                                            # and the padding item
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# 3. The cold-start protocol (Sec. 4.3, Fig. 5). The users are split by their held-out item:
# unseen (the cold-start users: only a model that can return unseen items can get them right) or
# seen. TIGER's top K comes from its seen ranking and its unseen candidates under the epsilon rule
# (tiger.epsilon_top_k); Semantic_KNN's from the content embeddings. Recall@K for K = 1..20, per
# group, per epsilon; Fig. 5a is epsilon = 0.1, Fig. 5b the sweep. How the two rankings are made
# (eval.py's score_cold_start decodes them batch by batch): the seen ranking is beam search over
# PrefixTables of the seen items only; the unseen candidates come from tiger.unseen_candidates
# over PrefixTables of all items, with unseen_table saying which unseen items sit under each
# prefix; Semantic_KNN queries with the last history item and with the history's mean.

EPSILONS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)   # the cold-start sweep (Fig. 5b)
COLD_KS = tuple(range(1, 21))                # Recall@K for K = 1..20 (Fig. 5a)


def cold_start_recalls(seen, seen_scores, new, new_scores, targets, is_cold, knn):
    """seen (N, beam), seen_scores: the seen ranking and its log p; new (N, m), new_scores: the
    unseen candidates and their log p(prefix) (-inf: none); targets (N,); is_cold (N,) bool, the
    users whose held-out item is unseen; knn: {query: (N, 20) Semantic_KNN items}. Returns
    {"tiger": {epsilon: {group: [R@1..R@20]}}, "semantic_knn": {query: {group: [...]}}}."""
    import tiger  # (see main)
    groups = {"unseen_target": is_cold, "seen_target": ~is_cold}
    out = {"tiger": {}, "semantic_knn": {}}
    for eps in EPSILONS:
        # the top K depends on K (at most floor(eps * K) unseen items): one list per K
        tops = {k: tiger.epsilon_top_k(seen, seen_scores, new, new_scores, k, eps) for k in COLD_KS}
        out["tiger"][f"{eps:g}"] = {g: [recall_curve(tops[k][m], targets[m], [k])[0]
                                        for k in COLD_KS] for g, m in groups.items()}
    for query, items in knn.items():
        out["semantic_knn"][query] = {g: recall_curve(items[m], targets[m], COLD_KS)
                                      for g, m in groups.items()}
    return out


# ==============================================================================================
# Part II. The workshop: the paper's numbers, the report, the drivers.

# ---- the paper's numbers, beside ours -------------------------------------------------------

PAPER = {"beauty": (0.0454, 0.0321, 0.0648, 0.0384), "sports": (0.0264, 0.0181, 0.0400, 0.0225),
         "toys": (0.0521, 0.0371, 0.0712, 0.0432)}  # Table 1: Recall@5, NDCG@5, Recall@10, NDCG@10
# Table 2, the other ID schemes (as transcribed by third-party reading notes; the RQ-VAE row is
# Table 1)
PAPER_IDS = {("beauty", "lsh"): (0.0379, 0.0259, 0.0533, 0.0309),
             ("beauty", "random"): (0.0296, 0.0205, 0.0434, 0.0250),
             ("sports", "lsh"): (0.0215, 0.0146, 0.0321, 0.0180),
             ("sports", "random"): (0.007, 0.005, 0.0116, 0.0063),
             ("toys", "lsh"): (0.0412, 0.0299, 0.0566, 0.0349),
             ("toys", "random"): (0.0362, 0.0270, 0.0448, 0.0298)}
# Table 9: mean and standard error of 3 training seeds (one transcription, from the paper's LaTeX
# source)
PAPER_SEEDS = {
    "beauty": ("0.0441 ± 0.0007", "0.0309 ± 0.0006", "0.0642 ± 0.0009", "0.0374 ± 0.0006"),
    "sports": ("0.0278 ± 0.0007", "0.0189 ± 0.0004", "0.0419 ± 0.0010", "0.0234 ± 0.0005"),
    "toys": ("0.0518 ± 0.0006", "0.0375 ± 0.0004", "0.0698 ± 0.0013", "0.0433 ± 0.0005")}
# the other settings the paper measured on Beauty (same source), keyed by the report's recipe text
# without its user-token terms: Table 10 (App. E), Semantic IDs learnt on three datasets; Table 8,
# the user token read (a recipe that changes only the user token's settings)
PAPER_RECIPES = {"fit_with=sports,toys": ("Table 10", (0.04355, 0.03047, 0.06314, 0.03676)),
                 "": ("Table 8", (0.0454, 0.0321, 0.0648, 0.0384))}


# Table 1's SASRec row (trained with the binary loss, one sampled negative)
PAPER_SASREC = {"beauty": (0.0387, 0.0249, 0.0605, 0.0318),
                "sports": (0.0233, 0.0154, 0.0350, 0.0192),
                "toys": (0.0463, 0.0306, 0.0675, 0.0374)}


def paper_row(name, ids, recipe="default"):
    """The paper's (table, (R@5, N@5, R@10, N@10)) for a dataset, ID scheme and recipe, or
    (None, None). Runs on Semantic IDs (RQ-VAE, or RQ-KMeans: ours, beyond the paper) sit beside
    TIGER's own rows (Table 1, or the Table 8 / 10 row of a setting they change); the ID baselines
    beside Table 2's; SASRec (ids "item", baselines/sasrec.py) beside Table 1's SASRec."""
    if ids == "item":  # the paper's SASRec beside ours with either loss and any step budget
        same_model = recipe == "default" or all(t.startswith(("loss=", "max_steps="))
                                                for t in recipe.split())
        return ("Table 1, SASRec", PAPER_SASREC.get(name)) if same_model else (None, None)
    if ids not in data.LEARNT_IDS:
        return ("Table 2", PAPER_IDS.get((name, ids))) if recipe == "default" else (None, None)
    if recipe == "default":
        return "Table 1", PAPER.get(name)
    rest = " ".join(t for t in recipe.split() if not t.startswith(("user_token=", "user_dropout=")))
    return PAPER_RECIPES.get(rest, (None, None)) if name == "beauty" else (None, None)


def print_table(results, name, ids="rqvae"):
    """The run's metrics beside the most-popular baseline and the paper's (Table 1, or Table 2 for
    the other ID schemes). results: a dict with 'test' (and optionally 'valid', 'test_most_popular')
    metric dicts."""
    keys = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    rows = [("TIGER, validation", results.get("valid")), ("TIGER, test", results.get("test")),
            ("most popular, test", results.get("test_most_popular"))]
    print(f"\n{'':22s}" + "".join(f"{k:>11s}" for k in keys))
    for label, row in rows:
        if row is not None:
            print(f"{label:22s}" + "".join(f"{row[k]:11.4f}" for k in keys))
    table, paper = paper_row(name, ids)
    if paper:
        print(f"{f'paper ({table}), test':22s}" + "".join(f"{v:11.4f}" for v in paper))


# ----------------------------------------------------------------------------------------------
# The results report: every finished run under an out/ folder, collected and set beside the
# paper's Table 1, with where each number came from (command, commit, machine, wall time).

METRIC_KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
# settings that say where or how fast a run went, not what it computed (validating more or less
# often trains the same model: test_validating_more_often_trains_the_very_same_model)
NOT_RECIPE = ("run", "out_dir", "resume", "overwrite", "device", "eval_batch_size", "bench",
              "profile", "dataset", "ids", "seed", "eval_every")


def collect_runs(out_dir):
    """Every finished run under out_dir: a run folder holds config.json (its settings) and
    metrics.json (what tiger.py measured). Returns a list of dicts {folder, settings, metrics}; a
    file that is not what tiger.py writes is an error naming it."""
    runs = []
    for folder, _, files in sorted(os.walk(out_dir)):
        if "metrics.json" in files:
            runs.append({"folder": folder,
                         "settings": read_run_file(folder, "config.json", out_dir),
                         "metrics": read_run_file(folder, "metrics.json", out_dir)})
    return runs


def read_run_file(folder, name, out_dir):
    """A run's config.json or metrics.json, checked: the fields the report reads are there, and
    every test metric is a number in [0, 1]."""
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
        if name == "metrics.json":
            test = [loaded["test"][k] for k in METRIC_KEYS]
            ok = all(isinstance(v, float) and 0 <= v <= 1 for v in test)  # NaN fails both
            ok = (ok and isinstance(loaded["wall_s"], (int, float))
                  and math.isfinite(loaded["wall_s"]))
        else:
            ok = {"dataset", "ids", "seed"} <= set(loaded)
        if not ok:
            raise ValueError("missing, malformed or out-of-range fields")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise data.InputError(f"{path} is not a finished run's {name} ({type(e).__name__}: {e}); "
                              f"rerun that run or move it out of {out_dir}") from None
    return loaded


def print_report(folder, defaults):
    """--report: the tables of every finished run under folder, TIGER's and then SASRec's
    (baselines/sasrec.py, each against its own defaults). A run written by an older script,
    before one of today's settings existed, cannot be read as any recipe: it is named and left out
    (train it again to report it)."""
    from baselines import sasrec
    if not os.path.isdir(folder):
        raise data.InputError(f"--report={folder}: no such folder")
    runs = collect_runs(folder)
    if not runs:
        raise data.InputError(f"no finished run under {folder} (a run folder has metrics.json)")
    reported = []
    for model, model_defaults in (("tiger", defaults), ("sasrec", sasrec.DEFAULTS)):
        mine = [r for r in runs if r["settings"].get("model", "tiger") == model]
        current = [r for r in mine if set(model_defaults) <= set(r["settings"])]
        if current:
            print(report_tables(current, model_defaults) + "\n")
        for r in mine:
            if r not in current:
                missing = sorted(set(model_defaults) - set(r["settings"]))
                print(f"left out {r['folder']}: written before the setting(s) "
                      f"{', '.join(missing)} existed; train it again to report it")
        reported += current
    return reported


def recipe(settings, defaults):
    """A run's recipe in a few words: its settings that differ from the defaults."""
    changed = [f"{k}={v}" for k, v in sorted(settings.items())
               if k not in NOT_RECIPE and k in defaults and v != defaults[k]]
    return " ".join(changed) or "default"


def mean_se(values):
    """'mean' for one value, 'mean ± standard error' for several."""
    m = float(np.mean(values))
    if len(values) < 2:
        return f"{m:.4f}"
    return f"{m:.4f} ± {float(np.std(values, ddof=1)) / np.sqrt(len(values)):.4f}"


def report_tables(runs, defaults):
    """Markdown: one row per (dataset, ids, recipe), its seeds averaged (mean ± standard error),
    the paper's Table 1 beside the default recipe; then every run with its provenance."""
    groups = {}
    for r in runs:
        s = r["settings"]
        key = (data.dataset_name(s["dataset"]), s["ids"], recipe(s, defaults))
        groups.setdefault(key, []).append(r)
    lines = ["| dataset | IDs | recipe | seeds | Recall@5 | NDCG@5 | Recall@10 | NDCG@10 "
             "| most popular R@10 |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, ids, rec), members in sorted(groups.items()):
        cells = [mean_se([m["metrics"]["test"][k] for m in members]) for k in METRIC_KEYS]
        popular = members[0]["metrics"].get("test_most_popular", {}).get("recall@10", float("nan"))
        lines.append(f"| {name} | {ids} | {rec} | {len(members)} | {' | '.join(cells)} "
                     f"| {popular:.4f} |")
        table, paper = paper_row(name, ids, rec)
        if paper:
            cells = " | ".join(f"{v:.4f}" for v in paper)
            lines.append(f"| {name} | paper, {table} | | | {cells} | |")
        if table == "Table 1" and len(members) > 1 and name in PAPER_SEEDS:  # seeds of the default
            lines.append(f"| {name} | paper, Table 9 | | 3 | {' | '.join(PAPER_SEEDS[name])} | |")
    lines += ["", "| run | test Recall@10 | best step | wall | commit | machine | command |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        m, p = r["metrics"], r["metrics"].get("provenance", {})
        machine = f"{p.get('machine', '?')}, threads: {p.get('threads', '?')}" if p else "?"
        lines.append(f"| {r['folder']} | {m['test']['recall@10']:.4f} | "
                     f"{m.get('best_step', '?')} | {m['wall_s'] / 60:.1f} min | "
                     f"{p.get('commit', '?')} | {machine} | `{p.get('command', '?')}` |")
    return "\n".join(lines)


# ---- the drivers: score a checkpoint, or show what it recommends ------------------------------
# A checkpoint carries its model config and the Semantic-ID table it was trained on, so it is
# scored with exactly those IDs, even if prepare.py has rebuilt out/<dataset>/<ids>/ since.

ckpt = "out/beauty/rqkmeans/tiger/best.pt"  # a checkpoint written by tiger.py (the main job's)
split = "test"            # valid | test
constrained = True        # False: unconstrained beam search, report the invalid-ID rate (Fig. 6)
demo = 0                  # > 0: print this many users' histories and top-10 instead of the metrics
beam_size = 0             # >= 10: decode with this many beams, not the checkpoint's; 0: its own
temperature = 0.0         # > 0: sample the ranking at this temperature, not beam search (Table 3)
history = ""              # item ids or ASINs, comma-separated, oldest first: recommend for these
seed = 0                  # the sampling's seed
drop_history = False      # True: drop each user's history items from the ranking before the
                          # metrics (without_history; many papers do, our protocol does not)
cold_start = False        # the cold-start protocol (Sec. 4.3, Fig. 5), for a checkpoint trained
                          # with tiger.py --cold_start: TIGER at several epsilon vs Semantic_KNN
epsilon = 0.0             # a cold-start checkpoint's --history and --demo: the largest share of
                          # unseen items in the top 10 (0: seen items only; paper's Fig. 5a: 0.1)
report = ""               # a folder: print the results tables of every finished run under it
DEFAULTS = data.settings(globals())
RANGES = {"split": ("valid", "test"), "demo": "[0, inf)", "beam_size": "[0, inf)",
          "temperature": "[0, 100]", "seed": "[0, inf)", "epsilon": "[0, 1]"}


class Scorer:
    """A checkpoint made ready to score: its model, its Semantic IDs and data (checked to be the
    ones it trained on), the decoding tables, and recommend() for a batch, decoded as configured."""

    def __init__(self, config):
        import tiger  # (see main)
        self.config, self.tiger = config, tiger
        self.saved = tiger.load_checkpoint(config["ckpt"])
        self.dev = data.pick_device()  # this machine's choice, not the one it was trained on
        self.model, self.tokenizer, self.trained_with = tiger.model_from_checkpoint(
            self.saved, self.dev)
        self.ds = ds = data.load_dataset(self.trained_with["dataset"])
        self.unseen = data.unseen_items(ds, self.trained_with["cold_start"])  # cold start only
        fingerprint = tiger.ids_fingerprint(self.tokenizer.codes, ds, self.unseen)
        if fingerprint != self.saved["ids_fingerprint"]:
            raise data.InputError(
                f"{config['ckpt']} was trained on another version of dataset "
                f"{self.trained_with['dataset']} (its Semantic IDs do not fit it, or its items, "
                f"embeddings, sequences or unseen items differ); it cannot be scored on this one")
        check_driver_settings(config, self.unseen)
        _, valid, test = data.split(ds, self.unseen)
        self.examples = valid if config["split"] == "valid" else test
        self.beam = config["beam_size"] or self.trained_with["beam_size"]
        seen = np.flatnonzero(data.seen_items(ds, self.unseen)) + 1
        self.tables = tiger.PrefixTables(self.tokenizer, self.dev, seen)
        # the unseen items' candidates: prefixes of all items, and who is under them
        if len(self.unseen):
            self.all_tables = tiger.PrefixTables(self.tokenizer, self.dev)
            self.unseen_of_prefix = tiger.unseen_table(self.all_tables, self.tokenizer.codes,
                                                       self.unseen)
        self.user_tok = (self.tokenizer.user_tokens(ds.users) if self.trained_with["user_token"]
                         else None)
        self.autocast = tiger.make_autocast(self.dev, self.trained_with["precision"])
        self.generator = torch.Generator(device=self.dev).manual_seed(config["seed"])
        self.how = (f"{'constrained' if config['constrained'] else 'unconstrained'} "
                    + (f"sampling at temperature {config['temperature']}, {self.beam} items"
                       if config["temperature"] > 0 else f"beam search, beam {self.beam}"))

    @torch.no_grad()
    def recommend(self, batch, epsilon=0.0):
        """Ranked items of a batch (B, beam); with epsilon > 0 (cold start) the top (B, 10) with at
        most epsilon of them unseen (tiger.epsilon_top_k)."""
        tiger, c, enc = self.tiger, self.config, batch["enc"].to(self.dev)
        self.model.eval()
        with self.autocast():
            codes, scores = tiger.beam_search(self.model, enc, self.tables, self.beam,
                                              c["constrained"], c["temperature"], self.generator)
            items = tiger.ranked_items(self.tables, codes, scores)
            if epsilon > 0:
                new, new_scores = tiger.unseen_candidates(self.model, enc, self.all_tables,
                                                          self.unseen_of_prefix, self.beam)
                items = tiger.epsilon_top_k(items, scores, new, new_scores, 10, epsilon)
        return items.cpu()

    def result_path(self, prefix, suffix=""):
        """Where a driver writes its JSON: beside the checkpoint, named after what it scored."""
        stem = os.path.splitext(os.path.basename(self.config["ckpt"]))[0]   # best | ckpt
        return os.path.join(os.path.dirname(self.config["ckpt"]),
                            f"{prefix}_{stem}_{self.config['split']}_{suffix}.json")


def check_driver_settings(config, unseen):
    """The combinations of driver settings that cannot work, refused before any decoding."""
    if 0 < config["beam_size"] < 10:
        raise data.InputError(f"--beam_size must be >= 10 (the metrics go up to K = 10), or 0 for "
                              f"the checkpoint's own (got {config['beam_size']})")
    if (config["cold_start"] or config["epsilon"] > 0) and not len(unseen):
        raise data.InputError(f"{config['ckpt']} was not trained for cold start; --cold_start and "
                              f"--epsilon need a run of `python prepare.py --cold_start=0.05 && "
                              f"python tiger.py --cold_start=0.05`")
    if config["epsilon"] > 0 and not (config["history"] or config["demo"]):
        raise data.InputError("--epsilon applies to --history and --demo; to score a split with "
                              "unseen items use --cold_start (it sweeps epsilon)")
    if config["drop_history"] and (config["cold_start"] or config["history"] or config["demo"]
                                   or not config["constrained"]):
        raise data.InputError("--drop_history applies to scoring a split with constrained "
                              "decoding; leave out --cold_start, --history, --demo and "
                              "--constrained=False")
    if config["epsilon"] > 0 and config["temperature"] > 0:
        raise data.InputError("--epsilon merges rankings by log-probability, which a sampled "
                              "ranking (--temperature) does not have; give one of them")


def show(ds, tokenizer, header, history, top, target=None):
    """A learner's view: a history and its top-10, with titles and Semantic IDs."""
    def line(item):
        code = tuple(tokenizer.codes[item - 1].tolist())
        return f"    {item:6d}  {code!s:20s} {ds.items[item - 1].get('title', '(no title)')}"
    print(f"{header}: history (oldest first)")
    print("\n".join(line(i) for i in history))
    print("  top-10 recommendations" + (" (* = the held-out item)" if target is not None else ""))
    print("\n".join(line(i) + ("   *" if i == target else "") for i in top[:10] if i > 0))
    if target is not None:
        print(f"  held-out item:\n{line(target)}")
    print()


def parse_history(text, ds):
    """'B004756YJA,17,...' -> item ids (oldest first): each entry an item id or an ASIN."""
    by_asin = {it.get("asin"): it["item"] for it in ds.items}
    ids, unknown = [], []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        item = int(entry) if entry.isascii() and entry.isdigit() else by_asin.get(entry)
        if item is None or not 1 <= item <= ds.n_items:
            unknown.append(entry)
        else:
            ids.append(item)
    if unknown or not ids:
        raise data.InputError(f"--history: {', '.join(unknown) or 'nothing given'}: not an item id "
                              f"(1..{ds.n_items}) or an ASIN of {ds.name}")
    return np.array(ids, dtype=np.int64)


def recommend_history(sc):
    """--history: the top 10 for any history, as a user the model never saw (no user token)."""
    c = sc.config
    history = parse_history(c["history"], sc.ds)[-data.MAX_HISTORY:]
    one = data.Examples(user=np.zeros(1, np.int64), history=history[None],
                        length=np.array([len(history)]), target=history[-1:],
                        position=np.array([len(history)]))
    pad_user = torch.tensor([data.PAD]) if sc.user_tok is not None else None
    top = sc.recommend(data.make_batch(one, [0], sc.tokenizer, pad_user), c["epsilon"])[0].tolist()
    show(sc.ds, sc.tokenizer, f"{c['ckpt']}, {sc.how}", history, top)
    return top


def show_demo(sc):
    """--demo=N: N random users of the split, their histories and top 10."""
    c, ex = sc.config, sc.examples
    if c["demo"] > len(ex):
        raise data.InputError(f"--demo={c['demo']}, but the {c['split']} split has only "
                              f"{len(ex)} users")
    idx = np.random.default_rng(0).choice(len(ex), c["demo"], replace=False)
    top = sc.recommend(data.make_batch(ex, idx, sc.tokenizer, sc.user_tok), c["epsilon"])
    print(f"{c['ckpt']} (step {sc.saved['step']}), {sc.how} ({c['split']} users):\n")
    for j, i in enumerate(idx):
        show(sc.ds, sc.tokenizer, f"user {sc.ds.users[ex.user[i]]}", ex.history[i, :ex.length[i]],
             top[j].tolist(), ex.target[i])


def score_split(sc, argv):
    """The metrics of a whole split (Recall/NDCG, the diversity ones, Fig. 6's invalid IDs when
    unconstrained), Table 4's category mix, and most popular; written beside the checkpoint."""
    c = sc.config
    category, names = data.item_categories(sc.ds.items)   # Entropy@K; coverage and Gini need none
    result, items, targets = sc.tiger.evaluate(
        sc.model, sc.examples, sc.tokenizer, sc.user_tok, sc.tables, sc.beam,
        sc.trained_with["eval_batch_size"], sc.dev, constrained=c["constrained"],
        autocast=sc.autocast, temperature=c["temperature"], seed=c["seed"], category=category,
        return_items=True, drop_history=c["drop_history"])
    print(f"{c['ckpt']} (step {sc.saved['step']}) on {c['split']}, {sc.how}"
          + (", history items dropped:" if c["drop_history"] else ":"))
    for k, v in result.items():
        print(f"  {k:13s} {v:.4f}")
    mix = category_mix(items, targets, category, names) if names else []
    if mix:  # Table 4: what the users of the most common target categories are shown
        print("\n".join(["  categories of the top 10 (Table 4):"] + ["    " + m for m in mix]))
    popular = most_popular(sc.ds, sc.examples, sc.unseen, drop_history=c["drop_history"])
    print("  most popular: " + ", ".join(f"{k} {v:.4f}" for k, v in popular.items()))
    path = sc.result_path("eval", ("" if c["constrained"] else "free_") + f"beam{sc.beam}" + (
        f"_T{c['temperature']:g}_seed{c['seed']}" if c["temperature"] > 0 else "")
        + ("_nohistory" if c["drop_history"] else ""))
    data.write_json(path, {"metrics": result, "table4": mix, "most_popular": popular,
                           "checkpoint_step": sc.saved["step"],
                           "provenance": data.provenance("eval.py", list(argv), sc.dev)})
    print(f"  written to {path}")
    return result


def score_cold_start(sc, argv):
    """--cold_start: Fig. 5's protocol on one split (cold_start_recalls), decoded batch by batch,
    written beside the checkpoint and printed as a table."""
    tiger, ex, model = sc.tiger, sc.examples, sc.model
    order = np.argsort(ex.length, kind="stable")          # similar lengths batch together
    targets = torch.from_numpy(ex.target[order])
    is_cold = torch.from_numpy(np.isin(ex.target[order], sc.unseen))  # held-out item unseen
    if not (is_cold.any() and (~is_cold).any()):  # (a recall over no user would be NaN)
        raise data.InputError(f"no user of the {sc.config['split']} split has "
                              f"{'an unseen' if not is_cold.any() else 'a seen'} held-out item")
    bs = sc.trained_with["eval_batch_size"]
    seen, seen_scores, new, new_scores, level_logp = [], [], [], [], []
    model.eval()
    for start in tqdm(range(0, len(order), bs), desc="cold start"):
        batch = data.make_batch(ex, order[start:start + bs], sc.tokenizer, sc.user_tok)
        enc, target = batch["enc"].to(sc.dev), batch["target"].to(sc.dev)
        with torch.no_grad(), sc.autocast():
            codes, scores = tiger.beam_search(model, enc, sc.tables, sc.beam)
            seen.append(tiger.ranked_items(sc.tables, codes, scores).cpu())
            seen_scores.append(scores.float().cpu())
            items, item_scores = tiger.unseen_candidates(model, enc, sc.all_tables,
                                                         sc.unseen_of_prefix, sc.beam)
            new.append(items.cpu()), new_scores.append(item_scores.cpu())
            # where the model does or does not generalise: log p of each code of the held-out
            # item's ID given the codes before it (teacher forced), (B, L)
            h, _ = model(enc, batch["dec_in"].to(sc.dev))
            level_logp.append(torch.stack(
                [model.code_logprobs(h[:, l], l).gather(1, target[:, l:l + 1] - first)[:, 0]
                 for l, (first, _) in enumerate(model.config.levels)], 1).cpu())
    width = max(x.shape[1] for x in new)             # pad the batches' candidates to one width
    new = torch.cat([F.pad(x, (0, width - x.shape[1])) for x in new])
    new_scores = torch.cat([F.pad(x, (0, width - x.shape[1]), value=float("-inf"))
                            for x in new_scores])
    knn = {q: semantic_knn(sc.ds.item_emb, ex.history[order], ex.length[order], max(COLD_KS), q)
           for q in ("last", "mean")}
    groups = {"unseen_target": is_cold, "seen_target": ~is_cold}
    result = {"checkpoint": sc.config["ckpt"], "split": sc.config["split"], "beam_size": sc.beam,
              "ks": list(COLD_KS), "users": {g: int(m.sum()) for g, m in groups.items()},
              "n_unseen_items": len(sc.unseen),
              **cold_start_recalls(torch.cat(seen), torch.cat(seen_scores), new, new_scores,
                                   targets, is_cold, knn),
              "mean_log_p_per_level": {g: torch.cat(level_logp)[m].mean(0).tolist()
                                       for g, m in groups.items()},
              "provenance": data.provenance("eval.py", list(argv), sc.dev)}
    path = sc.result_path("cold_start", f"beam{sc.beam}")
    data.write_json(path, result)
    print_cold_start(result, sc, path)
    return result


def print_cold_start(result, sc, path):
    users = result["users"]
    print(f"{sc.config['ckpt']}, cold start on {sc.config['split']}: {len(sc.unseen)} unseen "
          f"items; {users['unseen_target']} users with an unseen held-out item, "
          f"{users['seen_target']} with a seen one; beam {sc.beam}")
    print(f"  {'':22s} {'unseen-target users: R@1':>25s} {'R@5':>7s} {'R@10':>7s} {'R@20':>7s}  "
          f"seen-target users: R@10")
    rows = [(f"TIGER, epsilon {e}", v) for e, v in result["tiger"].items()]
    rows += [(f"Semantic_KNN ({q})", v) for q, v in result["semantic_knn"].items()]
    for label, v in rows:
        u = v["unseen_target"]
        print(f"  {label:22s} {u[0]:25.4f} {u[4]:7.4f} {u[9]:7.4f} {u[19]:7.4f}  "
              f"{v['seen_target'][9]:.4f}")
    for g, v in result["mean_log_p_per_level"].items():
        print(f"  {g.replace('_', '-')} users: mean log p of the held-out item's codes, level by "
              f"level: " + ", ".join(f"{x:.2f}" for x in v))
    print(f"  written to {path}")


def main(argv):
    # The drivers need tiger.py (the model and its decoding), and tiger.py needs this file's
    # metrics: importing it here, not at the top, is what lets both files import each other.
    import tiger
    config = data.configure(DEFAULTS, argv)
    data.check_settings(config, RANGES)
    if config["report"]:
        return print_report(config["report"], tiger.DEFAULTS)
    if any(a.startswith("--history=") for a in argv) and not config["history"].strip(" ,"):
        raise data.InputError("--history is empty: give item ids or ASINs, comma-separated, "
                              "oldest first (--history=B004756YJA,17)")
    sc = Scorer(config)
    if config["cold_start"]:
        return score_cold_start(sc, argv)
    if config["history"]:
        return recommend_history(sc)
    if config["demo"] > 0:
        return show_demo(sc)
    return score_split(sc, argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except data.InputError as e:
        sys.exit(f"error: {e}")
