"""nanoTIGER's hand-written T5-style model vs HuggingFace T5ForConditionalGeneration, at the TIGER
paper's dimensions (config/tiger_paper.py), on CPU: training examples/s, constrained beam-search
evaluation users/s (beam 20), parameters. A measurement for the results log (2026-11-30 entry), not
part of nanoTIGER: transformers lives in a throwaway environment, never in requirements.txt.

    python -m venv --system-site-packages /tmp/hf && /tmp/hf/bin/pip install transformers
    OMP_NUM_THREADS=1 /tmp/hf/bin/python results/hf_t5_speed.py [--smoke] [--hf_adamw]   # from the repo root

Nothing is written. --smoke: a tiny run (1 step per round, 16 users) to check the code.
"""
import ast
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import numpy as np
import torch

import data
import tiger
import transformers
from transformers import T5Config, T5ForConditionalGeneration

SMOKE = "--smoke" in sys.argv
HF_OPT = "adamw" if "--hf_adamw" in sys.argv else "same"   # default: the same optimizer as nanoTIGER
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
WARMUP, ROUNDS, STEPS = (1, 1, 1) if SMOKE else (2, 3, 5)
EVAL_USERS, EVAL_ROUNDS, BEAM = (16, 1, 20) if SMOKE else (128, 2, 20)

# ---- settings: tiger.DEFAULTS updated with config/tiger_paper.py (read as literals, like data.configure)
settings = dict(tiger.DEFAULTS)
with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "tiger_paper.py")) as f:
    for node in ast.parse(f.read()).body:
        settings[node.targets[0].id] = ast.literal_eval(node.value)
settings["device"], settings["precision"] = "cpu", "bf16"
tiger.validate_settings(settings)

ds = data.load_dataset("beauty")
codes = data.load_codes(ds)  # run from the repo root, after python prepare.py
tok = data.Tokenizer(codes, settings["n_user_buckets"])
user_tok = tok.user_tokens(ds.users)
train_ex, valid, test = data.split(ds)
autocast = tiger.make_autocast("cpu", "bf16")

# ---- 1. nanoTIGER
torch.manual_seed(settings["seed"])
nt = tiger.TIGER(tiger.model_config_for(tok, settings))
nt_opt = tiger.make_optimizer(nt, settings)

# ---- 2. HF T5, same shape
hf_cfg = T5Config(vocab_size=tok.vocab_size, d_model=settings["d_model"], d_kv=settings["head_dim"],
                  num_heads=settings["n_head"], d_ff=settings["d_ff"], num_layers=settings["n_layer"],
                  num_decoder_layers=settings["n_layer"], relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, dropout_rate=settings["dropout"],
                  feed_forward_proj="relu", pad_token_id=0, decoder_start_token_id=1,
                  tie_word_embeddings=False)
torch.manual_seed(settings["seed"])
hf = T5ForConditionalGeneration(hf_cfg)
# transformers 5.x forces T5Config.tie_word_embeddings to True (huggingface/transformers#42815): the
# kwarg False now only means scale_decoder_outputs=False (T5 v1.1), and lm_head stays tied to `shared`.
# Setting config.tie_word_embeddings=False after the fact unties *all four* tables (shared, encoder,
# decoder embeddings, lm_head), which is not T5 either. So untie just the output layer by hand:
# one input table shared by encoder and decoder + a separate lm_head, as T5 v1.1 and nanoTIGER have.
assert hf.lm_head.weight is hf.shared.weight and not hf_cfg.scale_decoder_outputs
hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.shared.weight).normal_(0.0, hf_cfg.initializer_factor))
assert hf.encoder.embed_tokens.weight is hf.shared.weight and hf.decoder.embed_tokens.weight is hf.shared.weight
if HF_OPT == "adamw":
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3)
else:
    hf_opt = tiger.make_optimizer(hf, settings)

