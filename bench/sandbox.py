"""
Sandbox benchmark: what the isolation boundary and the two-sandbox verdicts cost.

(1) Time per execution of a trivial program (`pass`), median over --repeats runs, variants round robin:
    new       nanochat.execution.execute_code: prlimit + setpriv + bubblewrap (namespaces, seccomp, tmpfs)
    old       the in-process-guard execute_code it replaced (the `python -I` child with monkeypatched
              modules), loaded from git at --old-ref; skipped with a note when git or the ref is missing
    python-I  a bare `/usr/bin/python3 -I -S -c pass` subprocess: the floor, no isolation at all
(2) HumanEval wall time over its problems with the canonical solutions, all of which must pass:
    new       tasks.humaneval.HumanEval.evaluate: check_function, i.e. two sandboxes per problem (program,
              tester) talking through a pipe, verdict signed by a per-run token
    old       the old execute_code on prompt + solution + tests + check(entry_point), pass = exit status 0
    python-I  the same concatenated program in a bare `python -I` subprocess, pass = exit status 0

    python -m bench.sandbox                       # 30 trivial runs per variant, all 164 problems
    python -m bench.sandbox --repeats=10 --problems=20
"""
import os
import statistics
import subprocess
import sys
import time
import types

from nanochat.common import make_parser, positive_int
from nanochat.execution import execute_code
from nanochat.sandbox import ensure_sandbox, interpreter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_REF = "c9e6a7c"  # the last commit with the in-process-guard sandbox


def load_old(ref):
    """The old nanochat/execution.py as a module, or None (with the reason) when git cannot provide it."""
    try:
        source = subprocess.run(["git", "-C", REPO_ROOT, "show", f"{ref}:nanochat/execution.py"], check=True,
                                capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"git show {ref}:nanochat/execution.py failed ({e})"
    module = types.ModuleType("old_execution")
    exec(compile(source, f"{ref}:nanochat/execution.py", "exec"), module.__dict__)
    return module, None


def bare_python(code, timeout=5.0):
    """Exit status 0 of `code` in a bare isolated-mode interpreter (no sandbox)."""
    try:
        return subprocess.run([interpreter(), "-I", "-S", "-c", code], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def time_trivial(variants, repeats):
    """Median seconds per run of `pass` for each variant, interleaved so load bursts hit all alike."""
    times = {name: [] for name in variants}
    for name, fn in variants.items():  # warm-up: page cache, the sandbox probe
        assert fn("pass"), f"{name}: a trivial program failed"
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn("pass")
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_humaneval(task, variants, problems):
    """Wall seconds over the first `problems` problems for each variant, and the ids that did not pass."""
    from tasks.humaneval import build_program
    out = {}
    for name, fn in variants.items():
        failed, t0 = [], time.perf_counter()
        for i in range(problems):
            conv, row = task[i], task.rows[i]
            if name == "new":
                ok = task.evaluate(conv, conv["messages"][1]["content"])
            else:
                program = build_program(row["prompt"], row["canonical_solution"])
                ok = fn(f"{program}\n\n{row['test']}\n\ncheck({row['entry_point']})\n")
            if not ok:
                failed.append(row["task_id"])
        out[name] = (time.perf_counter() - t0, failed)
    return out


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--repeats", type=positive_int, default=30, help="trivial runs per variant")
    parser.add_argument("--problems", type=positive_int, default=164, help="HumanEval problems (from the first)")
    parser.add_argument("--old-ref", default=OLD_REF, help="git ref holding the old in-process-guard sandbox")
    parser.add_argument("--humaneval", default=None, help="HumanEval.jsonl.gz (default: the downloaded data)")
    args = parser.parse_args(argv)

    print(f"sandbox: {ensure_sandbox(allow_unsafe=False)}, interpreter {interpreter()}, {os.cpu_count()} CPUs")
    old, why_old = load_old(args.old_ref)
    variants = {"new": lambda code: execute_code(code, allow_unsafe=False).success}
    if old is not None:
        variants["old"] = lambda code: old.execute_code(code).success
    else:
        print(f"old: skipped ({why_old})")
    variants["python-I"] = bare_python
    trivial = time_trivial(variants, args.repeats)
    print(f"\nper execution of `pass` (median of {args.repeats}):")
    for name, seconds in trivial.items():
        print(f"  {name:9s} {seconds * 1000:7.1f} ms   x{seconds / trivial['python-I']:.2f} of bare python -I")
    if "old" in trivial:
        print(f"  new / old = {trivial['new'] / trivial['old']:.2f}")

    from tasks.humaneval import HumanEval
    task = HumanEval(path=args.humaneval)
    problems = min(args.problems, len(task))
    humaneval = time_humaneval(task, variants, problems)
    print(f"\nHumanEval, canonical solutions, {problems} problems:")
    for name, (seconds, failed) in humaneval.items():
        print(f"  {name:9s} {seconds:7.2f} s  ({seconds / problems * 1000:.0f} ms/problem)  "
              f"{problems - len(failed)}/{problems} passed" + (f"  FAILED: {failed}" if failed else ""))
    if "old" in humaneval:
        print(f"  new / old = {humaneval['new'][0] / humaneval['old'][0]:.2f}")
    print(f"  new / python-I = {humaneval['new'][0] / humaneval['python-I'][0]:.2f}")
    if humaneval["new"][1]:
        print("ERROR: canonical solutions failed in the new sandbox", file=sys.stderr)
    return {"trivial_ms": {k: v * 1000 for k, v in trivial.items()},
            "humaneval_s": {k: v[0] for k, v in humaneval.items()},
            "humaneval_failed": {k: v[1] for k, v in humaneval.items()}, "problems": problems}


if __name__ == "__main__":
    sys.exit(1 if main()["humaneval_failed"]["new"] else 0)
