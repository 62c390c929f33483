"""
Tests of results/rerun.py, in seconds: the job runs a small table of fake prepare.py, tiger.py and
eval.py scripts (written into a temporary repository; each records its call and writes what the
real one writes), so that the plan, the order, the skipping, --resume and the failure rules are
checked without training anything. One test reads the real table with the real tiger.py.

    python -m pytest -q results/test_rerun.py
"""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rerun  # noqa: E402

# One script for all three fakes: it appends {script, argv, threads, event} to calls.jsonl at its
# start and end, and writes what the real script would: tiger.py its run folder's ckpt.pt and
# then metrics.json with test metrics, eval.py a JSON file beside the checkpoint. --fail=1 makes it
# exit 1 (having written nothing), like a step that breaks.
FAKE = r'''
import json, os, sys, time
script = os.path.basename(sys.argv[0])
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)

def record(event):
    with open("calls.jsonl", "a") as f:
        f.write(json.dumps({"script": script, "argv": sys.argv[1:], "event": event,
                            "threads": os.environ.get("OMP_NUM_THREADS")}) + "\n")

record("start")
print("a long tqdm bar\r" * 3 + "some output")
if args.get("fail"):
    sys.exit("error: this step breaks")
time.sleep(0.2)
if script == "tiger.py":
    folder = os.path.join(args.get("out_dir", "out"), args.get("dataset", "beauty"), "rqkmeans",
                          args.get("run", "tiger"))
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "ckpt.pt"), "w").close()
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"test": {"recall@10": 0.05}}, f)
if script == "eval.py":
    with open(os.path.join(os.path.dirname(args["ckpt"]), "eval.json"), "w") as f:
        json.dump({"metrics": {}}, f)
record("end")
'''

TABLE = [
    dict(name="beauty-a", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --run=a", writes="out/beauty/rqkmeans/a"),
    dict(name="beauty-b", dataset="beauty", prepare="python prepare.py",
         command="python tiger.py --run=b", writes="out/beauty/rqkmeans/b"),
    dict(name="sports-c", dataset="sports", prepare="python prepare.py --dataset=sports",
         command="python tiger.py --dataset=sports --run=c", writes="out/sports/rqkmeans/c"),
    dict(name="beauty-a-eval", dataset="beauty", after="beauty-a",
         command="python eval.py --ckpt=out/beauty/rqkmeans/a/best.pt",
         writes="out/beauty/rqkmeans/a/eval.json"),
]


def fake_ask_tiger(argvs, root):
    """What the fake tiger.py does with a command line (the real one is asked in its own test):
    --max_steps=N (default 1,000), always 2 layers, the fake's folder rule."""
    answers = []
    for argv in argvs:
        args = dict(a[2:].split("=", 1) for a in argv if "=" in a)
        folder = os.path.join(root, args.get("out_dir", "out"), args.get("dataset", "beauty"),
                              "rqkmeans", args.get("run", "tiger"))
        answers.append({"max_steps": int(args.get("max_steps", 1000)), "n_layer": 2,
                        "folder": folder})
    return answers


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A temporary repository with the fake scripts; the job polls its children often. Two
    threads in the environment, so that only the job's own setting can give a child one."""
    for script in ("prepare.py", "tiger.py", "eval.py"):
        (tmp_path / script).write_text(FAKE)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(rerun, "ask_tiger", fake_ask_tiger)
    monkeypatch.setattr(rerun, "POLL_S", 0.02)
    return tmp_path


def calls(repo):
    path = repo / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def finish(folder):   # a run that tiger.py finished earlier
    os.makedirs(folder, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"test": {"recall@10": 0.05}}))


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(repo):
    out = repo / "elsewhere"   # not the repository's out/: every command gets --out_dir
    finish(out / "beauty/rqkmeans/b")
    (out / "beauty/rqkmeans/a").mkdir(parents=True)
    (out / "beauty/rqkmeans/a/ckpt.pt").write_text("")   # interrupted: a checkpoint, no metrics
    assert rerun.main(["--jobs=2", f"--out_dir={out}"], runs=TABLE, root=str(repo)) == 0
    started = [(c["script"], c["argv"]) for c in calls(repo) if c["event"] == "start"]
    assert len(started) == 5   # two builds, runs a and c, a's eval; not the finished run b
    assert ("tiger.py", ["--run=a", f"--out_dir={out}", "--resume"]) in started
    assert ("tiger.py", ["--dataset=sports", "--run=c", f"--out_dir={out}"]) in started
    assert [a for s, a in started if s == "prepare.py"].count([f"--out_dir={out}"]) == 1
    assert ("eval.py", [f"--ckpt={out}/beauty/rqkmeans/a/best.pt"]) in started
    assert {c["threads"] for c in calls(repo)} == {"1"}   # two at a time: one thread each
    assert (out / "beauty/rqkmeans/a/eval.json").exists()
    assert "some output" in (out / "rerun-logs/beauty-a.log").read_text()  # not the terminal
    # a second time, everything is finished: nothing starts
    assert rerun.main(["--jobs=2", f"--out_dir={out}"], runs=TABLE, root=str(repo)) == 0
    assert len([c for c in calls(repo) if c["event"] == "start"]) == 5


