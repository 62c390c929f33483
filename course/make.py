"""
course/make.py -- nanoTIGER as a course assignment: write a student copy of the repository.

    python course/make.py --list                           # the exercises, functions and tests
    python course/make.py --exercises=3,7 --out=student/   # a copy with exercises 3 and 7 to do

A student copy holds the repository's tracked files (`git ls-files`), byte for byte, except that
each function of the chosen exercises keeps its decorators, signature, docstring (and the comment
lines right under it) and loses the rest of its body to one line:

    raise NotImplementedError("exercise 3: the collision token")

The functions are found by their qualified names (module.function, module.Class.method) with ast, so
the scripts a learner reads carry no markers. The table below is the one place an exercise is
defined: course/grade.py grades with it, course/README.md (the teacher's guide) explains it.
"""
import ast
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the reference repository
MARKER = ".student.json"  # written into every copy: its exercises, what it was made from
SKIP = {".git", "out", "__pycache__", ".pytest_cache", ".benchmarks"}  # never copied

# ----------------------------------------------------------------------------------------------
# The exercises, one per idea of the paper, in its order (Sec. 3.1, App. C, Sec. 3.2, Sec. 4, 4.3).
# number -> (title, the functions the student writes, the tests of test_all.py that grade them).
# A test is named as pytest's -k sees it: its function name (every parametrization), or
# "name and word" for the parametrizations whose id contains word. Only fast unit tests: seconds.

EXERCISES = {
    1: ("k-means: the k-means++ start and the Lloyd step",
        ["rqvae.lloyd_step", "rqvae.kmeans"],
        ["test_lloyd_step_moves_an_empty_cluster_to_the_farthest_point",
         "test_kmeans_matches_brute_force_and_objective_never_rises",
         "test_kmeans_leaves_no_cluster_empty_even_when_k_equals_n",
         "test_kmeans_init_of_the_codebooks_uses_each_levels_residuals"]),
    2: ("the residual quantizer and the RQ-VAE loss",
        ["rqvae.ResidualQuantizer.forward", "rqvae.RQVAE.forward"],
        ["test_residual_quantizer_sums_to_encoder_output_and_picks_nearest_codes",
         "test_straight_through_sends_reconstruction_gradient_to_the_encoder",
         "test_rqvae_loss_weighs_the_commitment_term_by_beta"]),
    3: ("the collision token",
        ["rqvae.add_collision_token"],
        ["test_collision_token_makes_ids_unique_and_keeps_prefixes",
         "test_collision_token_numbers_seen_items_as_if_unseen_ones_did_not_exist",
         "test_collision_group_larger_than_the_token_range_is_an_error"]),
    4: ("the leave-one-out split",
        ["data.training_part", "data._make_examples", "data.split"],
        ["test_split_never_leaks_the_future",
         "test_cold_start_split_has_no_unseen_item_in_any_training_example",
         "test_dataset_counts_match_paper_table6 and beauty"]),
    5: ("T5's relative position buckets",
        ["tiger.RelativePositionBias.bucket"],
        ["test_relative_position_buckets_are_t5s"]),
    6: ("attention with the decoder's key/value cache",
        ["tiger.Attention.forward"],
        ["test_incremental_decoding_with_cache_equals_full_forward",
         "test_decoder_is_causal",
         "test_encoder_ignores_padding",
         "test_dropout_acts_where_t5_puts_it_and_only_in_training",
         "test_beam_search_matches_brute_force and level"]),   # beams share the encoder's keys
    7: ("constrained beam search over the prefix tables",
        ["tiger.PrefixTables.__init__", "tiger.PrefixTables.child", "tiger.beam_search"],
        ["test_beam_search_matches_brute_force",
         "test_unconstrained_beam_search_can_return_ids_that_are_no_item",
         "test_unseen_candidates_are_the_unseen_items_under_the_best_prefixes"]),
    8: ("Recall@K and NDCG@K",
        ["eval.ranks_of", "eval.recall_ndcg"],
        ["test_metrics_against_hand_computed_values",
         "test_invalid_id_rate_per_k_on_hand_made_decoded_ids"]),
    9: ("temperature sampling without replacement",
        ["tiger.conditioned_gumbels"],
        ["test_sampling_returns_distinct_valid_items",
         "test_sampling_draws_without_replacement_from_the_tempered_distribution",
         "test_higher_temperature_flattens_the_first_code"]),
    10: ("the cold-start epsilon rule",
         ["tiger.epsilon_top_k"],
         ["test_epsilon_rule_on_a_hand_made_ranking"]),
}


class CourseError(Exception):
    """A mistake of the caller's: printed as one line, `error: ...`."""


