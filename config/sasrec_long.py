# SASRec's longer budget (issue #30): as long as TIGER's long CPU recipe may train (config/
# tiger_cpu_long.py), with twice the width. Chosen on Beauty's validation split against the default
# (d_model 64) and against the same model on a cosine schedule that uses all of a 36,000-step budget
# (results/README.md, 2026-12-06 (4)); early stopping ends it when validation stops improving.
#   python baselines/sasrec.py config/sasrec_long.py [--dataset=sports]
run = "long"           # its own run folder, beside the default's ("ce")
d_model = 128          # the default: 64 (the paper: 50)
max_steps = 60000      # the default: 24,000; an upper bound, about TIGER's long recipe's hour and more
patience = 10          # the default: 5; a wider model's validation is noisier from check to check
