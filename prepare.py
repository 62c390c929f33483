"""
prepare.py -- everything before training: item embeddings -> Semantic IDs -> files tiger.py reads.

    python prepare.py                          # Beauty, RQ-KMeans Semantic IDs (the CPU default)
    python prepare.py --ids=rqvae              # the paper's RQ-VAE Semantic IDs (Sec. 3.1)
    python prepare.py --dataset=toys --ids=lsh # another dataset, a baseline ID scheme of Table 2
    python prepare.py --force                  # rebuild even if the artefacts are up to date
    python prepare.py --cold_start=0.05        # the cold-start experiment's IDs (Sec. 4.3), fitted
                                               # without 5% of the test targets:
                                               # out/beauty/rqkmeans-cold0.05/
    python prepare.py --fit_with=sports,toys   # App. E (Table 10): the quantizer learns from the
                                               # items of all three datasets:
                                               # out/beauty/rqkmeans-with-sports+toys/

It writes into out/<dataset>/<ids>/:
    codes.npy    (n_items, L) int64, row i = the Semantic ID of item id i+1, collision token last
    stats.json   codebook usage, perplexity, collisions, category structure (Fig. 4), and the
                 checksum of codes.npy
    rqvae.pt     the trained RQ-VAE weights (state_dict; --ids=rqvae only)
    config.json  the settings that made them (and the checksum of the embeddings they came from),
                 written last: a folder without it is unfinished
A second run with the same settings checks the files and reuses them; changed settings, a changed
embedding file, a corrupt file or --force rebuild them. A rebuild trains and writes every new file
under a temporary name first, and only then switches (renames), so a build that fails while
training or writing leaves the previous one in place. The algorithms live in rqvae.py; this script
is the orchestration: Part I builds the IDs, Part II decides whether a build can be reused and
writes it safely.
"""
import contextlib
import json
import os
import sys
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
DEFAULTS = {**rqvae.DEFAULTS, **data.settings(globals())}


# ==============================================================================================
# Part I. The build: which items the quantizer learns from, their Semantic IDs, the statistics.

def build_ids(want, config, ds, also_fit=None):
    """The Semantic IDs of ds's items under the scheme settings want (rqvae.make_ids), with their
    statistics. Cold start (Sec. 4.3): the unseen items never reach the quantizer, and get codes
    all the same. also_fit (App. E): other datasets' items that train the quantizer too.
    Returns (codes, stats, the trained RQ-VAE or None)."""
    device = data.pick_device(config['device'])
    seen = None
    if config['cold_start'] > 0:
        unseen = data.unseen_items(ds, config['cold_start'])
        seen = data.seen_items(ds, unseen)
        print(f"cold start: {len(unseen)} unseen items ({config['cold_start']:g} of the test "
              f"targets); the IDs are fitted on the other {seen.sum()}")
    if also_fit is not None:
        print(f"the {config['ids']} quantizer also learns from the {len(also_fit)} items of "
              f"{config['fit_with']} (App. E); only {ds.name}'s items get codes")
    codes, extra, model = rqvae.make_ids(ds.item_emb, want, device, seen, also_fit)
    stats = {**rqvae.all_stats(codes, want, extra, ds.items), 'device': device,
             'codes_md5': data.md5(codes)}   # ties stats.json to this very codes.npy
    return codes, stats, model


# ==============================================================================================
# Part II. The workshop: may an earlier build be reused, and writing a new one safely.

def scheme_config(config, ds, also_fit=None):
    """The settings that decide the IDs: the dataset (and a fingerprint of its embeddings), the
    scheme, the seed, and that scheme's hyperparameters. Settings of other schemes are left out, so
    --lr=0.1 does not rebuild the LSH IDs. level_sizes tells the reader the range of each level.
    also_fit: the other datasets' embeddings of --fit_with, fingerprinted too."""
    keys = ['dataset', 'ids', 'seed'] + rqvae.SCHEME_KEYS[config['ids']]
    variant = {}                                   # absent for the main build
    if config['cold_start'] > 0:
        variant['cold_start'] = config['cold_start']
    if also_fit is not None:
        variant.update(fit_with=','.join(data.fit_with_names(config['fit_with'])),
                       fit_with_md5=data.md5(also_fit))
    if os.path.normpath(ds.folder) != os.path.join(data.DATA_DIR, ds.name):   # not a shipped one:
        variant['dataset_dir'] = ds.folder    # which folder, so another one of that name is refused
    return {**{k: config[k] for k in keys}, 'dataset': ds.name, 'n_items': ds.n_items,
            'item_emb_md5': data.md5(ds.item_emb), 'level_sizes': rqvae.level_sizes(config),
            **variant}


