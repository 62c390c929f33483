"""
course/grade.py -- grade the exercises of a student copy: one line per exercise, PASS or FAIL.

    python course/grade.py --repo=student/              # the exercises the copy was made with
    python course/grade.py --repo=student/ --exercises=3,7
    python course/grade.py                              # this repository: every exercise passes

Each exercise is graded by its tests of test_all.py (the table in course/make.py), run by pytest
in the graded copy; the pytest output goes to a log file per exercise, named on a failure.

Exercises are graded in isolation: while exercise 7 is graded, the functions of every other
exercise come from this repository (the reference), so a blank or a bug in exercise 5 never fails
exercise 7. Without a separate reference (grade.py run inside the copy it grades) the copy runs as
it is: the model's exercises then need each other (course/README.md has which), and a failure
caused by another exercise's missing body says so.
"""
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make  # noqa: E402  (course/make.py: the exercise table, finding and cutting functions)
from make import EXERCISES, CourseError  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Which tests, and which test result belongs to which exercise


def k_expression(exercises):
    """The pytest -k expression that selects the tests of these exercises."""
    terms = sorted({t for n in exercises for t in EXERCISES[n][2]})
    return " or ".join(f"({t})" if " " in t else t for t in terms)


def belongs(test_name, term):
    """Is a test result ('test_x[level]') one of a table term's tests ('test_x and level')?"""
    base, *words = term.split(" and ")
    return test_name.split("[")[0] == base and all(w in test_name for w in words)


# ----------------------------------------------------------------------------------------------
# Isolation: a sandbox in which the exercise's own functions are the copy's and every other
# exercise's functions are the reference's

def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def definitions(root):
    """{qualname: (its whole definition as text, decorators included; the exercise number of its
    stub, or None when it is written)} for every function of the table, as root has them."""
    out, parsed = {}, {}
    for _, functions, _ in EXERCISES.values():
        for qualname in functions:
            path, inner = make.split_name(qualname)
            if path not in parsed:
                text = read(os.path.join(root, path))
                parsed[path] = (make.lines_of(text), ast.parse(text))
            lines, tree = parsed[path]
            node = make.find_function(tree, inner, os.path.join(root, path))
            first, last = make.def_span(node)
            out[qualname] = ("".join(lines[first - 1:last]), make.stub_of(node))
    return out


def replacements(mine, reference, exercise):
    """{qualname: the reference's definition} for every other exercise's function that the copy
    has otherwise. mine, reference: definitions() of both (reference None: nothing to swap)."""
    if reference is None:
        return {}
    return {q: reference[q][0] for n, (_, functions, _) in EXERCISES.items() if n != exercise
            for q in functions if reference[q][1] is None and mine[q][0] != reference[q][0]}


def build_sandbox(repo, folder, swap):
    """folder: a link to each top-level entry of repo, except the modules in which swap
    ({qualname: definition}) replaces whole definitions: those are written out."""
    texts = {}
    for qualname, source in sorted(swap.items()):
        path, inner = make.split_name(qualname)
        text = texts.get(path) or read(os.path.join(repo, path))
        first, last = make.def_span(make.find_function(ast.parse(text), inner, path))
        lines = make.lines_of(text)
        texts[path] = "".join(lines[:first - 1]) + source + "".join(lines[last:])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name in sorted(os.listdir(repo)):
        if name in make.SKIP or name == make.MARKER:
            continue
        if name in texts:
            with open(os.path.join(folder, name), "w", encoding="utf-8", newline="") as f:
                f.write(texts[name])
        else:
            os.symlink(os.path.join(os.path.abspath(repo), name), os.path.join(folder, name))
    return folder


# ----------------------------------------------------------------------------------------------
# One pytest run for a group of exercises, and what it says about each

def run_pytest(folder, exercises, log, xml, timeout):
    """pytest on these exercises' tests in folder. Returns {test name: (outcome, message)}, with
    outcome passed | failed | error | skipped, and a line saying what went wrong with the run as
    a whole (None when it ran)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", folder,
           f"--junitxml={xml}", "test_all.py", "-k", k_expression(exercises)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TQDM_DISABLE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: one thread is fastest, and polite
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ cd {folder} && {' '.join(cmd[:-1])} '{cmd[-1]}'\n\n")
        out.flush()
        try:
            subprocess.run(cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=env,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            return {}, f"timed out after {timeout} s (an endless loop?)"
    if not os.path.isfile(xml):
        return {}, "pytest did not run (see the whole output in the log)"
    results, problem = {}, None
    for case in ET.parse(xml).getroot().iter("testcase"):
        name, outcome, message = case.get("name"), "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "") + "\n" + (child.text or "")
        if not case.get("classname") or not name.startswith("test_"):  # a collection error
            problem = "test_all.py did not load: " + (message.strip() or "?").splitlines()[0][:200]
        results[name] = (outcome, message)
    return results, problem


def grade_one(n, results, problem, log_file, run_log):
    """(passed, total, note) of exercise n from its tests' results; writes its log file."""
    mine = {name: r for name, r in results.items()
            if any(belongs(name, term) for term in EXERCISES[n][2])}
    passed = sum(outcome == "passed" for outcome, _ in mine.values())
    # a test that stopped on another exercise's stub: that exercise is missing in this copy
    needs = sorted({int(m) for _, message in mine.values()
                    for m in re.findall(r"NotImplementedError: exercise (\d+):", message)} - {n})
    note = problem or ("" if mine else "no test found: renamed in test_all.py? (see make.py)")
    if needs and not problem:
        note = (f"needs exercise{'s' * (len(needs) > 1)} {' and '.join(map(str, needs))}, "
                f"not written yet in this copy")
    with open(log_file, "w", encoding="utf-8") as f:
        f.write(f"exercise {n}: {EXERCISES[n][0]}\nfunctions: {', '.join(EXERCISES[n][1])}\n"
                f"tests: {'; '.join(EXERCISES[n][2])}\nthe whole pytest output: {run_log}\n\n")
        for name, (outcome, _) in sorted(mine.items()):
            f.write(f"{outcome.upper():8} {name}\n")
        for name, (outcome, message) in sorted(mine.items()):
            if outcome != "passed":
                f.write(f"\n{'=' * 30} {name} {'=' * 30}\n{message.strip()}\n")
        f.write(f"\n{note}\n" if note else "")
    return passed, len(mine), note