def parse_exercises(text):
    """'3,7' or 'all' -> [3, 7]; an unknown number is an error that lists the known ones."""
    if text.strip() == "all":
        return sorted(EXERCISES)
    chosen = set()
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            n = None
        if n not in EXERCISES:
            raise CourseError(f"unknown exercise '{part.strip()}' in --exercises={text}; "
                              f"known: {', '.join(map(str, EXERCISES))} or all (see --list)")
        chosen.add(n)
    return sorted(chosen)


# ----------------------------------------------------------------------------------------------
# Finding a function by its qualified name, and cutting its body. Lines count from 1, as in ast.

def lines_of(text):
    """text as a list of lines with their endings, split where Python's own line numbers split
    (str.splitlines would also split at form feeds and other rare characters)."""
    return io.StringIO(text, newline="").readlines()


def split_name(qualname):
    """'tiger.Attention.forward' -> ('tiger.py', ['Attention', 'forward'])."""
    module, *path = qualname.split(".")
    return module + ".py", path


def find_function(tree, path, where="?"):
    """The FunctionDef at path (['Class', 'method'] or ['function']) in a module's ast."""
    body = tree.body
    for i, name in enumerate(path):
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if i == len(path) - 1 else (ast.ClassDef,)
        found = [node for node in body if isinstance(node, kinds) and node.name == name]
        if not found:
            raise CourseError(f"{where}: no {'.'.join(path[:i + 1])} (renamed? fix the table in "
                              f"course/make.py)")
        node = found[-1]  # as Python does: the last definition of a name wins
        body = node.body
    return node


def body_span(node):
    """(first, last, column) of the body to replace: from the first statement after the docstring
    (the comment lines right under the docstring stay) to the end of the function."""
    body = node.body
    if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    if not body:
        return None  # a docstring alone: nothing to cut
    first = body[0]
    start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
    return start, node.end_lineno, first.col_offset


def def_span(node):
    """(first, last) lines of the whole definition, decorators included."""
    return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno


def stub_of(node):
    """The exercise number when this function's body is a stub that make.py wrote, else None."""
    body = [s for s in node.body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) == 1 and isinstance(body[0], ast.Raise) and isinstance(body[0].exc, ast.Call):
        call = body[0].exc
        if (isinstance(call.func, ast.Name) and call.func.id == "NotImplementedError" and call.args
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            words = call.args[0].value.split(":")[0].split()
            if len(words) == 2 and words[0] == "exercise" and words[1].isdigit():
                return int(words[1])
    return None


def blank(source, qualname, number, where="?"):
    """source with the body of qualname replaced by the stub of exercise `number`; every other
    line stays byte for byte (line endings included)."""
    node = find_function(ast.parse(source), split_name(qualname)[1], where)
    span = body_span(node)
    if span is None:
        raise CourseError(f"{where}: {qualname} has no body to cut")
    lines = lines_of(source)
    indent = lines[span[0] - 1][:span[2]]
    if span[0] == node.lineno or indent.strip():
        raise CourseError(f"{where}: {qualname} shares a line between its body and its header; "
                          f"give the body lines of its own")
    newline = "\r\n" if lines[span[1] - 1].endswith("\r\n") else "\n"
    message = f"exercise {number}: {EXERCISES[number][0]}"
    stub = f'{indent}raise NotImplementedError("{message}"){newline}'
    out = "".join(lines[:span[0] - 1] + [stub] + lines[span[1]:])
    assert stub_of(find_function(ast.parse(out), split_name(qualname)[1])) == number
    return out


def blank_files(root, exercises):
    """{path: new text} of the files the exercises change, read from root."""
    texts = {}
    for n in exercises:
        for qualname in EXERCISES[n][1]:
            path = split_name(qualname)[0]
            if path not in texts:
                with open(os.path.join(root, path), encoding="utf-8", newline="") as f:
                    texts[path] = f.read()
            texts[path] = blank(texts[path], qualname, n, where=path)
    return texts


# ----------------------------------------------------------------------------------------------
# The files of a copy, and where it may go

def repo_files(root):
    """The repository's files, relative to root: `git ls-files` (tracked files as they are in the
    working tree), or, without git, a walk that leaves out SKIP and earlier student copies."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
        files = [f for f in out.stdout.decode("utf-8").split("\0") if f]
        return [f for f in files if os.path.lexists(os.path.join(root, f))]  # deleted: not copied
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP
                             and not os.path.exists(os.path.join(folder, d, MARKER)))
            rel = os.path.relpath(folder, root)
            files += [os.path.normpath(os.path.join(rel, n)) for n in names
                      if not n.endswith(".pyc")]
        return sorted(files)


def untracked(root):
    """Files git does not track nor ignore (a new module not yet committed, say): a copy lacks
    them. Student copies inside the repository are not counted."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    files = [f for f in out.stdout.decode("utf-8").split("\0") if f]
    copies = {os.path.dirname(f) for f in files if os.path.basename(f) == MARKER}
    return [f for f in files if not any(f.startswith(c + "/") for c in copies)]


def check_out(out, root, files, force):
    """Refuse an --out that would mix the copy into the repository or overwrite someone's files."""
    out, root = os.path.realpath(out), os.path.realpath(root)
    tracked_dirs = {os.path.join(root, ".git")}
    for f in files:  # every folder that holds a tracked file, at any depth
        d = os.path.dirname(f)
        while d:
            tracked_dirs.add(os.path.join(root, d))
            d = os.path.dirname(d)
    if out == root or root.startswith(out + os.sep):
        raise CourseError(f"--out={out} holds the repository itself; choose a new folder")
    if any(out == d or out.startswith(d + os.sep) for d in tracked_dirs):
        raise CourseError(f"--out={out} is inside the repository's tracked tree; choose a new "
                          f"folder outside it (a new top-level folder such as student/ is fine)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CourseError(f"--out={out} is a file")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise CourseError(f"--out={out} exists and is not empty; choose a new folder, or add "
                              f"--force to replace an earlier student copy")
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise CourseError(f"--out={out} is not a student copy ({MARKER} missing); --force "
                              f"only replaces a copy that make.py wrote")


def git_commit(root):
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, check=True).stdout.strip()
        return out.stdout.decode().strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_copy(out, exercises, root=ROOT, files=None, link=(), force=False):
    """Write the student copy to out: files (default: repo_files(root)) byte for byte, the
    exercises' functions blanked, the folders in link as symbolic links to root's (tests use this
    for data/). Written next to out first and renamed into place, so a failure leaves nothing."""
    files = repo_files(root) if files is None else list(files)
    check_out(out, root, files, force)
    texts = blank_files(root, exercises)
    for path in texts:
        if path not in files:
            raise CourseError(f"{path} holds an exercise but is not among the copied files")
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".student-", dir=parent)
    try:
        for rel in files:
            if any(rel == d or rel.startswith(d + "/") for d in link):
                continue
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if rel in texts:
                with open(dst, "w", encoding="utf-8", newline="") as f:
                    f.write(texts[rel])
                shutil.copymode(os.path.join(root, rel), dst)
            else:
                shutil.copy2(os.path.join(root, rel), dst, follow_symlinks=False)
        for d in link:
            os.makedirs(os.path.dirname(os.path.join(tmp, d)), exist_ok=True)
            os.symlink(os.path.join(os.path.realpath(root), d), os.path.join(tmp, d))
        with open(os.path.join(root, "test_all.py"), "rb") as f:
            tests_sha = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump({"exercises": exercises, "made_from": git_commit(root),
                       "test_all_sha256": tests_sha}, f, indent=1)
            f.write("\n")
        if os.path.isdir(out):  # --force, checked above: an earlier student copy
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------
# The command line: --name=value flags, as the project's scripts take them

