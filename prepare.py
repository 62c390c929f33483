"""
prepare.py -- everything before training: item embeddings -> Semantic IDs -> files tiger.py reads.

    python prepare.py                          # Beauty, RQ-VAE Semantic IDs (the paper's method)
    python prepare.py --dataset=toys --ids=lsh # another dataset, a baseline ID scheme of Table 2
    python prepare.py --force                  # rebuild even if the artefacts are up to date

It writes into out/<dataset>/<ids>/:
    codes.npy    (n_items, L) int64, row i = the Semantic ID of item id i+1, collision token last
    stats.json   codebook usage, perplexity, collisions, category structure (Fig. 4)
    rqvae.pt     the trained RQ-VAE weights (state_dict; --ids=rqvae only)
    config.json  the settings that made them, written last: a folder without it is unfinished
Each file is written to a temporary name in the same folder and renamed, so a crash never leaves a
half-written file under the real name. A second run with the same settings checks the files and
reuses them; changed settings, a changed embedding file, a corrupt file or --force rebuild them.
The algorithms live in rqvae.py; this script is the orchestration.
"""
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

import data
import rqvae

# ----------------------------------------------------------------------------------------------
# Config. The ID settings (dataset, ids, seed, the RQ-VAE and baseline hyperparameters, with their
# paper values) are the globals at the top of rqvae.py; they are settings of this script too.

out_dir = 'out'           # artefacts go to out_dir/<dataset>/<ids>/
force = False             # rebuild even when the artefacts match the settings
DEFAULTS = {**{k: getattr(rqvae, k) for k in rqvae.CONFIG_KEYS}, 'out_dir': out_dir, 'force': force}
device = rqvae.device

# ----------------------------------------------------------------------------------------------
# Writing files atomically: a temporary file in the destination folder (same file system, so the
# rename is atomic), then os.replace over the real name.

def write_atomic(path, write):
    """write(f) fills an open binary file; it appears under path only once complete."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-' + os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so even a power cut leaves old or new
        os.chmod(tmp, 0o644)    # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + '\n').encode()))


def scheme_config(config, emb):
    """The settings that decide the IDs: the dataset (and a fingerprint of its embedding file),
    the scheme, the seed, and that scheme's hyperparameters. Settings of other schemes are left
    out, so --lr=0.1 does not rebuild the LSH IDs."""
    keys = ['dataset', 'ids', 'seed'] + rqvae.SCHEME_KEYS[config['ids']]
    return {**{k: config[k] for k in keys}, 'n_items': int(len(emb)),
            'item_emb_md5': md5(emb)}


def md5(array):
    return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()

# ----------------------------------------------------------------------------------------------
# Reading the codes back (tiger.py calls load_codes). Every check that fails says how to fix it.

def load_codes(dataset, ids='rqvae', out_dir='out', n_items=None):
    """The (n_items, L) int64 Semantic-ID table of a dataset and scheme, validated.
    n_items: the number of items of the dataset (loaded from data/<dataset> when None)."""
    folder = os.path.join(out_dir, os.path.basename(os.path.normpath(dataset)), ids)
    fix = f"run `python prepare.py --dataset={dataset} --ids={ids}`"
    paths = {f: os.path.join(folder, f) for f in ('codes.npy', 'config.json')}
    for f, p in paths.items():
        if not os.path.isfile(p):
            raise data.InputError(f"{p} is missing (the Semantic IDs are not built, or the build did not "
                                  f"finish); {fix}")
    try:
        with open(paths['config.json'], encoding='utf-8') as f:
            cfg = json.load(f)
        sizes = rqvae.level_sizes(cfg)
    except (ValueError, KeyError, TypeError, data.InputError) as e:
        raise data.InputError(f"{paths['config.json']} is corrupt ({e!r}); {fix} --force")
    try:
        codes = np.load(paths['codes.npy'], allow_pickle=False)     # never unpickle
    except Exception as e:
        raise data.InputError(f"{paths['codes.npy']} cannot be read ({e}); {fix} --force")
    if n_items is None:
        n_items = data.load_dataset(dataset).n_items
    problem = None
    if (cfg['ids'], cfg.get('dataset')) != (ids, os.path.basename(os.path.normpath(dataset))):
        problem = f"the folder holds {cfg['ids']} IDs of {cfg.get('dataset')} (config.json)"
    elif codes.dtype != np.int64 or codes.ndim != 2:
        problem = f"expected a 2-d int64 array, got {codes.ndim}-d {codes.dtype}"
    elif codes.shape != (n_items, len(sizes)):
        problem = f"shape {codes.shape}, expected ({n_items}, {len(sizes)}) for {n_items} items and {ids} IDs"
    elif (codes < 0).any() or (codes >= np.array(sizes)).any():
        problem = f"codes out of range; level sizes are {sizes}"
    elif len(np.unique(codes, axis=0)) != n_items:
        problem = f"{n_items - len(np.unique(codes, axis=0))} duplicate IDs; every item needs its own"
    if problem:
        raise data.InputError(f"{paths['codes.npy']}: {problem}; {fix} --force")
    return codes


def check_artefacts(folder, want, emb):
    """Why the artefacts in folder cannot be reused for the settings want (a string), or None."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        return 'no finished build there'
    try:
        with open(path, encoding='utf-8') as f:
            have = json.load(f)
    except ValueError:
        return 'config.json is corrupt'
    if not isinstance(have, dict):
        return 'config.json is corrupt'
    if have != want:
        changed = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        return f"the settings changed ({', '.join(changed)})"
    try:
        codes = load_codes(want['dataset'], want['ids'], os.path.dirname(os.path.dirname(folder)), len(emb))
        with open(os.path.join(folder, 'stats.json'), encoding='utf-8') as f:
            stats = json.load(f)
    except (data.InputError, OSError, ValueError) as e:
        return str(e).split('; run')[0]
    if not isinstance(stats, dict) or stats.get('codes_md5') != md5(codes):
        return 'codes.npy is not the table this build wrote (its checksum differs from stats.json)'
    if want['ids'] == 'rqvae':
        # the weights must load into the configured model and give back the very same codes
        try:
            model = rqvae.build_model(want, emb.shape[1])
            model.load_state_dict(torch.load(os.path.join(folder, 'rqvae.pt'), map_location='cpu',
                                             weights_only=True))
        except Exception as e:
            return f'rqvae.pt cannot be loaded ({type(e).__name__})'
        # (a GPU and a CPU may round a near-tie differently: allow a few rows in a thousand to differ)
        differ = (rqvae.rqvae_codes(model.eval(), emb)[0] != codes[:, :-1]).any(1).mean()
        if differ > 0.001:
            return f'rqvae.pt does not reproduce codes.npy ({differ:.1%} of the items get other codes)'
    return None

