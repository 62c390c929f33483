"""How close a training step of the CPU default comes to the machine's matrix-product speed. A
measurement for the results log (issue #18 part 1), not part of nanoTIGER; it writes nothing.

    python prepare.py                                        # the default's Semantic IDs, once
    OMP_NUM_THREADS=1 python results/step_profile.py [--smoke]   # from the repo root

It prints (1) where a step's wall time goes, phase by phase (forward, backward, gradient clipping,
AdamW, the weight average), over the same Beauty batches as the default run's first ones; (2) the
floating-point work of the step's matrix products per example (torch's FlopCounterMode) and the rate
the step achieves in them; (3) the rate this core reaches on one large matrix product of the step's
most common shape alone, the ceiling for (2). --smoke: a few batches, to check the code.
"""
import contextlib
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import tiger

N_BATCHES = 4 if "--smoke" in sys.argv else 60

# ---- the default run's model, optimizer, weight average and first batches (tiger.train, without the run)
s = dict(tiger.DEFAULTS)
tiger.validate_settings(s)
ds = data.load_dataset(s["dataset"])
codes = data.load_codes(ds, s["ids"], s["out_dir"], s["dataset"], s["cold_start"], s["fit_with"])
tokenizer = data.Tokenizer(codes, s["n_user_buckets"])
user_tok = tokenizer.user_tokens(ds.users) if s["user_token"] else None
train_ex, _, _ = data.split(ds, [])
torch.manual_seed(s["seed"])
model = tiger.TIGER(tiger.model_config_for(tokenizer, s))
ema_model = copy.deepcopy(model)
opt = tiger.make_optimizer(model, s)
autocast = tiger.make_autocast("cpu", s["precision"])
order = data.epoch_batches(train_ex, s["batch_size"], [s["seed"], 0], s["by_length"])[:N_BATCHES]
batches = [data.make_batch(train_ex, idx, tokenizer, user_tok) for idx in order]
print(f"{len(batches)} batches of {s['batch_size']}; mean padded encoder length "
      f"{np.mean([b['enc'].shape[1] for b in batches]):.1f} tokens; {torch.get_num_threads()} thread(s); "
      f"{'float32' if autocast is contextlib.nullcontext else 'bf16 autocast'}")


def step(i, batch, clock):
    """tiger.train_step and update_ema, cut into phases; clock(name) closes the phase `name`."""
    enc = tiger.drop_input_tokens(batch["enc"], codes.shape[1], s["item_dropout"], s["user_dropout"],
                                  s["user_token"])
    with autocast():
        _, loss = model(enc, batch["dec_in"], batch["target"])
    clock("forward")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clock("backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
    clock("clip")
    opt.step()
    clock("AdamW")
    tiger.update_ema(ema_model, model, i, s["ema"])
    clock("weight average")


# ---- (1) wall time by phase: one untimed pass (first calls allocate), then one timed pass
phases = {}
for timed in (False, True):
    for i, batch in enumerate(batches):
        last = time.perf_counter()

        def clock(name):  # the phase `name` ends now
            global last
            now = time.perf_counter()
            if timed:
                phases[name] = phases.get(name, 0.0) + now - last
            last = now
        step(i, batch, clock)
wall = sum(phases.values())
print(f"training: {len(batches) * s['batch_size'] / wall:,.0f} examples/s; per step: " + ", ".join(
    f"{k} {v / len(batches) * 1e3:.1f} ms ({v / wall:.0%})" for k, v in phases.items()))

# ---- (2) the matrix products' work per example, and the rate the step runs them at
counter = FlopCounterMode(display=False)
with counter:
    for i, batch in enumerate(batches):
        step(i, batch, lambda name: None)
flop = counter.get_total_flops()
print(f"matrix products: {flop / len(batches) / s['batch_size'] / 1e6:.1f} MFLOP per example (forward + "
      f"backward); the step runs them at {flop / wall / 1e9:.0f} GFLOP/s averaged over its wall time")

# ---- (3) the ceiling: one matrix product of the step's most common shape (tokens x d_model @ d_model x d_ff)
rows = int(np.mean([b["enc"].numel() for b in batches]))
for dtype in (torch.bfloat16, torch.float32):
    a, b = torch.randn(rows, s["d_model"], dtype=dtype), torch.randn(s["d_model"], s["d_ff"], dtype=dtype)
    a @ b
    t, n = time.perf_counter(), 50
    for _ in range(n):
        a @ b
    rate = 2 * rows * s["d_model"] * s["d_ff"] * n / (time.perf_counter() - t) / 1e9
    print(f"one ({rows} x {s['d_model']}) @ ({s['d_model']} x {s['d_ff']}) product alone, {dtype}: "
          f"{rate:.0f} GFLOP/s")