def check_artefacts(folder, want, ds, out_dir):
    """Why the artefacts in folder cannot be reused for the settings want (a string), or None."""
    path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path):
        return 'no finished build there'
    try:
        with open(path, encoding='utf-8') as f:
            have = json.load(f)
    except (OSError, ValueError):
        return 'config.json is corrupt'
    if not isinstance(have, dict):
        return 'config.json is corrupt'
    if have.get('dataset_dir') != want.get('dataset_dir'):  # two folders, one name: never replace
        shipped = f"the shipped data/{ds.name}"
        raise data.InputError(f"{folder} holds the IDs of another dataset folder named '{ds.name}' "
                              f"({have.get('dataset_dir', shipped)}; this one is "
                              f"{want.get('dataset_dir', shipped)}); building here would replace "
                              f"them. Give this one its own --out_dir, or rebuild with --force")
    if have != want:
        changed = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        return f"the settings changed ({', '.join(changed)})"
    try:  # the very checks tiger.py makes when it reads the IDs
        codes = data.load_codes(ds, want['ids'], out_dir, cold_start=want.get('cold_start', 0.0),
                                fit_with=want.get('fit_with', ''))
    except data.InputError as e:
        return str(e).split('; run')[0]
    if want['ids'] == 'rqvae':
        # the weights must load into the configured model and give back the very same codes
        try:
            model = rqvae.build_model(want, ds.item_emb.shape[1])
            model.load_state_dict(torch.load(os.path.join(folder, 'rqvae.pt'), map_location='cpu',
                                             weights_only=True))
        except Exception as e:
            return f'rqvae.pt cannot be loaded ({type(e).__name__})'
        # (a GPU and a CPU may round a near-tie differently: allow a few rows in a thousand to
        # differ)
        differ = (rqvae.rqvae_codes(model.eval(), ds.item_emb)[0] != codes[:, :-1]).any(1).mean()
        if differ > 0.001:
            return (f'rqvae.pt does not reproduce codes.npy ({differ:.1%} of the items get '
                    f'other codes)')
    return None


def write_build(folder, files, want):
    """Replace the build in folder by files ({name: write function}) and config.json = want.
    Every new file is first written completely under a temporary name; only then comes the switch
    (config.json removed first and written last), which is renames only. A failure while writing
    leaves the previous build as it was; one during the switch (rare: renames) leaves a folder
    without config.json, which every reader treats as unfinished."""
    staged = []
    try:
        for name, write in files.items():
            tmp = os.path.join(folder, data.TMP_PREFIX + 'staged-' + name)
            data.write_atomic(tmp, write)
            staged.append((tmp, os.path.join(folder, name)))
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    try:
        if os.path.exists(os.path.join(folder, 'config.json')):
            os.remove(os.path.join(folder, 'config.json'))
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as e:
        raise data.InputError(f'cannot write {folder}: {e.strerror or e}') from None
    data.write_json(os.path.join(folder, 'config.json'), want)

# ----------------------------------------------------------------------------------------------
# The job: load, check what is there, build if needed, write, report.

def main(argv):
    """Run prepare with command-line arguments argv. Returns (codes, stats, reused)."""
    config = data.configure(DEFAULTS, argv)
    ds = data.load_dataset(config['dataset'])
    rqvae.check_config(config, ds.n_items)
    torch.manual_seed(config['seed'])
    np.random.seed(config['seed'])
    # App. E: other datasets' items train the RQ-VAE too
    also_fit = data.fit_with_embeddings(config['fit_with'])
    want = scheme_config(config, ds, also_fit)
    folder = data.ids_folder(config['out_dir'], ds.name, config['ids'], config['cold_start'],
                             config['fit_with'])
    with data.folder_lock(folder):  # one prepare.py at a time per ID folder
        reason = ('forced with --force' if config['force']
                  else check_artefacts(folder, want, ds, config['out_dir']))
        if reason is None:
            print(f"reusing the {config['ids']} IDs in {folder} (same settings; --force rebuilds)")
            codes = data.load_codes(ds, config['ids'], config['out_dir'],
                                    cold_start=config['cold_start'], fit_with=config['fit_with'])
            with open(os.path.join(folder, 'stats.json'), encoding='utf-8') as f:
                stats = json.load(f)
            rqvae.report(config['ids'], stats)
            return codes, stats, True

        print(f"building the {config['ids']} IDs for {ds.name} ({ds.n_items} items) in {folder}: "
              f"{reason}")
        t0 = time.time()
        codes, stats, model = build_ids(want, config, ds, also_fit)
        stats['build_seconds'] = round(time.time() - t0, 1)
        files = {'codes.npy': lambda f: np.save(f, codes, allow_pickle=False),
                 'stats.json': lambda f: f.write((json.dumps(stats, indent=1) + '\n').encode())}
        if model is not None:
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            files['rqvae.pt'] = lambda f: torch.save(state, f)
        write_build(folder, files, want)
    rqvae.report(config['ids'], stats)
    print(f"wrote {folder} in {time.time() - t0:.0f} s")
    return codes, stats, False


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except data.InputError as e:
        sys.exit(f'error: {e}')