def test_every_step_starts_after_what_it_needs_has_ended(repo):
    rerun.main(["--jobs=2"], runs=TABLE, root=str(repo))
    events = [(c["event"], c["script"], c["argv"]) for c in calls(repo)]
    ended = lambda script, argv: events.index(("end", script, argv))      # noqa: E731
    started = lambda script, argv: events.index(("start", script, argv))  # noqa: E731
    assert ended("prepare.py", []) < started("tiger.py", ["--run=a"])
    assert ended("prepare.py", []) < started("tiger.py", ["--run=b"])
    assert ended("prepare.py", ["--dataset=sports"]) < started("tiger.py", ["--dataset=sports",
                                                                            "--run=c"])
    assert ended("tiger.py", ["--run=a"]) < started("eval.py",
                                                    ["--ckpt=out/beauty/rqkmeans/a/best.pt"])
    # never more than two at once
    running = 0
    for event, _, _ in events:
        running += 1 if event == "start" else -1
        assert running <= 2


def test_a_failed_step_stops_only_what_needs_it(repo, capsys):
    table = [dict(r) for r in TABLE]
    table[0]["command"] = "python tiger.py --run=a --fail=1"
    assert rerun.main(["--jobs=2"], runs=table, root=str(repo)) == 1
    started = [(c["script"], c["argv"]) for c in calls(repo) if c["event"] == "start"]
    assert ("tiger.py", ["--run=b"]) in started
    assert ("tiger.py", ["--dataset=sports", "--run=c"]) in started
    assert "eval.py" not in [script for script, _ in started]   # a's eval never ran
    assert (repo / "out/sports/rqkmeans/c/metrics.json").exists()
    printed = capsys.readouterr().out
    log = os.path.join(str(repo), "out", "rerun-logs", "beauty-a.log")
    assert f"failed   beauty-a: {log}" in printed
    assert "error: this step breaks" in printed   # the log's last line, in the summary
    assert "skipped  beauty-a-eval: needs beauty-a, which failed" in printed
    assert "4 done, 1 failed, 1 skipped" in printed   # two builds, b, c; a; a's eval


def test_dry_run_prints_the_plan_longest_chain_first_and_runs_nothing(repo, capsys):
    finish(repo / "out/beauty/rqkmeans/b")
    table = [dict(r) for r in TABLE]
    table[2]["command"] += " --max_steps=36000"   # c: three times the default's steps
    assert rerun.main(["--dry_run", "--only=beauty-a,sports"], runs=table, root=str(repo)) == 0
    printed = capsys.readouterr().out
    assert calls(repo) == [] and not (repo / "out/rerun-logs").exists()
    # the plan's lines: start (h:mm), length ("2 min", "1.6 h"), step, command
    order = [line.split()[3] for line in printed.splitlines() if line[:6].strip()[:1].isdigit()]
    # --only picks a, its eval and c, and brings the builds they need; c's chain is the longest,
    # so it goes first; the second lane takes a's build meanwhile
    assert order == ["prepare-sports-rqkmeans", "prepare-beauty-rqkmeans", "sports-c", "beauty-a",
                     "beauty-a-eval"]
    assert "76 min" in printed   # c: 36 x 2.1 minutes, estimated
    assert "beauty-b" not in printed   # not selected


def test_bad_input_is_one_line(repo):
    for argv, words in ((["--only=nosuchrun"], "matches no run name"),
                        (["--bogus"], "unrecognized arguments: --bogus"),
                        (["--jobs=0"], "--jobs must be at least 1")):
        with pytest.raises(rerun.BadInput, match=words):
            rerun.main(argv, runs=TABLE, root=str(repo))
    two_writers = TABLE + [dict(TABLE[0], name="beauty-a-again")]
    with pytest.raises(rerun.BadInput, match="both write"):
        rerun.main(["--dry_run"], runs=two_writers, root=str(repo))
    # the script itself: `error: ...` on one line, no traceback
    done = subprocess.run([sys.executable, rerun.__file__, "--only=nosuchrun"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("error: --only=nosuchrun")
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_real_table_writes_where_tiger_py_puts_each_run():
    steps = rerun.make_steps(rerun.RUNS, rerun.ROOT, os.path.join(rerun.ROOT, "out"))
    runs = [s for s in steps.values() if s["kind"] == "tiger"]
    told = rerun.ask_tiger([s["argv"][2:] for s in runs], rerun.ROOT)   # the real tiger.py
    assert [t["folder"] for t in told] == [s["writes"] for s in runs]
    assert {(s["name"], t["max_steps"], t["n_layer"]) for s, t in zip(runs, told)
            if s["name"].endswith("long")} == {("beauty-long", 36000, 3), ("toys-long", 36000, 3),
                                               ("sports-long", 48000, 3)}   # Sports' own recipe
