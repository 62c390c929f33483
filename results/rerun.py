"""
rerun.py -- every run the README cites, rerun as one background job (issue #26, step 3).

    python results/rerun.py --dry_run            # the plan: what is finished, what runs, how long
    nohup python results/rerun.py --out_dir=out-newtext > rerun.txt &   # all of it, for hours
    python results/rerun.py --only=sports-main   # only the runs whose name contains sports-main
    python eval.py --report=out-newtext          # then the README's tables, from the new runs

RUNS, below, is the list: each run's prepare.py build, its tiger.py or eval.py command as the README
prints it, and what it writes. The job runs them --jobs at a time (two: the project's CPU has two
cores, and each child gets one thread), each child's output in <out_dir>/rerun-logs/<name>.log, one
line on the terminal per start and finish. It can be stopped and started again at any time:
  - a finished run is skipped: its metrics.json holds the test metrics (tiger.py writes it last),
    or for an eval.py step, its JSON file exists (eval.py writes it last, atomically);
  - an interrupted tiger.py run (a ckpt.pt, no metrics.json) goes on with `--resume`, which tiger.py
    refuses if the run's settings, its Semantic IDs or the data changed since; the step then fails
    with tiger.py's reason in the summary, and starting it over (--overwrite) is left to you;
  - prepare.py runs once before the first run that needs its build (it reuses a finished build);
  - a run folder that another live process holds (its lock) is left alone, with what needs it;
  - a step that fails stops the steps that need it, and nothing else.
The longest chains of work start first (the long recipe early, not alone at the end), and the time
each step takes is an estimate from the wall times in results/README.md, printed with the plan.
"Finished" does not look at which data a run was trained on: after a data change, rerun into a new
--out_dir (or move the old folder aside), or the old runs count as done.
"""
import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

try:
    import fcntl  # Unix: whether a live process holds a run folder's lock (data.folder_lock)
except ImportError:  # Windows: every folder counts as free
    fcntl = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


class BadInput(Exception):
    """A bad option or table row: printed as one line, `error: ...`."""


# ----------------------------------------------------------------------------------------------
# The runs the README cites, one row each, grouped by the README's tables. A tiger.py row names the
# prepare.py command of its build and the run folder tiger.py writes, which is
# out/<dataset>/<ids>[-cold<share>][-with-<datasets>]/<run> (tiger.main, data.ids_folder; --run
# names the last part, 'tiger' by default). An eval.py row names the run whose checkpoint it scores
# ('after') and the JSON file it writes beside it. A run that several tables cite is listed once,
# where it first appears. The README's commands are copied as printed, except where its command
# would write into another run's folder: those rows add a --run name (comments say which).

