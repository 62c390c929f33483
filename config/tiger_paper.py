# TIGER's sequence-to-sequence model exactly as the paper states it (Sec. 4), for a GPU:
#   python prepare.py --ids=rqvae && python tiger.py config/tiger_paper.py
# (or the paper's RQ-VAE recipe too: python prepare.py config/rqvae_paper.py, also for a GPU)
# 4 + 4 layers, 6 heads of 64, model dimension 128, MLP 1024, dropout 0.1, batch 256,
# learning rate 0.01 for 10k steps then inverse square root decay, 200k steps, T5X's Adafactor.
ids = "rqvae"          # the paper's Semantic IDs (Sec. 3.1): python prepare.py config/rqvae_paper.py first
run = "paper"          # its own run folder
n_layer = 4
n_head = 6
head_dim = 64
d_model = 128
d_ff = 1024
dropout = 0.1
user_token = True      # the encoder reads the user token first (Sec. 4)
ema = 0.0              # the paper averages no weights
item_dropout = 0.0     # nor hides history items
user_dropout = 0.0     # or the user token
softmax = "full"       # T5X's softmax over the whole vocabulary (the paper does not say otherwise)
batch_size = 256
optimizer = "adafactor"
lr = 0.01
schedule = "rsqrt"
warmup_steps = 10000
max_steps = 200000
eval_every = 5000
eval_users = 0
patience = 5
