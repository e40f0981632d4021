"""What the reflow pairs' ODE costs: network evaluations, seconds per 1000 pairs and the endpoints' error, for
dopri5 at several tolerances and for fixed-step solvers, on the (guided) ODE of a trained reflow.py stage 1.
The error is the RMS distance, in pixel units of [0, 1] (or toy model units), of each solver's endpoints from
those of dopri5 at rtol = atol = 1e-5 (reflow.py on toys and digits; on mnist it takes 16 midpoint steps).
The ODE here is guided at every t; reflow.py's mnist pairs leave t > 0.9 unguided (60 evaluations, not 64).

    python reflow.py --data mnist --cond --guidance 2 --out outputs/reflow_mnist     # makes stage1.pt
    python benchmarks/pairs_ode_cost.py outputs/reflow_mnist/stage1.pt --guidance 2 --n 200
    python benchmarks/pairs_ode_cost.py outputs/reflow_mnist/stage1.pt --guidance 2 --n 1024 --solvers 0 \
        --chunks 64,256,1024                                # the ODE's batch size (reflow.py: 256 on mnist)

It imports reflow.py (the scripts themselves import nothing from each other)."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reflow  # noqa: E402

SOLVERS = [("dopri5", 1e-5), ("dopri5", 1e-4), ("dopri5", 1e-3), ("dopri5", 1e-2),
           ("euler", 8), ("euler", 32), ("midpoint", 4), ("midpoint", 8), ("midpoint", 16), ("rk4", 4),
           ("rk4", 8)]


def endpoints(model, e, labels, w, solver, arg):
    """x_hat = ODE(e) and the network evaluations: dopri5 with tolerance arg, or arg fixed steps."""
    from torchdiffeq import odeint
    guided = 1 if labels is None or w == 1 else 2
    calls = [0]

    def f(t, z):
        calls[0] += guided
        return reflow.velocity(model, z, t.expand(len(z)), labels, w)

    with torch.no_grad():
        if solver == "dopri5":                              # as reflow.ode_generate, at tolerance arg
            x = odeint(f, e, torch.tensor([1.0, 0.0]), method="dopri5", rtol=arg, atol=arg,
                       options={"dtype": torch.float64})[-1]
            return x, calls[0]
        x = odeint(f, e, torch.tensor([1.0, 0.0]), method=solver, options={"step_size": 1.0 / arg})[-1]
    return x, {"euler": 1, "midpoint": 2, "rk4": 4}[solver] * guided * arg


def main(argv=None):
    p = argparse.ArgumentParser(description="The reflow pairs' ODE cost per solver.")
    p.add_argument("stage1", help="a stage1.pt written by reflow.py")
    p.add_argument("--n", type=int, default=200, help="pairs to simulate per solver")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance weight (needs a --cond stage 1)")
    p.add_argument("--solvers", type=int, default=len(SOLVERS), help="only the first N solvers")
    p.add_argument("--chunks", default="", help="also time reflow.make_pairs with these chunk sizes (comma "
                   "separated; 16 midpoint steps, two alternating rounds); 0 times nothing more")
    args = p.parse_args(argv)
    saved = torch.load(args.stage1, map_location="cpu", weights_only=True)
    config = saved["config"]
    data = reflow.Data(config["data"], config["data_dir"], 0, torch.device("cpu"), 1)
    n_classes = data.n_classes if config["cond"] else 0
    if data.shape == (2,):                                  # the network reflow.py trains on this data
        model = reflow.ResMLP(1, n_classes)
    else:
        model = reflow.SmallUNet(data.shape, 1, config["channels"], n_classes)
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(saved["ema"])
    e = torch.randn(args.n, *data.shape, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(args.n) % n_classes if n_classes else None
    scale = 2.0 if len(data.shape) == 3 else 1.0            # images: model units [-1, 1] to pixels [0, 1]
    rows, reference = {}, None
    print(f"{args.n} pairs of {args.stage1} ({config['data']}, guidance {args.guidance:g}, "
          f"{torch.get_num_threads()} threads)")
    for solver, arg in SOLVERS[:args.solvers]:
        t0 = time.perf_counter()
        x, nfe = endpoints(model, e, labels, args.guidance, solver, arg)
        seconds = (time.perf_counter() - t0) * 1000 / args.n
        reference = x if reference is None else reference
        rms = ((x - reference) ** 2).mean().sqrt().item() / scale
        name = f"{solver} tol {arg:g}" if solver == "dopri5" else f"{solver}, {arg} steps"
        rows[name] = {"nfe": nfe, "seconds_per_1000": round(seconds, 2), "rms": round(rms, 4)}
        print(f"{name:>20}: {nfe:4d} NFE, {seconds:7.1f} s per 1000 pairs, RMS to dopri5 1e-5 {rms:.4f}",
              flush=True)
    chunks = [int(c) for c in args.chunks.split(",") if c.strip() and int(c) > 0]
    for rnd in range(2 if chunks else 0):                   # batch size of the ODE: CPUs differ
        for chunk in chunks:
            t0 = time.perf_counter()
            reflow.make_pairs(model, args.n, data.shape, 1, n_classes=n_classes, w=args.guidance, steps=16,
                              chunk=chunk)
            seconds = (time.perf_counter() - t0) * 1000 / args.n
            rows.setdefault(f"chunk {chunk}", []).append(round(seconds, 2))
            print(f"round {rnd + 1}, 16 midpoint steps, chunks of {chunk:5d}: {seconds:7.1f} s per 1000 "
                  "pairs", flush=True)
    return rows


if __name__ == "__main__":
    main()