RUNS = [
    # -- Table 1 / Table 9: the main job (the CPU default: RQ-KMeans IDs, no user token), 3 seeds
    #    on Beauty; also Table 5's 2+2-layer row and Table 8's "without" row
    dict(name="beauty-main", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py", writes="out/beauty/rqkmeans/tiger"),
    dict(name="beauty-main-seed1", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --seed=1 --run=seed1", writes="out/beauty/rqkmeans/seed1"),
    dict(name="beauty-main-seed2", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --seed=2 --run=seed2", writes="out/beauty/rqkmeans/seed2"),
    dict(name="sports-main", dataset="sports", prepare="python prepare.py --dataset=sports",
         command="python tiger.py --dataset=sports", writes="out/sports/rqkmeans/tiger"),
    dict(name="toys-main", dataset="toys", prepare="python prepare.py --dataset=toys",
         command="python tiger.py --dataset=toys", writes="out/toys/rqkmeans/tiger"),

    # -- Table 2's RQ-VAE row: the paper's IDs with the user token hidden in half; on Beauty 3 seeds
    #    (the differences table's RQ-KMeans row). These runs' checkpoints are the ones that Fig. 6
    #    and the diversity table score
    dict(name="beauty-rqvae", dataset="beauty", prepare="python prepare.py --ids=rqvae",
         command="python tiger.py --ids=rqvae --user_token=True --user_dropout=0.5",
         writes="out/beauty/rqvae/tiger"),
    dict(name="beauty-rqvae-seed1", dataset="beauty", prepare="python prepare.py --ids=rqvae",
         command="python tiger.py --ids=rqvae --user_token=True --user_dropout=0.5 --seed=1 "
                 "--run=seed1", writes="out/beauty/rqvae/seed1"),
    dict(name="beauty-rqvae-seed2", dataset="beauty", prepare="python prepare.py --ids=rqvae",
         command="python tiger.py --ids=rqvae --user_token=True --user_dropout=0.5 --seed=2 "
                 "--run=seed2", writes="out/beauty/rqvae/seed2"),
    dict(name="sports-rqvae", dataset="sports",
         prepare="python prepare.py --dataset=sports --ids=rqvae",
         command="python tiger.py --dataset=sports --ids=rqvae --user_token=True "
                 "--user_dropout=0.5", writes="out/sports/rqvae/tiger"),
    dict(name="toys-rqvae", dataset="toys", prepare="python prepare.py --dataset=toys --ids=rqvae",
         command="python tiger.py --dataset=toys --ids=rqvae --user_token=True --user_dropout=0.5",
         writes="out/toys/rqvae/tiger"),

    # -- Table 2: LSH and Random IDs, every row with the user token hidden in half
    dict(name="beauty-lsh", dataset="beauty", prepare="python prepare.py --ids=lsh",
         command="python tiger.py --ids=lsh --user_token=True --user_dropout=0.5",
         writes="out/beauty/lsh/tiger"),
    dict(name="beauty-random", dataset="beauty", prepare="python prepare.py --ids=random",
         command="python tiger.py --ids=random --user_token=True --user_dropout=0.5",
         writes="out/beauty/random/tiger"),
    dict(name="sports-lsh", dataset="sports",
         prepare="python prepare.py --dataset=sports --ids=lsh",
         command="python tiger.py --dataset=sports --ids=lsh --user_token=True --user_dropout=0.5",
         writes="out/sports/lsh/tiger"),
    dict(name="sports-random", dataset="sports",
         prepare="python prepare.py --dataset=sports --ids=random",
         command="python tiger.py --dataset=sports --ids=random --user_token=True "
                 "--user_dropout=0.5", writes="out/sports/random/tiger"),
    dict(name="toys-lsh", dataset="toys", prepare="python prepare.py --dataset=toys --ids=lsh",
         command="python tiger.py --dataset=toys --ids=lsh --user_token=True --user_dropout=0.5",
         writes="out/toys/lsh/tiger"),
    dict(name="toys-random", dataset="toys",
         prepare="python prepare.py --dataset=toys --ids=random",
         command="python tiger.py --dataset=toys --ids=random --user_token=True --user_dropout=0.5",
         writes="out/toys/random/tiger"),

    # -- Table 8's "with" row: RQ-KMeans IDs, the user token hidden in half, 3 seeds (and the
    #    differences table's RQ-KMeans row). The README's command has no --run, so it would write
    #    into the main job's folder: --run=user_token added. Its `python prepare.py --ids=rqkmeans`
    #    is the main job's build, spelt as the main job spells it (one prepare.py per build)
    dict(name="beauty-rqkmeans-user", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --ids=rqkmeans --user_token=True --user_dropout=0.5 "
                 "--run=user_token", writes="out/beauty/rqkmeans/user_token"),
    dict(name="beauty-rqkmeans-user-seed1", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --ids=rqkmeans --user_token=True --user_dropout=0.5 --seed=1 "
                 "--run=user_token_seed1", writes="out/beauty/rqkmeans/user_token_seed1"),
    dict(name="beauty-rqkmeans-user-seed2", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --ids=rqkmeans --user_token=True --user_dropout=0.5 --seed=2 "
                 "--run=user_token_seed2", writes="out/beauty/rqkmeans/user_token_seed2"),

    # -- Table 8 with the RQ-VAE IDs, without the user token and with it always read (the
    #    differences table's user-token row). The README's `--ids=rqvae` and `--user_token=True`
    #    would both write into out/beauty/rqvae/tiger, the RQ-VAE run above: --run=nouser (the
    #    results log's name) and --run=user_always added
    dict(name="beauty-rqvae-nouser", dataset="beauty", prepare="python prepare.py --ids=rqvae",
         command="python tiger.py --ids=rqvae --run=nouser", writes="out/beauty/rqvae/nouser"),
    dict(name="beauty-rqvae-user-always", dataset="beauty", prepare="python prepare.py --ids=rqvae",
         command="python tiger.py --ids=rqvae --user_token=True --run=user_always",
         writes="out/beauty/rqvae/user_always"),

    # -- Table 10: RQ-VAE IDs learnt on the items of Beauty, Sports and Toys (the user-token flags
    #    are tiger.py's; prepare.py has no such setting)
    dict(name="beauty-fit-with", dataset="beauty",
         prepare="python prepare.py --fit_with=sports,toys --ids=rqvae",
         command="python tiger.py --fit_with=sports,toys --ids=rqvae --user_token=True "
                 "--user_dropout=0.5", writes="out/beauty/rqvae-with-sports+toys/tiger"),

    # -- Table 5: model depth (2+2 layers is the main job)
    dict(name="beauty-layers1", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --n_layer=1 --run=layers1", writes="out/beauty/rqkmeans/layers1"),
    dict(name="beauty-layers3", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --n_layer=3 --run=layers3", writes="out/beauty/rqkmeans/layers3"),

    # -- Cold start (Fig. 5): RQ-KMeans IDs, and the RQ-VAE rows (the user-token flags on tiger.py
    #    only: prepare.py refuses them), each scored by eval.py --cold_start with its run's beam, 40
    dict(name="beauty-cold", dataset="beauty", prepare="python prepare.py --cold_start=0.05",
         command="python tiger.py --cold_start=0.05", writes="out/beauty/rqkmeans-cold0.05/tiger"),
    dict(name="beauty-cold-eval", dataset="beauty", after="beauty-cold",
         command="python eval.py --ckpt=out/beauty/rqkmeans-cold0.05/tiger/best.pt --cold_start",
         writes="out/beauty/rqkmeans-cold0.05/tiger/cold_start_best_test_beam40.json"),
    dict(name="beauty-rqvae-cold", dataset="beauty",
         prepare="python prepare.py --cold_start=0.05 --ids=rqvae",
         command="python tiger.py --cold_start=0.05 --ids=rqvae --user_token=True "
                 "--user_dropout=0.5", writes="out/beauty/rqvae-cold0.05/tiger"),
    dict(name="beauty-rqvae-cold-eval", dataset="beauty", after="beauty-rqvae-cold",
         command="python eval.py --ckpt=out/beauty/rqvae-cold0.05/tiger/best.pt --cold_start",
         writes="out/beauty/rqvae-cold0.05/tiger/cold_start_best_test_beam40.json"),

    # -- The long CPU recipe (3+3 layers, 36k steps; config/tiger_cpu_long.py names the run 'long')
    dict(name="beauty-long", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py config/tiger_cpu_long.py", writes="out/beauty/rqkmeans/long"),
    dict(name="sports-long", dataset="sports", prepare="python prepare.py --dataset=sports",
         command="python tiger.py config/tiger_cpu_long_sports.py",   # 48k steps (Sports' own)
         writes="out/sports/rqkmeans/long48k"),
    dict(name="toys-long", dataset="toys", prepare="python prepare.py --dataset=toys",
         command="python tiger.py config/tiger_cpu_long.py --dataset=toys",
         writes="out/toys/rqkmeans/long"),

    # -- Fig. 6: invalid IDs of free decoding, on the RQ-VAE runs' best checkpoints
    dict(name="beauty-fig6", dataset="beauty", after="beauty-rqvae",
         command="python eval.py --ckpt=out/beauty/rqvae/tiger/best.pt --constrained=False "
                 "--beam_size=20", writes="out/beauty/rqvae/tiger/eval_best_test_free_beam20.json"),
    dict(name="sports-fig6", dataset="sports", after="sports-rqvae",
         command="python eval.py --ckpt=out/sports/rqvae/tiger/best.pt --constrained=False "
                 "--beam_size=20", writes="out/sports/rqvae/tiger/eval_best_test_free_beam20.json"),
    dict(name="toys-fig6", dataset="toys", after="toys-rqvae",
         command="python eval.py --ckpt=out/toys/rqvae/tiger/best.pt --constrained=False "
                 "--beam_size=20", writes="out/toys/rqvae/tiger/eval_best_test_free_beam20.json"),

    # -- Diversity by temperature (Tables 3 and 4): the top 50 sampled at T (T = 0: beam search)
    dict(name="beauty-diversity-T0", dataset="beauty", after="beauty-rqvae",
         command="python eval.py --ckpt=out/beauty/rqvae/tiger/best.pt --temperature=0 "
                 "--beam_size=50", writes="out/beauty/rqvae/tiger/eval_best_test_beam50.json"),
    dict(name="beauty-diversity-T1", dataset="beauty", after="beauty-rqvae",
         command="python eval.py --ckpt=out/beauty/rqvae/tiger/best.pt --temperature=1.0 "
                 "--beam_size=50",
         writes="out/beauty/rqvae/tiger/eval_best_test_beam50_T1_seed0.json"),
    dict(name="beauty-diversity-T1.5", dataset="beauty", after="beauty-rqvae",
         command="python eval.py --ckpt=out/beauty/rqvae/tiger/best.pt --temperature=1.5 "
                 "--beam_size=50",
         writes="out/beauty/rqvae/tiger/eval_best_test_beam50_T1.5_seed0.json"),
    dict(name="beauty-diversity-T2", dataset="beauty", after="beauty-rqvae",
         command="python eval.py --ckpt=out/beauty/rqvae/tiger/best.pt --temperature=2.0 "
                 "--beam_size=50",
         writes="out/beauty/rqvae/tiger/eval_best_test_beam50_T2_seed0.json"),
]
# -- Table 1's SASRec (baselines/sasrec.py, issue #30): both losses, three seeds, three datasets,
#    the 30-minute budget each (the binary loss steps faster, so it gets more steps). The binary
#    loss keeps the dropout it was measured with, 0.2 (the default was 0.2 until 2026-12-06). A SASRec
#    run cannot resume: an interrupted one is refused until its folder is moved aside.
SASREC_FLAGS = {"ce": "",
                "bce": " --loss=bce --dropout=0.2 --max_steps=72000 --eval_every=3000"}
RUNS += [dict(name=f"{d}-sasrec-{loss}" + (f"-seed{seed}" if seed != 1337 else ""), dataset=d,
              command=f"python baselines/sasrec.py --dataset={d}{SASREC_FLAGS[loss]}"
                      + (f" --seed={seed} --run={loss}-seed{seed}" if seed != 1337 else ""),
              writes=f"out/{d}/sasrec/{loss}" + (f"-seed{seed}" if seed != 1337 else "")
                     + "/metrics.json", minutes=20 if loss == "ce" else 30)  # ce stops early
         for d in ("beauty", "sports", "toys") for loss in ("ce", "bce") for seed in (1337, 1, 2)]
# ... SASRec's longer budget, one seed each (Sports has its own learning rate, chosen on its
#     validation split) ...
RUNS += [dict(name="beauty-sasrec-long", dataset="beauty",
              command="python baselines/sasrec.py config/sasrec_long.py",
              writes="out/beauty/sasrec/long/metrics.json", minutes=50),
         dict(name="sports-sasrec-long", dataset="sports",
              command="python baselines/sasrec.py config/sasrec_long_sports.py",
              writes="out/sports/sasrec/long-lr0.002/metrics.json", minutes=75),
         dict(name="toys-sasrec-long", dataset="toys",
              command="python baselines/sasrec.py config/sasrec_long.py --dataset=toys",
              writes="out/toys/sasrec/long/metrics.json", minutes=50)]
# ... and Fig. 5's SASRec line: trained on the cold-start split, can it find an unseen item?
RUNS += [dict(name="beauty-sasrec-cold", dataset="beauty",
              command="python baselines/sasrec.py --cold_start=0.05",
              writes="out/beauty/sasrec/ce-cold0.05/metrics.json", minutes=15)]

# ----------------------------------------------------------------------------------------------
# How long a step takes: an estimate, for planning, not a measurement. Minutes per 1,000 training
# steps with one thread beside one other one-thread run (what --jobs=2 does), by the model's depth
# (n_layer), from the wall times of whole runs in results/README.md, so validation and the final
# test are included: 2 layers, 22.6-25.5 min for 12k steps on each dataset and 101.5 min for the
# 48k-step run; 3 layers, 31.8 min for 12k steps; 1 layer, the README's ~1.35x per layer (its one
# run, 11.4 min, ran mostly alone). Other depths: 1.35x per layer beyond three. Early stopping only
# makes a run shorter.
MIN_PER_1K_STEPS = {1: 1.6, 2: 2.1, 3: 2.65}
ALONE = 0.65        # --jobs=1: one run with both threads (the main job, 15.4 min, against ~24)
PREPARE_MIN = 2.0   # prepare.py: ~30 s alone for most builds, minutes for --fit_with and cold start
EVAL_MIN = 2.0      # eval.py: 30-75 s of decoding (results log), plus loading


def train_minutes(n_layer, steps, jobs):
    per_1k = MIN_PER_1K_STEPS.get(n_layer) or MIN_PER_1K_STEPS[3] * 1.35 ** (n_layer - 3)
    return per_1k * steps / 1000 * (ALONE if jobs == 1 else 1.0)


def steps_done(log_path):
    """The steps an interrupted run had trained, read from the last validation line tiger.py printed
    into its log ("step 6000: loss ..."); 0 without a log. Only the estimate uses it."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            found = re.findall(r"^step (\d+): loss", f.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(found[-1]) if found else 0


# What tiger.py itself makes of each command line (config file first, then flags): its max_steps
# and n_layer for the estimate, and its run folder, to check the table's. Asked once, in one child
# process, so that this script needs neither torch nor a copy of the configurator.
ASK_TIGER = """
import json, os, sys
import data, tiger
answers = []
for argv in json.loads(sys.argv[1]):
    try:
        s = data.configure(tiger.DEFAULTS, argv)
        tiger.validate_settings(s)
    except data.InputError as e:
        sys.exit(f"python tiger.py {' '.join(argv)}: {e}")
    ids_folder = data.ids_folder(s["out_dir"], data.dataset_name(s["dataset"]), s["ids"],
                                 s["cold_start"], s["fit_with"])
    answers.append({"max_steps": s["max_steps"], "n_layer": s["n_layer"],
                    "folder": os.path.join(ids_folder, s["run"])})
print(json.dumps(answers))
"""


def ask_tiger(argvs, root):
    """[{max_steps, n_layer, folder}] for each tiger.py argument list, as tiger.py reads it."""
    if not argvs:
        return []
    done = subprocess.run([sys.executable, "-c", ASK_TIGER, json.dumps(argvs)], cwd=root,
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BadInput(f"tiger.py cannot read a command of the table: {last}")
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    for a in answers:   # tiger.py's folder is relative to where it runs: the repository
        a["folder"] = os.path.join(root, a["folder"])
    return answers


# ----------------------------------------------------------------------------------------------
# The plan: the table's rows become steps (one prepare.py step per build, before the runs on it),
# each step's dependencies, what is finished, and the order to start the rest in.


def make_steps(runs, root, out_dir):
    """The steps of the table as {name: step}; step: name, kind (prepare | tiger | eval), command
    (as printed), argv (as started), deps (names), writes (an absolute path), row (table order)."""
    readme_out = os.path.join(root, "out")
    moved = os.path.normpath(out_dir) != os.path.normpath(readme_out)

    def at(path):  # a path the README writes under out/, under out_dir instead
        return os.path.join(out_dir, os.path.relpath(path, "out"))

    def command_for(command):  # the README's command, pointed at out_dir when that moved
        words = shlex.split(command)
        if moved and words[1] in ("prepare.py", "tiger.py", "baselines/sasrec.py"):
            words.append(f"--out_dir={out_dir}")
        if moved:
            words = [f"--ckpt={at(w[len('--ckpt='):])}" if w.startswith("--ckpt=out/") else w
                     for w in words]
        return words

    steps, builds = {}, {}
    for row, r in enumerate(runs):
        if r["name"] in steps:
            raise BadInput(f"two rows of the table are named {r['name']}")
        words = command_for(r["command"])
        kind = "tiger" if words[1] == "tiger.py" else "eval"   # eval: any step writing one JSON
        step = dict(name=r["name"], kind=kind, command=" ".join(words), argv=words, deps=[],
                    writes=at(r["writes"]), row=row)
        if "minutes" in r:   # a step whose length the table gives (SASRec's budget)
            step["minutes"] = r["minutes"]
        if r.get("prepare"):
            # one prepare.py step per build (the folder above the run's): two spellings of one
            # build would be two prepare.py processes locking one folder
            build = os.path.dirname(step["writes"])
            name = "prepare-" + os.path.relpath(build, out_dir).replace(os.sep, "-")
            if build in builds and builds[build]["command"] != " ".join(command_for(r["prepare"])):
                raise BadInput(f"{r['name']}: its build {build} is prepared as "
                               f"`{builds[build]['command']}` by another row; spell it the same")
            if build not in builds:
                words = command_for(r["prepare"])
                builds[build] = steps[name] = dict(name=name, kind="prepare", argv=words, deps=[],
                                                   command=" ".join(words), writes=build, row=row)
            step["deps"].append(name)
        if r.get("after"):
            step["deps"].append(r["after"])
        steps[r["name"]] = step
    writers = {}
    for step in steps.values():
        unknown = [d for d in step["deps"] if d not in steps]
        if unknown:
            raise BadInput(f"{step['name']}: 'after' names no row of the table ({unknown[0]})")
        if step["kind"] != "prepare" and step["writes"] in writers:
            raise BadInput(f"{step['name']} and {writers[step['writes']]} both write "
                           f"{step['writes']}; give one of them its own --run")
        writers[step["writes"]] = step["name"]
    return steps


def select(steps, only):
    """The steps whose name contains one of the comma-separated substrings of --only, with
    everything they need. Prepare steps come with the runs that need them."""
    if not only:
        return dict(steps)
    wanted = [s for s in only.split(",") if s]
    chosen = [n for n, s in steps.items() if s["kind"] != "prepare" and any(w in n for w in wanted)]
    if not chosen:
        examples = ", ".join(n for n in list(steps) if steps[n]["kind"] != "prepare")
        raise BadInput(f"--only={only} matches no run name; the names: {examples}")
    keep, stack = set(), chosen
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack += steps[name]["deps"]
    return {n: s for n, s in steps.items() if n in keep}


def finished(step):
    """A tiger.py run whose metrics.json holds the test metrics, or an eval.py step whose JSON
    file is there (both written last, atomically, so a file that parses is a finished one)."""
    if step["kind"] == "prepare":
        return False   # prepare.py checks its build itself, in seconds: it runs whenever needed
    path = step["writes"]
    if step["kind"] == "tiger":
        path = os.path.join(path, "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and (step["kind"] != "tiger" or "test" in result)


def in_use(folder):
    """The pid of a live process that holds the run folder's lock (data.folder_lock), else None.
    The test takes a shared lock and drops it at once: nothing is written."""
    path = os.path.join(folder, ".lock")
    if fcntl is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def dependants(steps, name):
    """Every step that needs `name`, directly or through another step."""
    found, grew = set(), True
    while grew:
        more = {n for n, s in steps.items() if n not in found and (name in s["deps"]
                                                                    or found & set(s["deps"]))}
        found |= more
        grew = bool(more)
    return found


def make_plan(steps, jobs, log_dir, root):
    """What to do with each step: the finished ones, the ones to skip (and why), and the rest in
    the order to start them. Each step left to do gets: needs (the steps of the plan it waits for),
    resume (tiger.py's --resume: an interrupted run), log, and minutes (its estimate)."""
    done = [n for n, s in steps.items() if finished(s)]
    skipped = {}
    for n, s in steps.items():
        pid = in_use(s["writes"]) if s["kind"] == "tiger" and n not in done else None
        if pid:   # another process is training it: leave it, and what needs it, to a later rerun
            skipped[n] = f"in use by another process (pid {pid})"
            for m in dependants(steps, n):
                skipped.setdefault(m, f"needs {n}, in use by another process")
    todo = [n for n in steps if n not in done and n not in skipped]
    # a build is prepared only when a run on it is left to do; an eval.py step needs no build
    todo = [n for n in todo if steps[n]["kind"] != "prepare"
            or any(n in steps[m]["deps"] for m in todo)]
    for n in todo:
        s = steps[n]
        s["needs"] = [d for d in s["deps"] if d in todo]   # the others are finished
        s["resume"] = s["kind"] == "tiger" and os.path.isfile(os.path.join(s["writes"], "ckpt.pt"))
        s["log"] = os.path.join(log_dir, n + ".log")
        s["minutes"] = PREPARE_MIN if s["kind"] == "prepare" else s.get("minutes", EVAL_MIN)
    runs = [n for n in todo if steps[n]["kind"] == "tiger"]
    for n, told in zip(runs, ask_tiger([steps[n]["argv"][2:] for n in runs], root)):
        s = steps[n]
        if os.path.normpath(told["folder"]) != os.path.normpath(s["writes"]):
            raise BadInput(f"{n}: the table says it writes {s['writes']}, tiger.py says "
                           f"{told['folder']}")
        s["from_step"] = steps_done(s["log"]) if s["resume"] else 0
        left = max(told["max_steps"] - s["from_step"], 0)
        s["minutes"] = max(train_minutes(told["n_layer"], left, jobs), 1.0)  # 1: the final test
    # Start first what has the longest chain of work behind it (its own estimate plus the longest
    # chain of what needs it): the long runs and their builds early, so that the last hours are not
    # one long run alone on one core. A step's chain is longer than any of its dependants', so this
    # order also puts every step after what it needs.
    needed_by = {n: [m for m in todo if n in steps[m]["needs"]] for n in todo}
    chain = {}

    def chain_of(n):
        if n not in chain:
            chain[n] = steps[n]["minutes"] + max(map(chain_of, needed_by[n]), default=0.0)
        return chain[n]

    todo.sort(key=lambda n: (-chain_of(n), steps[n]["row"]))
    return {"done": done, "skipped": skipped, "todo": todo}


def forecast(steps, todo, jobs, running=None):
    """The scheduler below, replayed with every step taking its estimate: [(name, start minute)] in
    the order the steps would start, and the minutes until the last one ends. running: {name:
    minutes it still needs} of the steps started already."""
    todo, running, over, starts, now = list(todo), dict(running or {}), set(), [], 0.0
    waiting = set(todo) | set(running)
    while todo or running:
        for n in [n for n in todo if not set(steps[n]["needs"]) & (waiting - over)]:
            if len(running) == jobs:
                break
            todo.remove(n)
            running[n] = steps[n]["minutes"]
            starts.append((n, now))
        if not running:
            break
        first = min(running, key=running.get)
        dt = running.pop(first)
        now += dt
        running = {n: m - dt for n, m in running.items()}
        over.add(first)
    return starts, now


def hours(minutes):
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def print_plan(steps, plan, jobs, out_dir):
    print(f"plan for {out_dir}, {jobs} at a time" + (" (one thread each)" if jobs > 1 else ""))
    if plan["done"]:
        print(f"finished, skipped ({len(plan['done'])}): " + ", ".join(plan["done"]))
    for n, why in plan["skipped"].items():
        print(f"skipped: {n}: {why}")
    if not plan["todo"]:
        print("nothing to run")
        return
    starts, total = forecast(steps, plan["todo"], jobs)
    print(f"to run, in this order ({len(starts)} steps; start and length are estimates):")
    width = max(len(n) for n in plan["todo"])
    print(f"{'start':>6s} {'takes':>7s}  {'step':{width}s}  command")
    for n, t in starts:
        s = steps[n]
        how = f" --resume (from step {s['from_step']})" if s["resume"] else ""
        print(f"{t // 60:3.0f}:{t % 60:02.0f} {hours(s['minutes']):>7s}  {n:{width}s}  "
              f"{s['command']}{how}")
    print(f"about {hours(total)} in all, {jobs} at a time")


# ----------------------------------------------------------------------------------------------
# Running the plan: up to `jobs` children at once, each started as soon as what it needs is done,
# the first ready one in make_plan's order; a failure drops what needs it, nothing else.

def say(text):
    print(f"{time.strftime('%H:%M')} {text}", flush=True)  # flush: the terminal may be a file


def last_line(path):
    """The last line a child printed (tiger.py's `error: ...`, or a traceback's last line)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [l.strip() for l in f.read().replace("\r", "\n").splitlines() if l.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def stop(signum, frame):   # `kill` stops the job the way Ctrl-C does: children first
    raise KeyboardInterrupt


POLL_S = 1.0   # how often the job looks at its children


def execute(steps, plan, jobs, root):
    """Run plan["todo"]. Returns {'done': [name], 'failed': {name: log}, 'skipped': {name: why}}."""
    # one thread each: two two-thread runs on two cores slow each other down many times over
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else dict(os.environ)
    todo, running, over = list(plan["todo"]), {}, set()
    done, failed, skipped = [], {}, dict(plan["skipped"])
    try:
        while todo or running:
            for n in [n for n in todo if set(steps[n]["needs"]) <= over]:
                if len(running) == jobs:
                    break
                s = steps[n]
                # the interpreter running this script, so that a virtual environment carries over
                argv = [sys.executable] + s["argv"][1:] + (["--resume"] if s["resume"] else [])
                os.makedirs(os.path.dirname(s["log"]), exist_ok=True)
                log = open(s["log"], "a", encoding="utf-8")   # appended: a resumed run's history
                log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
                log.flush()
                proc = subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                        env=env)
                running[n] = (proc, time.time(), log)
                todo.remove(n)
                say(f"start  {n}{' (resumes)' if s['resume'] else ''}, about "
                    f"{hours(s['minutes'])}: {s['log']}")
            if not running:
                break   # (cannot happen: what a step needs is pending, running, or dropped with it)
            time.sleep(POLL_S)
            for n, (proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[n]
                took = (time.time() - t0) / 60
                if proc.returncode == 0 and (steps[n]["kind"] == "prepare" or finished(steps[n])):
                    done.append(n)
                    over.add(n)
                    left = {m: max(steps[m]["minutes"] - (time.time() - t) / 60, 1.0)
                            for m, (_, t, _) in running.items()}
                    _, rest = forecast(steps, todo, jobs, left)
                    say(f"done   {n} in {took:.1f} min; {len(todo) + len(running)} left, "
                        f"about {hours(rest)}")
                    continue
                why = f"exit {proc.returncode}" if proc.returncode else "exit 0 but unfinished"
                failed[n] = steps[n]["log"]
                say(f"FAILED {n} after {took:.1f} min ({why}): {steps[n]['log']}")
                say(f"       {last_line(steps[n]['log'])}")
                for m in dependants(steps, n):
                    if m in todo:
                        todo.remove(m)
                        skipped[m] = f"needs {n}, which failed"
                        say(f"       so not {m}")
    except KeyboardInterrupt:
        say("interrupted: the running steps are stopped; the same command goes on from here")
        for n, (proc, _, log) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
            skipped[n] = "interrupted while running (a tiger.py run resumes next time)"
        for n in todo:
            skipped[n] = "interrupted before it started"
    return {"done": done, "failed": failed, "skipped": skipped}


def print_summary(result, finished_before):
    print(f"\nsummary: {len(result['done'])} done, {len(result['failed'])} failed, "
          f"{len(result['skipped'])} skipped, {finished_before} finished before")
    for n, log in result["failed"].items():
        print(f"  failed   {n}: {log}\n           {last_line(log)}")
    for n, why in result["skipped"].items():
        print(f"  skipped  {n}: {why}")


# ----------------------------------------------------------------------------------------------
# The command line

class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not argparse's usage block
        raise BadInput(f"{message} (see --help)")


def main(argv, runs=RUNS, root=ROOT):
    """Plan, print the plan, and (without --dry_run) run it. Returns the exit status."""
    parser = Parser(description="Rerun every run the README cites (results/rerun.py).",
                    allow_abbrev=False)
    parser.add_argument("--only", default="", metavar="SUBSTRING",
                        help="only the runs whose name contains it (a,b: either one), and what "
                             "they need")
    parser.add_argument("--dry_run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--jobs", type=int, default=2, help="steps at once (default: 2)")
    parser.add_argument("--out_dir", default=None,
                        help="where the runs go (default: the repository's out/, as in the README)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise BadInput(f"--jobs must be at least 1 (got {args.jobs})")
    out_dir = os.path.abspath(args.out_dir) if args.out_dir else os.path.join(root, "out")
    steps = select(make_steps(runs, root, out_dir), args.only)
    plan = make_plan(steps, args.jobs, os.path.join(out_dir, "rerun-logs"), root)
    print_plan(steps, plan, args.jobs, out_dir)
    if args.dry_run or not plan["todo"]:
        return 0
    print(flush=True)
    signal.signal(signal.SIGTERM, stop)
    result = execute(steps, plan, args.jobs, root)
    print_summary(result, len(plan["done"]))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BadInput as e:
        sys.exit(f"error: {e}")
