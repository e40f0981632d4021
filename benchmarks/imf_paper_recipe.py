"""imf.py trained with the MeanFlow/iMF papers' (r, t) sampler and adaptive loss weighting instead of this
collection's recipe, to measure one against the other (RESULTS.md). It replaces imf.imf_loss and runs
imf.main, so every imf.py flag works. From the repository root:

    python benchmarks/imf_paper_recipe.py --sampler logit-normal --boundary-frac 0.75 --seed 0
    python benchmarks/imf_paper_recipe.py --sampler split --adaptive-p 1 --seed 0

The papers' sampler draws two logit-normal(-0.4, 1) times, sorts them into r <= t and sets r = t for a share
of the batch (imf.py's --boundary-frac); their adaptive weighting divides each sample's squared error, summed
over its dimensions, by (its detached value + c)^p."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imf  # noqa: E402


def sample_r_t_logit_normal(n, device, boundary_frac=0.75, mu=-0.4, sigma=1.0):
    """Two logit-normal times sorted into r <= t; the first boundary_frac * n rows get r = t."""
    nb = round(n * boundary_frac)
    a = torch.sigmoid(mu + sigma * torch.randn(n, device=device))
    b = torch.sigmoid(mu + sigma * torch.randn(n, device=device))
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    r[:nb] = t[:nb]
    return r, t, nb


def paper_loss(model, x, e, boundary_frac, r0_frac, boundary_t, sampler="logit-normal", p=0.0, c=1e-3):
    """imf.imf_loss with the papers' sampler and/or adaptive weighting; the compound target is the same."""
    if sampler == "split":
        r, t, nb = imf.sample_r_t(len(x), x.device, boundary_frac, r0_frac, boundary_t)
    else:
        r, t, nb = sample_r_t_logit_normal(len(x), x.device, boundary_frac)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e
    u = model(z, r, t)
    with torch.no_grad():
        zj, rj, tj = z[nb:], r[nb:], t[nb:]
        _, dudt = imf.meanflow_jvp(model, zj, rj, tj, model(zj, tj, tj))
    V = torch.cat([u[:nb], u[nb:] + (tj - rj).view(-1, *tb.shape[1:]) * dudt])
    if p == 0:
        return ((V - (e - x)) ** 2).mean()
    err = ((V - (e - x)) ** 2).flatten(1).sum(1)           # each sample's squared error, summed over dimensions
    return (err / (err.detach() + c) ** p).mean()          # adaptive weighting: err / sg(err + c)^p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description="imf.py with the papers' (r, t) sampler or loss weighting",
                                add_help=False)
    p.add_argument("--sampler", default="logit-normal", choices=["split", "logit-normal"],
                   help="(r, t): the papers' logit-normal pair, or imf.py's split (only it uses --boundary-t)")
    p.add_argument("--adaptive-p", type=float, default=0.0, help="adaptive weighting power p (0: plain loss)")
    p.add_argument("--adaptive-c", type=float, default=1e-3, help="adaptive weighting constant c")
    args, rest = p.parse_known_args(argv)
    if imf.get_args(rest).cond:
        p.error("the papers' recipe here is unconditional: drop --cond")
    recipe = {"sampler": args.sampler, "adaptive_p": args.adaptive_p, "adaptive_c": args.adaptive_c}
    imf.imf_loss = lambda m, x, e, labels, guidance, boundary_frac, r0_frac, boundary_t: paper_loss(
        m, x, e, boundary_frac, r0_frac, boundary_t, args.sampler, args.adaptive_p, args.adaptive_c)
    if "--out" not in rest:          # a folder of its own: --resume never continues another recipe's run
        name = f"imf_paper_{args.sampler}_p{args.adaptive_p:g}_c{args.adaptive_c:g}"
        rest += ["--out", os.path.join("outputs", name)]
    metrics = imf.main(rest)
    metrics.update(recipe, command=" ".join(["python", "benchmarks/imf_paper_recipe.py", *argv]))
    with open(os.path.join(rest[rest.index("--out") + 1], "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main()