def print_list():
    for n, (title, functions, tests) in EXERCISES.items():
        print(f"exercise {n}: {title}")
        print(f"    writes: {', '.join(functions)}")
        print(f"    graded by: {'; '.join(tests)}")


def main(argv):
    opts = {"exercises": None, "out": None, "force": False, "list": False}
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in ("-h", "--help"):
            print(__doc__.strip())
            print("\nflags: --exercises=3,7|all --out=FOLDER --force (replaces an earlier copy)"
                  " --list")
            return
        if key not in opts or not arg.startswith("--"):
            raise CourseError(f"unknown argument '{arg}'; use --exercises=3,7 --out=FOLDER "
                              f"[--force] or --list")
        if isinstance(opts[key], bool):
            if eq and value not in ("True", "False"):
                raise CourseError(f"{arg}: write --{key} or --{key}=True")
            opts[key] = value != "False"
        else:
            if not value:
                raise CourseError(f"{arg}: write --{key}=value")
            opts[key] = value
    if opts["list"]:
        return print_list()
    if opts["exercises"] is None or opts["out"] is None:
        raise CourseError("give --exercises=3,7 (or all) and --out=FOLDER; --list shows them")
    exercises = parse_exercises(opts["exercises"])
    out = write_copy(opts["out"], exercises, force=opts["force"])
    print(f"wrote {out}, to write: exercise {', '.join(map(str, exercises))} "
          f"({', '.join(f for n in exercises for f in EXERCISES[n][1])})")
    left = [f for f in untracked(ROOT) if f.endswith(".py") and not f.startswith("course/")]
    if left:
        print(f"note: not tracked by git, so not copied: {', '.join(left[:6])}"
              f"{' ...' if len(left) > 6 else ''} (commit what the copy needs)")
    print(f"grade it: python {os.path.relpath(os.path.join(ROOT, 'course', 'grade.py'))} "
          f"--repo={opts['out']}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CourseError as e:
        sys.exit(f"error: {e}")