# ----------------------------------------------------------------------------------------------
# The job: load, check what is there, build if needed, write, report.

def main(argv):
    """Run prepare with command-line arguments argv. Returns (codes, stats, reused)."""
    config = data.configure(DEFAULTS, argv)
    torch.manual_seed(config['seed'])
    np.random.seed(config['seed'])
    ds = data.load_dataset(config['dataset'])
    if config['ids'] not in rqvae.SCHEME_KEYS:
        raise data.InputError(f"unknown ID scheme '{config['ids']}'; use --ids=rqvae, rqkmeans, lsh or random")
    want = scheme_config({**config, 'dataset': ds.name}, ds.item_emb)
    folder = os.path.join(config['out_dir'], ds.name, config['ids'])
    os.makedirs(folder, exist_ok=True)

    reason = 'forced with --force' if config['force'] else check_artefacts(folder, want, ds.item_emb)
    if reason is None:
        print(f"reusing the {config['ids']} IDs in {folder} (same settings; --force rebuilds)")
        codes = load_codes(ds.name, config['ids'], config['out_dir'], ds.n_items)
        with open(os.path.join(folder, 'stats.json'), encoding='utf-8') as f:
            stats = json.load(f)
        rqvae.report(config['ids'], stats)
        return codes, stats, True

    print(f"building the {config['ids']} IDs for {ds.name} ({ds.n_items} items) in {folder}: {reason}")
    t0 = time.time()
    codes, extra, model = rqvae.make_ids(ds.item_emb, want, device)
    stats = {**rqvae.all_stats(codes, want, extra, ds.items), 'build_seconds': round(time.time() - t0, 1),
             'device': device, 'codes_md5': md5(codes)}   # ties stats.json to this very codes.npy
    # config.json goes first (removed) and last (written): a folder holding it is a finished build
    if os.path.exists(os.path.join(folder, 'config.json')):
        os.remove(os.path.join(folder, 'config.json'))
    write_atomic(os.path.join(folder, 'codes.npy'), lambda f: np.save(f, codes, allow_pickle=False))
    write_json(os.path.join(folder, 'stats.json'), stats)
    if model is not None:
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        write_atomic(os.path.join(folder, 'rqvae.pt'), lambda f: torch.save(state, f))
    write_json(os.path.join(folder, 'config.json'), want)
    rqvae.report(config['ids'], stats)
    print(f"wrote {folder} in {time.time() - t0:.0f} s")
    return codes, stats, False


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except data.InputError as e:
        sys.exit(f'error: {e}')
