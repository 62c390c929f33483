# The RQ-VAE exactly as the paper trains it (Sec. 4, "RQ-VAE Implementation Details"): Adagrad with
# learning rate 0.4 for 20k epochs, no dead-code reset. Meant for a GPU (about 240k steps):
#   python prepare.py config/rqvae_paper.py
# In our CPU test this optimizer setting diverged within 20 epochs (results/README.md); it is here so
# the paper's recipe can be run as written.
ids = 'rqvae'          # the CPU default is rqkmeans; the paper's IDs come from the RQ-VAE
optimizer = 'adagrad'
lr = 0.4
n_epochs = 20000
reset_dead_codes = False