n_nt = sum(p.numel() for p in nt.parameters())
n_hf = sum(p.numel() for p in hf.parameters())
print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
      f"HF attention implementation: {hf.config._attn_implementation}")
print(f"settings: n_layer {settings['n_layer']} n_head {settings['n_head']} head_dim {settings['head_dim']} "
      f"d_model {settings['d_model']} d_ff {settings['d_ff']} dropout {settings['dropout']} softmax "
      f"{settings['softmax']} optimizer {settings['optimizer']} item/user dropout "
      f"{settings['item_dropout']}/{settings['user_dropout']}; vocab {tok.vocab_size}, levels {tok.levels}")
print(f"optimizers: nanoTIGER {type(nt_opt).__name__}, HF {type(hf_opt).__name__}")
print(f"parameters: nanoTIGER {n_nt:,}  HF T5 {n_hf:,}")


# ---- 3. training
def hf_step(model, opt, b, step):
    for group in opt.param_groups:   # the same per-step lr bookkeeping as tiger.train_step
        group["lr"] = tiger.get_lr(step, settings["lr"], settings["warmup_steps"], settings["max_steps"],
                                   settings["schedule"])
    enc = b["enc"]
    with autocast():
        out = model(input_ids=enc, attention_mask=(enc != data.PAD), decoder_input_ids=b["dec_in"],
                    labels=b["target"])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])  # as tiger.train_step
    opt.step()
    return out.loss


batches = data.epoch_batches(train_ex, 256, [0, 0], True)
batch = lambda i: data.make_batch(train_ex, batches[i], tok, user_tok)
steppers = {
    "nanoTIGER": lambda b, i: tiger.train_step(nt, nt_opt, b, i, settings, "cpu", autocast),
    "HF T5": lambda b, i: hf_step(hf, hf_opt, b, i),
}
nt.train(), hf.train()
for name, stepper in steppers.items():
    for i in range(WARMUP):
        loss = stepper(batch(i), i)
    print(f"warm-up {name}: loss {loss.item():.3f}")
train_speed = {name: [] for name in steppers}
for r in range(ROUNDS):
    idx = [WARMUP + r * STEPS + j for j in range(STEPS)]           # the same batches for both models
    bs = [batch(i) for i in idx]                                     # built outside the timed region
    n_ex = sum(len(b["target"]) for b in bs)
    tokens = sum(b["enc"].numel() for b in bs)
    for name, stepper in steppers.items():
        t = time.perf_counter()
        for i, b in zip(idx, bs):
            stepper(b, i)
        dt = time.perf_counter() - t
        train_speed[name].append(n_ex / dt)
        print(f"train round {r + 1}: {name:9s} {n_ex / dt:8.1f} examples/s  ({STEPS} steps, {n_ex} examples, "
              f"{tokens} encoder tokens incl. padding, {dt:.2f} s)", flush=True)

# optimizer step alone (the brief's AdamW for HF vs the paper's Adafactor): is it a confound?
opt_ms = {}
for name, make in (("Adafactor", lambda p: torch.optim.Adafactor(p, lr=0.01)),
                   ("AdamW", lambda p: torch.optim.AdamW(p, lr=1e-3))):
    o = make(hf.parameters())
    for p in hf.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    o.step()
    t = time.perf_counter()
    for _ in range(5):
        o.step()
    opt_ms[name] = (time.perf_counter() - t) / 5 * 1e3
    del o
hf.zero_grad(set_to_none=True)
print("optimizer step alone on HF's parameters: " + ", ".join(f"{k} {v:.1f} ms" for k, v in opt_ms.items()))

# ---- 4. constrained beam search, the same users
tables = tiger.PrefixTables(tok)
# the subset tiger.evaluate picks for limit=EVAL_USERS (a fixed random one), in its order
subset = np.sort(np.random.default_rng(0).choice(len(valid), EVAL_USERS, replace=False))
order = subset[np.argsort(valid.length[subset], kind="stable")]