def grade(repo, exercises, reference, logs, timeout=600, echo=print):
    """Grade the exercises of repo, each in isolation against the reference repository (None:
    repo as it is). Returns {n: (ok, passed, total, note, log file)}; echo gets one line each."""
    mine = definitions(repo)
    theirs = definitions(reference) if reference else None
    groups = {}  # the exercises that need the same sandbox share one pytest run
    for n in exercises:
        swap = replacements(mine, theirs, n)
        groups.setdefault(tuple(sorted(swap.items())), []).append(n)
    os.makedirs(logs, exist_ok=True)
    report = {}
    for g, (swap, members) in enumerate(groups.items()):
        run_log, xml = (os.path.join(logs, f"pytest_{g}.{ext}") for ext in ("log", "xml"))
        folder = repo
        if swap:
            folder = build_sandbox(repo, os.path.join(logs, f"sandbox_{g}"), dict(swap))
        try:
            results, problem = run_pytest(folder, members, run_log, xml, timeout)
        finally:
            if swap:
                shutil.rmtree(folder, ignore_errors=True)
        for n in members:
            log_file = os.path.join(logs, f"exercise_{n}.log")
            passed, total, note = grade_one(n, results, problem, log_file, run_log)
            report[n] = (total > 0 and passed == total, passed, total, note, log_file)
    for n in exercises:
        ok, passed, total, note, log_file = report[n]
        line = (f"exercise {n:2}  {EXERCISES[n][0]:48} {'PASS' if ok else 'FAIL'}  "
                f"{passed}/{total} tests")
        echo(line if ok else f"{line}  {note + '; ' if note else ''}log: {log_file}")
    return report


# ----------------------------------------------------------------------------------------------
# The command line

def main(argv):
    opts = {"exercises": "", "repo": make.ROOT, "logs": "", "timeout": "600"}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.strip())
            print("\nflags: --repo=FOLDER --exercises=3,7|all --logs=FOLDER --timeout=SECONDS")
            return 0
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in opts or not value:
            raise CourseError(f"unknown argument '{arg}'; use --repo=FOLDER --exercises=3,7 "
                              f"--logs=FOLDER --timeout=SECONDS (seconds per pytest run)")
        opts[key] = value
    repo = os.path.abspath(opts["repo"])
    if not os.path.isfile(os.path.join(repo, "test_all.py")):
        raise CourseError(f"--repo={opts['repo']} holds no test_all.py: not a nanoTIGER copy")
    if not opts["timeout"].isdigit():
        raise CourseError(f"--timeout={opts['timeout']}: give a whole number of seconds")
    info = {}
    if os.path.isfile(os.path.join(repo, make.MARKER)):
        with open(os.path.join(repo, make.MARKER), encoding="utf-8") as f:
            info = json.load(f)
    exercises = (make.parse_exercises(opts["exercises"]) if opts["exercises"]
                 else sorted(info.get("exercises") or EXERCISES))
    with open(os.path.join(repo, "test_all.py"), "rb") as f:
        if info.get("test_all_sha256") not in (None, hashlib.sha256(f.read()).hexdigest()):
            print("note: test_all.py has changed since the copy was made; grading with it anyway")
    same = os.path.realpath(repo) == os.path.realpath(make.ROOT)
    reference = None if same else make.ROOT
    logs = opts["logs"] or tempfile.mkdtemp(prefix="nanotiger-grade-")
    print(f"grading {repo}, exercises {', '.join(map(str, exercises))}"
          + (f"; the other exercises' functions from {reference}" if reference else "; as it is"))
    t0 = time.time()
    report = grade(repo, exercises, reference, logs, int(opts["timeout"]))
    failed = [n for n in exercises if not report[n][0]]
    print(f"{len(exercises) - len(failed)} of {len(exercises)} pass ({time.time() - t0:.0f} s)"
          + (f"; logs in {logs}" if failed else ""))
    if not failed and not opts["logs"]:
        shutil.rmtree(logs, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except CourseError as e:
        sys.exit(f"error: {e}")
