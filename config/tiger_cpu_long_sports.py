# The long CPU recipe for Sports (issue #26): the long recipe (config/tiger_cpu_long.py) with a third
# more steps, chosen on Sports' validation split (Sports has 1.6x Beauty's training examples, and at
# 36,000 steps its validation Recall@10 was still rising; results/README.md, 2026-12-06).
#   python prepare.py --dataset=sports && python tiger.py config/tiger_cpu_long_sports.py
# About 75 minutes with one thread beside another run on the project's 2-core CPU.
dataset = "sports"
run = "long48k"        # its own run folder, beside the 36,000-step one ("long")
n_layer = 3            # as the long recipe
max_steps = 48000      # the long recipe: 36,000; the cosine schedule stretches over all of them
eval_every = 6000      # 8 validation passes
