# The long CPU recipe (issue #18 part 3): the CPU default's recipe, one more layer on each side,
# three times the steps.
#   python prepare.py && python tiger.py config/tiger_cpu_long.py
# About 70 minutes with two threads on the project's 2-core CPU. Its best checkpoint, chosen on
# validation, is kept; the README has its numbers beside the paper's, results/README.md how it was chosen.
run = "long"           # its own run folder, beside the main job's
n_layer = 3            # the default: 2 (+1 layer each side ~1.35x the time per step)
max_steps = 36000      # the default: 12,000; the cosine schedule stretches over all of them
eval_every = 6000      # 6 validation passes (the default: one every 3,000 steps)