trie = {}   # decoder prefix (starting with decoder_start 1) -> allowed next tokens
for row in tok.item_tokens[1:].tolist():
    for l in range(len(row)):
        trie.setdefault((data.BOS, *row[:l]), set()).add(row[l])
trie = {k: sorted(v) for k, v in trie.items()}
item_of_tokens = {tuple(row): i + 1 for i, row in enumerate(tok.item_tokens[1:].tolist())}


def allowed(batch_id, input_ids):
    return trie.get(tuple(input_ids.tolist()), [])


def nt_eval():
    metrics, items, _ = tiger.evaluate(nt, valid, tok, user_tok, tables, BEAM, 128, "cpu", limit=EVAL_USERS,
                                       progress=False, autocast=autocast, return_items=True)
    return items


@torch.no_grad()
def hf_eval():
    hf.eval()
    out = []
    for start in range(0, len(order), 128):
        b = data.make_batch(valid, order[start:start + 128], tok, user_tok)
        enc = b["enc"]
        with autocast():
            seq = hf.generate(input_ids=enc, attention_mask=(enc != data.PAD), num_beams=BEAM,
                              num_return_sequences=BEAM, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              prefix_allowed_tokens_fn=allowed)
        out.append(tables.items_of(seq[:, 1:] - torch.tensor(tok.level_offset)).view(len(enc), BEAM))
    hf.train()
    return seq, torch.cat(out)


eval_speed = {"nanoTIGER": [], "HF T5": []}
for r in range(EVAL_ROUNDS + 1):   # round 0: warm-up (and the validity check)
    for name, fn in (("nanoTIGER", nt_eval), ("HF T5", hf_eval)):
        t = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t
        if r == 0:
            if name == "nanoTIGER":
                print(f"check nanoTIGER: {res.shape} rankings, all real items: {bool((res > 0).all())}")
            else:
                seq, items = res
                print(f"check HF: sequences {tuple(seq.shape)}, first beams of the last batch's first user: "
                      f"{seq[:3].tolist()}")
                ids = [tuple(s) for s in seq[:, 1:].tolist()]
                real = [i in item_of_tokens for i in ids]
                print(f"check HF: last batch: {sum(real)}/{len(real)} returned IDs are real items; "
                      f"distinct per user: {all(len(set(ids[u * BEAM:(u + 1) * BEAM])) == BEAM for u in range(len(ids) // BEAM))}; "
                      f"all {tuple(items.shape)} rankings real items: {bool((items > 0).all())}")
            print(f"eval warm-up {name}: {EVAL_USERS / dt:.1f} users/s ({dt:.2f} s)", flush=True)
            continue
        eval_speed[name].append(EVAL_USERS / dt)
        print(f"eval round {r}: {name:9s} {EVAL_USERS / dt:8.1f} users/s ({EVAL_USERS} users, beam {BEAM}, "
              f"{dt:.2f} s)", flush=True)

assert hf.lm_head.weight is not hf.shared.weight  # still untied after training and generate
print("\nsummary (median over rounds)")
med = {k: statistics.median(v) for k, v in train_speed.items()}
emed = {k: statistics.median(v) for k, v in eval_speed.items()}
print("| model | training examples/s (per round) | median | eval users/s (per round) | median | parameters |")
for name, n in (("nanoTIGER", n_nt), ("HF T5", n_hf)):
    print(f"| {name} | {', '.join(f'{x:.0f}' for x in train_speed[name])} | {med[name]:.0f} | "
          f"{', '.join(f'{x:.1f}' for x in eval_speed[name])} | {emed[name]:.1f} | {n:,} |")
print(f"ratio nanoTIGER / HF: training {med['nanoTIGER'] / med['HF T5']:.2f}x, "
      f"evaluation {emed['nanoTIGER'] / emed['HF T5']:.2f}x, parameters {n_nt / n_hf:.3f}")
print(f"process CPU time {time.process_time():.0f} s")
