"""A/B timing of a benchmark module between two revisions, interleaved (before, after, before, ...).

    python -m benchmarks.ab --before REV [--after DIR_OR_REV] [--rounds 3] [--threads N]
                            [--metric REGEX] [--json FILE] -- MODULE [ARGS ...]

``--before`` is a git revision; ``--after`` a revision or a directory (default: this checkout's working
tree, edits included). A revision gets a detached worktree in ``.ab/<sha>`` (kept and reused; remove
with ``git worktree remove .ab/<sha>``), with the compiled extension copied from this checkout when
``csrc/`` and ``setup.py`` are the same there, else built there (``setup.py build_ext --inplace``, same
interpreter, log in ``.ab/<sha>.build.log``). Each run is ``python -m MODULE ARGS`` in a fresh process
whose cwd and ``PYTHONPATH`` are its tree (checked first: ``vital_fast`` and ``MODULE`` must import
from there), with the same environment on both sides (``--threads`` sets OMP/MKL_NUM_THREADS).

``--metric`` is a regex whose last group captures a number; every match in a run's stdout is a row,
named by its first group when it has two, else by the text of its line before the number (table cells
joined by " / "); a name seen again in one run gets "#2", "#3", ... The summary gives per
row the median before, the median after and after/before (under 1: the after side takes less time,
when the number is a time), plus every process's wall time.
``--json`` saves every run's stdout, stderr and wall time.

Examples (single quotes keep the shell off the regex):

    # bench_visualize: seconds per target-step of every provider row (after/before < 1: faster after)
    python -m benchmarks.ab --before HEAD --rounds 3 --threads 1 --metric '\\| ([0-9.]+) \\| [0-9.]+x \\|' \\
        -- benchmarks.bench_visualize --models efficientnet-lite0 --size 64 --steps 3 --rounds 1 --threads 1

    # bench_sweep: wall seconds per mode from its best-of table (rows named by the mode); targets/hour
    # instead: '^\\| ([\\w-]+) \\| \\d+ \\| [0-9.]+ \\| (\\d+) \\|'
    python -m benchmarks.ab --before HEAD~3 --after HEAD --rounds 2 \\
        --metric '^\\| ([\\w-]+) \\| \\d+ \\| ([0-9.]+) \\|' \\
        -- benchmarks.bench_sweep --channels 16 --steps 20 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = ("import importlib, importlib.util, sys, vital_fast; m = importlib.import_module(sys.argv[1]); "
         "s = importlib.util.find_spec('vital_fast._C'); "
         "print(vital_fast.__file__); print(m.__file__); print(s.origin if s else '-')")


def die(msg: str) -> None:
    sys.exit(f"ab: {msg}")


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
    if check and r.returncode:
        die(f"git {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def built_files(tree: str):
    """Relative paths of the compiled extension files of a tree."""
    out = []
    for d, _, files in os.walk(os.path.join(tree, "vital_fast")):
        out += [os.path.relpath(os.path.join(d, f), tree) for f in files if f.endswith((".so", ".pyd"))]
    return sorted(out)


def tree_for(rev: str) -> tuple:
    """(tree, label) for a revision: a worktree in .ab/<sha> with the extension in place."""
    r = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    if r.returncode:
        die(f"unknown revision {rev!r} (not a directory either)")
    sha = r.stdout.strip()
    tree = os.path.join(REPO, ".ab", sha[:12])
    if os.path.isdir(tree) and git("-C", tree, "rev-parse", "HEAD", check=False).stdout.strip() != sha:
        die(f"{tree} exists but is not a worktree at {sha[:12]}; remove it (git worktree remove --force)")
    if not os.path.isdir(tree):
        git("worktree", "prune")
        git("worktree", "add", "--detach", tree, sha)
    same_src = (git("diff", "--quiet", sha, "--", "csrc", "setup.py", check=False).returncode == 0
                and not git("ls-files", "--others", "--exclude-standard", "--", "csrc").stdout.strip())
    if same_src and built_files(REPO):
        for f in built_files(REPO):
            shutil.copy2(os.path.join(REPO, f), os.path.join(tree, f))
        how = "extension copied from this checkout"
    elif built_files(tree):
        how = "extension already there"
    else:
        log = tree + ".build.log"
        print(f"ab: csrc/ or setup.py differ at {rev}: building the extension in {tree} (log {log})",
              file=sys.stderr, flush=True)
        env = {**os.environ, "VITAL_FAST_BUILD_EXT": "1"}  # a failed build fails here, not a silent fallback
        with open(log, "w") as fh:
            rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, stdout=fh,
                                stderr=subprocess.STDOUT, env=env).returncode
        if rc or not built_files(tree):
            die(f"building the extension at {rev} failed (rc {rc}); see {log}")
        how = "extension built there"
    return tree, f"{rev} ({sha[:12]}, {how})"


def side(spec) -> tuple:
    if spec is None:
        spec = REPO
    if os.path.isdir(spec):
        tree = os.path.abspath(spec)
        if not os.path.isdir(os.path.join(tree, "vital_fast")):
            die(f"{tree} has no vital_fast/ package")
        src = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(tree, "csrc")) for f in fs]
        so = [os.path.getmtime(os.path.join(tree, f)) for f in built_files(tree)]
        if so and src and max(map(os.path.getmtime, src)) > min(so):
            print(f"ab: warning: csrc/ in {tree} is newer than its built extension (stale? rebuild it)",
                  file=sys.stderr)
        return tree, f"{tree} (working tree)"
    return tree_for(spec)


def run_env(tree: str, threads) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([tree] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def check_tree(tree: str, module: str, threads) -> None:
    r = subprocess.run([sys.executable, "-c", CHECK, module], cwd=tree, env=run_env(tree, threads),
                       capture_output=True, text=True)
    if r.returncode:
        die(f"importing vital_fast / {module} from {tree} failed:\n{r.stderr.strip()[-3000:]}")
    paths = r.stdout.split()
    root = os.path.realpath(tree) + os.sep
    bad = [p for p in paths if p != "-" and not os.path.realpath(p).startswith(root)]
    if bad:
        die(f"imports from {tree} resolved elsewhere: {bad}")
    print(f"ab:   vital_fast  {paths[0]}\nab:   {module}  {paths[1]}\nab:   vital_fast._C  {paths[2]}"
          + ("  (not built: the pure-torch backend runs)" if paths[2] == "-" else ""), file=sys.stderr)


def rows(text: str, rx: re.Pattern) -> dict:
    """{row name: value} for every match: the value is the last group; the name the first group when there
    are two, else the match's line up to the value (table cells joined by " / ")."""
    out = {}
    for m in rx.finditer(text):
        if rx.groups > 1:
            name = (m.group(1) or "").strip()
        else:
            cells = text[text.rfind("\n", 0, m.start()) + 1:m.start(1)].split("|")  # a table row's cells
            name = " / ".join(c.strip() for c in cells if c.strip())
        name = name or f"match {len(out) + 1}"
        key, k = name, 2
        while key in out:
            key, k = f"{name} #{k}", k + 1
        out[key] = float(m.group(rx.groups))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision")
    ap.add_argument("--after", default=None, help="git revision or directory (default: this working tree)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side, interleaved (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL_NUM_THREADS, both sides")
    ap.add_argument("--metric", default=None, help="regex, its last group a number (see above)")
    ap.add_argument("--json", default=None, help="save every run's output here")
    a = ap.parse_args(argv[:cut])
    bench = argv[cut + 1:]
    if not bench:
        die("give the benchmark module after '--': ... -- benchmarks.bench_visualize [ARGS]")
    try:
        rx = re.compile(a.metric, re.MULTILINE) if a.metric else None
    except re.error as e:
        die(f"bad --metric regex: {e}")
    if rx is not None and rx.groups < 1:
        die("--metric needs a group capturing the number")
    sides = {name: dict(zip(("tree", "label"), side(spec))) for name, spec in (("before", a.before),
                                                                               ("after", a.after))}
    for name, s in sides.items():
        print(f"ab: {name} = {s['label']}", file=sys.stderr)
        check_tree(s["tree"], bench[0], a.threads)
    runs = []
    order = [(rnd, name) for rnd in range(1, a.rounds + 1) for name in sides]  # before, after, before, ...
    for rnd, name in order:
        s = sides[name]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", *bench], cwd=s["tree"], env=run_env(s["tree"], a.threads),
                           capture_output=True, text=True)
        run = {"side": name, "round": rnd, "rc": r.returncode, "wall_s": time.perf_counter() - t0,
               "stdout": r.stdout, "stderr": r.stderr}
        runs.append(run)
        print(f"\n=== {name} round {rnd}/{a.rounds}: {s['label']}, {run['wall_s']:.1f} s, "
              f"rc {r.returncode} ===\n" + r.stdout.rstrip(), flush=True)
        if r.returncode:  # it would fail again: stop, summarize what ran
            print(f"ab: {name} failed:\n" + r.stderr.rstrip()[-4000:], file=sys.stderr)
            break
    table = {}
    for run in runs:
        if run["rc"] == 0:
            got = rows(run["stdout"], rx) if rx else {}
            for key, v in {**got, "(process wall s)": run["wall_s"]}.items():
                table.setdefault(key, {"before": [], "after": []})[run["side"]].append(v)
    summary = []
    omp = a.threads or os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"\nbefore: {sides['before']['label']}\nafter:  {sides['after']['label']}\n"
          f"python -m {' '.join(bench)}; {a.rounds} rounds; OMP_NUM_THREADS={omp}"
          f"\n| row | n | before (median) | after (median) | after/before |\n|---|---|---:|---:|---:|")
    for key, v in table.items():
        b = statistics.median(v["before"]) if v["before"] else float("nan")
        f = statistics.median(v["after"]) if v["after"] else float("nan")
        ratio = f / b if b else float("nan")
        summary.append({"row": key, "before": v["before"], "after": v["after"], "ratio": ratio})
        print(f"| {key} | {len(v['before'])}/{len(v['after'])} | {b:.4g} | {f:.4g} | {ratio:.3f} |")
    if rx is not None and len(table) == 1:
        print(f"ab: --metric {a.metric!r} matched nothing in any run's stdout", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"sides": sides, "command": bench, "rounds": a.rounds, "threads": a.threads,
                       "metric": a.metric, "runs": runs, "summary": summary}, fh, indent=1)
    return 1 if any(run["rc"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
