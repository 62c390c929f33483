"""
eval.py -- how TIGER is measured (paper Sec. 4, "Evaluation Metrics"), pure functions first.

Leave-one-out: each user has exactly one held-out item; the model ranks the full catalogue (beam search
over Semantic IDs returns a ranked list of items), and
  Recall@K = share of users whose held-out item is in the top K
  NDCG@K   = mean over users of 1 / log2(rank + 1) if rank <= K else 0   (one relevant item, so IDCG = 1)
Also: the invalid-ID rate of unconstrained decoding (the paper's Fig. 6) and a most-popular baseline.

Drivers after the functions:
  python eval.py --ckpt=out/beauty/rqvae/tiger/best.pt [--split=test] [--constrained=False]
  python eval.py --ckpt=... --demo=3      # show 3 users' histories and their top-10 with titles and IDs
  python eval.py --ckpt=... --split=valid --beam_size=80   # the same checkpoint decoded with a wider beam
"""
import contextlib
import sys

import numpy as np
import torch
from tqdm import tqdm

import data

KS = (5, 10, 20)


# ----------------------------------------------------------------------------------------------
# Pure metric functions

def ranks_of(ranked, targets):
    """ranked: (N, K) item ids, best first; targets: (N,). Returns (N,) 1-based rank, 0 when missing."""
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


def most_popular(dataset, examples, k=max(KS)):
    """The most-popular baseline: every user gets the k items with most training interactions
    (each user's sequence without its last two items, so nothing of validation or test is counted)."""
    counts = np.zeros(dataset.n_items + 1, dtype=np.int64)
    for seq in dataset.sequences:
        np.add.at(counts, seq[:-2], 1)
    top = np.argsort(-counts[1:], kind="stable")[:k] + 1
    return recall_ndcg(ranks_of(np.tile(top, (len(examples), 1)), examples.target))


# ----------------------------------------------------------------------------------------------
# The evaluation loop: beam search for every user of a split, then the metrics.

@torch.no_grad()
def evaluate(model, examples, tokenizer, user_tok, tables, beam_size, batch_size, device,
             constrained=True, limit=0, progress=True, autocast=contextlib.nullcontext):
    """Metrics of `model` on `examples` (validation or test). limit > 0 uses a fixed random subset of
    `limit` examples for cheap model selection during training (random: the users early in the file
    have longer histories than the average user). Returns a dict."""
    model.eval()
    subset = np.arange(len(examples))
    if 0 < limit < len(examples):
        subset = np.sort(np.random.default_rng(0).choice(len(examples), limit, replace=False))
    order = subset[np.argsort(examples.length[subset], kind="stable")]  # similar lengths together: less padding
    all_items, all_targets = [], []
    bar = tqdm(range(0, len(order), batch_size), desc="eval", leave=False, disable=not progress)
    for start in bar:
        batch = data.make_batch(examples, order[start:start + batch_size], tokenizer, user_tok)
        with autocast():  # bf16 where tiger.make_autocast chose it, else nothing
            codes, scores = model.beam_search(batch["enc"].to(device), tables, beam_size, constrained)
        items = tables.items_of(codes)                                   # (B, beam), 0 = no item
        items = torch.where(torch.isfinite(scores), items, torch.zeros_like(items))
        all_items.append(items.cpu())
        all_targets.append(batch["target_item"])
    items, targets = torch.cat(all_items), torch.cat(all_targets)
    metrics = recall_ndcg(ranks_of(items, targets), [k for k in KS if k <= beam_size])
    if not constrained:
        metrics["invalid_rate"] = invalid_rate(items)
    model.train()
    return metrics


# ----------------------------------------------------------------------------------------------
# Drivers: evaluate a checkpoint, or show what it recommends.

ckpt = "out/beauty/rqvae/tiger/best.pt"  # a checkpoint written by tiger.py
split = "test"            # valid | test
constrained = True        # False: unconstrained beam search, and report the invalid-ID rate (Fig. 6)
demo = 0                  # > 0: print this many users' histories and top-10 instead of the metrics
beam_size = 0             # > 0: decode with this many beams instead of the checkpoint's (to compare widths)
CONFIG = {"ckpt": ckpt, "split": split, "constrained": constrained, "demo": demo, "beam_size": beam_size}


def show(ds, tokenizer, user, history, top, target):
    """A learner's view: a user's history and top-10, with titles and Semantic IDs."""
    def line(item):
        return f"    {item:6d}  {tuple(tokenizer.codes[item - 1].tolist())!s:20s} {ds.items[item - 1]['title']}"
    print(f"user {ds.users[user]}: history (oldest first)")
    print("\n".join(line(i) for i in history))
    print("  top-10 recommendations (* = the held-out item)")
    print("\n".join(line(i) + ("   *" if i == target else "") for i in top[:10] if i > 0))
    print(f"  held-out item:\n{line(target)}\n")


def main(argv):
    import tiger  # imported here: tiger.py imports this file for its metrics
    config = data.configure(CONFIG, argv)
    if config["split"] not in ("valid", "test"):
        raise data.InputError(f"--split must be valid or test (got {config['split']!r})")
    if config["beam_size"] < 0:
        raise data.InputError(f"--beam_size must be > 0, or 0 for the checkpoint's (got {config['beam_size']})")
    saved = tiger.load_checkpoint(config["ckpt"])
    # the device is this machine's choice, not the one the checkpoint was trained on
    run_config = {**saved["config"], "device": "auto"}
    if config["beam_size"] > 0:
        run_config["beam_size"] = config["beam_size"]
    ds, (_, valid, test), tokenizer, user_tok, tables, model, dev = tiger.build(run_config, saved)
    examples = valid if config["split"] == "valid" else test
    autocast = tiger.make_autocast(dev)  # the precision the model was trained with, where this machine has it
    if config["demo"] > 0:
        model.eval()
        idx = np.random.default_rng(0).choice(len(examples), config["demo"], replace=False)
        batch = data.make_batch(examples, idx, tokenizer, user_tok)
        with autocast():
            codes, _ = model.beam_search(batch["enc"].to(dev), tables, tiger.beam_size)
        top = tables.items_of(codes).cpu()
        for j, i in enumerate(idx):
            show(ds, tokenizer, examples.user[i], examples.history[i, :examples.length[i]], top[j].tolist(),
                 examples.target[i])
        return None
    metrics = evaluate(model, examples, tokenizer, user_tok, tables, tiger.beam_size, tiger.eval_batch_size,
                       dev, constrained=config["constrained"], autocast=autocast)
    print(f"{config['ckpt']} (step {saved['step']}) on {config['split']}, "
          f"{'constrained' if config['constrained'] else 'unconstrained'} beam search, beam {tiger.beam_size}:")
    for k, v in metrics.items():
        print(f"  {k:13s} {v:.4f}")
    print(f"  most popular: " + ", ".join(f"{k} {v:.4f}" for k, v in most_popular(ds, examples).items()))
    return metrics


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except data.InputError as e:
        sys.exit(f"error: {e}")
