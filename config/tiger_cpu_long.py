# The long CPU recipe (issue #18 part 3): the CPU default's model and settings, four times the steps.
# At most about 2 hours on a 2-core CPU (prepare.py takes a minute more):
#   python prepare.py && python tiger.py config/tiger_cpu_long.py
# Its numbers, and how it was chosen (on validation), are in the README and results/README.md.
run = "long"           # its own run folder, beside the main job's
max_steps = 48000      # the default: 12,000; the cosine schedule stretches over all of them
eval_every = 6000      # 8 validation passes, as many as the default's 4 cost twice
user_token = True      # as measured: the user token, hidden in half the training examples (the
user_dropout = 0.5     # CPU default before the history-only encoder won on validation)
