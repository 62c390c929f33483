# The long CPU recipe (issue #18 part 3): the CPU default's model, four times the steps.
#   python prepare.py && python tiger.py config/tiger_cpu_long.py
# About 100 minutes with one thread beside another run on the project's 2-core CPU (less with two
# threads alone). Validation peaked at 30k of the 48k steps, where its best checkpoint is kept;
# the README has its numbers beside the paper's, results/README.md the learning curve.
run = "long"           # its own run folder, beside the main job's
max_steps = 48000      # the default: 12,000; the cosine schedule stretches over all of them
eval_every = 6000      # 8 validation passes, as many as the default's 4 cost twice
user_token = True      # as measured: the user token, hidden in half the training examples (the CPU
user_dropout = 0.5     # default when it ran; the history-only encoder won on validation later)
