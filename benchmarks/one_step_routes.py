"""Which one-step route? Runs the collection's default commands (and imf.py with three times its training) as
programs for several training seeds and writes a table of sample quality (W2 / floor, median and range over
the seeds) against the number of network evaluations and the training time. Run from the repository root:

    python benchmarks/one_step_routes.py                  # seeds 0 1 2: about 25 minutes on a 2-core CPU
    python benchmarks/one_step_routes.py --keep           # reuse finished runs in --out, run only what is missing

Each route's numbers come from the metrics.json its command wrote; nothing here imports the scripts."""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (route, script, extra flags, metric key, NFE key or number, stages whose training time counts)
ROUTES = [
    ("FM + dopri5 ODE", "fm.py", [], "ode", "ode_nfe", None),
    ("FM + 8 Euler steps", "fm.py", [], "nfe8", 8, None),
    ("FM + 1 Euler step", "fm.py", [], "nfe1", 1, None),
    ("2-RF (reflow), 1 Euler step", "reflow.py", [], "stage2_nfe1", 1, ["stage1", "pairs1", "stage2"]),
    ("2-RF + one-step distillation", "reflow.py", ["--distill"], "distill_nfe1", 1, ["stage1", "pairs1", "distill"]),
    ("iMF, 1 step", "imf.py", [], "nfe1", 1, None),
    ("iMF, 1 step, 3x the training", "imf.py", ["--steps", "10800"], "nfe1", 1, None),
    ("iMF on a reflow coupling, 1 step", "imf_reflow.py", [], "stage2_nfe1", 1, ["stage1", "pairs1", "stage2"]),
]


def run(script, flags, seed, out, keep, done):
    """metrics.json of `python script --seed S --out out/<script><flags>-s<S> flags`, run once per call of
    main (done: the runs made so far; several routes read one run), or found in --out with --keep."""
    if (script, tuple(flags), seed) in done:
        return done[script, tuple(flags), seed]
    folder = os.path.join(out, "".join([script[:-3], *flags]).replace("--", "-") + f"-s{seed}")
    cmd = [sys.executable, os.path.join(HERE, script), "--seed", str(seed), "--out", folder, *flags]
    path = os.path.join(folder, "metrics.json")
    if keep and os.path.exists(path) and json.load(open(path))["command"].split()[2:] == cmd[2:]:
        done[script, tuple(flags), seed] = json.load(open(path))
        return done[script, tuple(flags), seed]
    print(" ".join(["python", script, *cmd[2:]]), flush=True)
    shutil.rmtree(folder, ignore_errors=True)                      # a fresh run: no stage file is reused
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "run.log"), "w") as log:        # the run's output, and its error if it fails
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    done[script, tuple(flags), seed] = json.load(open(path))
    return done[script, tuple(flags), seed]


def seconds(m, stages):
    """Training time of the stages a route uses (each route trains in its own folder, so none is reused)."""
    if stages is None:
        return m["train_seconds"]
    return sum(m["stages"][k]["train_seconds"] if k in m["stages"] else m["pairs"][k]["seconds"] for k in stages)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)   # python -OO
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--out", default=os.path.join("outputs", "routes"), help="where the runs go")
    p.add_argument("--keep", action="store_true", help="reuse finished runs in --out")
    args = p.parse_args(argv)
    rows, done = [], {}
    for route, script, flags, key, nfe, stages in ROUTES:
        ratios, secs, nfes = [], [], []
        for seed in args.seeds:
            m = run(script, flags, seed, args.out, args.keep, done)
            ratios.append(m[f"w2_ratio_{key}"])
            secs.append(seconds(m, stages))
            nfes.append(m[nfe] if isinstance(nfe, str) else nfe)
        med = statistics.median(ratios)
        command = " ".join(["python", script, *flags])
        rows.append(f"| {route} | `{command}` | {statistics.median(nfes):g} | "
                    f"{statistics.median(secs):.0f} | **{med:.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) | "
                    + ", ".join(f"{r:.2f}" for r in ratios) + " |")
    table = ["| route | command | NFE | training s (median) | W2 / floor, median (range) | per seed "
             + " ".join(str(s) for s in args.seeds) + " |", "|---|---|---|---|---|---|"] + rows
    text = "\n".join(table)
    print(text)
    with open(os.path.join(args.out, "routes.md"), "w") as f:
        f.write(text + "\n")
    return table


if __name__ == "__main__":
    main()
