# SASRec's longer budget (issue #30): about the time of TIGER's long CPU recipe (config/
# tiger_cpu_long.py), spent on twice the width and a schedule that ends. Chosen on Beauty's validation
# split against the default (d_model 64, constant lr, early stopping) and against d_model 128 with the
# default's schedule (results/README.md, 2026-12-06 (4)).
#   python baselines/sasrec.py config/sasrec_long.py [--dataset=toys]
run = "long"           # its own run folder, beside the default's ("ce")
d_model = 128          # the default: 64 (the paper: 50)
schedule = "cosine"    # the default: constant; the learning rate falls to 0 at max_steps
max_steps = 36000      # the default: 24,000 at most (TIGER's long recipe: 36,000)
patience = 40          # more than the run's 36 validation passes: no early stop, the schedule ends
