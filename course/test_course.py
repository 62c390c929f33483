"""
course/test_course.py -- the course's promises, checked: `python -m pytest -q course/test_course.py`

For every exercise, the student copy with that exercise blanked differs from the repository only
inside the exercise's functions, still imports, fails the exercise's grader (on its own
NotImplementedError, with every one of its tests collected) and passes every other exercise's
grader; the repository passes them all. So each exercise proves that its tests can fail, and that
they fail on nothing else. The copies hold only what the graders need (the scripts, test_all.py,
config/; data/ is linked): about 2 CPU-minutes in all, 20-odd pytest runs.
"""
import ast
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import grade  # noqa: E402
import make  # noqa: E402
from make import EXERCISES, ROOT  # noqa: E402



def grader_files():
    """What the graders need of the repository: its top-level modules (test_all.py among them),
    its packages (folders with an __init__.py), config/ and results/ (test_all.py imports the
    dense prefix tables of results/scale_bench.py). data/ is linked instead (78 MB)."""
    files = []
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if name.endswith(".py") and os.path.isfile(path):
            files.append(name)
        elif name in ("config", "results") or os.path.isfile(os.path.join(path, "__init__.py")):
            files += [os.path.join(name, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
    return files


FILES = grader_files()

# What each exercise needs when a copy is graded as it is (no reference at hand), as the guide
# says: every model test runs T5's position buckets (5) and attention (6); attention's test of the
# beams' shared keys runs beam search (7), and so does sampling (9).
NEEDS = {6: {5, 7}, 7: {5, 6}, 9: {5, 6, 7}}


def student_copy(folder, exercises):
    return make.write_copy(str(folder), exercises, files=FILES, link=("data",))


def quiet(line):
    pass


@pytest.fixture(scope="module")
def reference_counts(tmp_path_factory):
    """The repository passes every exercise. Returns each exercise's number of tests."""
    logs = str(tmp_path_factory.mktemp("logs"))
    report = grade.grade(ROOT, sorted(EXERCISES), None, logs, echo=quiet)
    failed = {n: r for n, r in report.items() if not r[0]}
    assert not failed, f"the reference fails its own exercises: {failed}"
    return {n: r[2] for n, r in report.items()}


def test_the_table_names_functions_and_tests_that_exist(reference_counts):
    for n, (title, functions, tests) in EXERCISES.items():
        assert len(f'        raise NotImplementedError("exercise {n}: {title}")') <= 100, title
        for qualname in functions:  # found, and written (not a stub) in the reference
            path, inner = make.split_name(qualname)
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert make.stub_of(make.find_function(ast.parse(f.read()), inner, path)) is None
        assert reference_counts[n] >= len(tests), n  # every term selected a test, and it passed
    # no function belongs to two exercises: blanking one would blank the other's
    functions = [q for _, fs, _ in EXERCISES.values() for q in fs]
    assert len(functions) == len(set(functions))


def assert_only_these_functions_differ(copy, exercises):
    """Outside the exercises' function bodies the copy is the repository, byte for byte; each
    body is one line, the stub."""
    for rel in FILES:
        with open(os.path.join(ROOT, rel), encoding="utf-8", newline="") as f:
            ref = make.lines_of(f.read())
        with open(os.path.join(copy, rel), encoding="utf-8", newline="") as f:
            mine = make.lines_of(f.read())
        tree = ast.parse("".join(ref))
        spans = sorted(make.body_span(make.find_function(tree, make.split_name(q)[1]))[:2]
                       for n in exercises for q in EXERCISES[n][1] if make.split_name(q)[0] == rel)
        expected, kept = [], 0
        for first, last in spans:
            expected += ref[kept:first - 1] + [None]
            kept = last
        expected += ref[kept:]
        assert len(mine) == len(expected), rel
        for got, want in zip(mine, expected):
            if want is None:
                assert 'raise NotImplementedError("exercise ' in got, rel
            else:
                assert got == want, rel


@pytest.mark.parametrize("k", sorted(EXERCISES))
def test_blanking_an_exercise_fails_its_grader_and_no_other(k, tmp_path, reference_counts):
    copy = student_copy(tmp_path / "student", [k])
    assert_only_these_functions_differ(copy, [k])
    with open(os.path.join(copy, make.MARKER), encoding="utf-8") as f:
        assert json.load(f)["exercises"] == [k]
    report = grade.grade(copy, sorted(EXERCISES), ROOT, str(tmp_path / "logs"), echo=quiet)
    ok, passed, total, note, log = report[k]
    with open(log, encoding="utf-8") as f:
        text = f.read()
    # k fails on its own blank, every one of its tests collected (so the copy imports: test_all.py
    # imports data, eval, prepare, rqvae and tiger) and none passing
    assert not ok and passed == 0 and total == reference_counts[k] and not note, text
    assert text.count(f"NotImplementedError: exercise {k}:") >= total, text
    # every other exercise passes in this copy: graded in isolation, it runs k from the reference
    others = {n: r for n, r in report.items() if n != k and not r[0]}
    assert not others, others


def test_a_copy_graded_as_it_is_fails_only_on_the_documented_needs(tmp_path):
    # the student's view (grade.py inside the copy, no reference): with every exercise blank,
    # each exercise stops on its own blank or on one of the exercises it is documented to need
    copy = student_copy(tmp_path / "student", sorted(EXERCISES))
    assert_only_these_functions_differ(copy, sorted(EXERCISES))
    report = grade.grade(copy, sorted(EXERCISES), None, str(tmp_path / "logs"), echo=quiet)
    for n, (ok, passed, total, note, log) in report.items():
        assert not ok and total > 0, (n, report[n])
        with open(log, encoding="utf-8") as f:
            parts = f.read().split("NotImplementedError: exercise ")[1:]
        raised = {int(part.split(":")[0]) for part in parts}
        assert raised and raised <= {n} | NEEDS.get(n, set()), (n, raised)


def run_make(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "make.py"), *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_make_refuses_bad_requests_in_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    new, full = f"--out={tmp_path / 'new'}", f"--out={tmp_path / 'full'}"
    cases = [(["--exercises=3,11", new], "unknown exercise '11'"),
             (["--exercises=x", new], "unknown exercise 'x'"),
             (["--exercises=3", full], "exists and is not empty"),
             (["--exercises=3", full, "--force"], "not a student copy"),
             (["--exercises=3", "--out=config/student"], "inside the repository's tracked tree"),
             (["--exercises=3", "--out=."], "holds the repository itself"),
             (["--exercises=3", "--out"], "write --out=value"),
             (["--exercise=3", new], "unknown argument '--exercise=3'"),
             (["--exercises=3"], "give --exercises=3,7 (or all) and --out=FOLDER")]
    for args, expected in cases:
        out = run_make(*args)
        assert out.returncode == 1 and out.stdout == "", args
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
        assert expected in out.stderr, (args, out.stderr)
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "full") == ["notes.txt"]
    listing = run_make("--list")
    assert listing.returncode == 0
    assert all(f"exercise {n}: {t}" in listing.stdout for n, (t, _, _) in EXERCISES.items())


def test_force_replaces_an_earlier_copy_and_the_walk_skips_copies(tmp_path):
    first = student_copy(tmp_path / "student", [3])
    (tmp_path / "student" / "solution.py").write_text("mine")
    with pytest.raises(make.CourseError, match="not empty"):
        student_copy(tmp_path / "student", [5])
    make.write_copy(first, [5], files=FILES, link=("data",), force=True)
    assert not (tmp_path / "student" / "solution.py").exists()
    assert_only_these_functions_differ(first, [5])
    # without git (a folder that is no repository) a walk finds the files; it leaves out out/,
    # caches and student copies
    repo = tmp_path / "repo"
    for rel, text in [("tiger.py", "x = 1\n"), ("config/a.py", "lr = 1\n"), ("out/ckpt.pt", "x"),
                      ("__pycache__/t.pyc", "x"), ("student/tiger.py", "x = 2\n"),
                      (f"student/{make.MARKER}", "{}")]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    assert make.repo_files(str(repo)) == [os.path.join("config", "a.py"), "tiger.py"]
