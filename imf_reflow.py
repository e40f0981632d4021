"""imf_reflow.py - improved MeanFlow trained on a reflow coupling: two stages for better one-step samples.

Method (the iMF + Reflow notes; iMF: Geng et al. 2025; reflow: Liu et al. 2023):
  stage 1 (teacher), --teacher imf: iMF on independent pairs (x ~ data, e ~ N(0, I)), exactly as imf.py:
      u(z, r, t) average velocity, z_r = z_t - (t - r) u(z_t, r, t); boundary u(z, t, t) = v(z, t)
      V = u(z_t, r, t) + (t - r) sg(d/dt u),  d/dt u = JVP with tangent (v_theta, 0, 1);  loss ||V - (e - x)||^2
    --teacher fm (default): flow matching on the boundary only, ||u(z_t, t, t) - (e - x)||^2: half the step
      cost and no JVP; in the README's runs it makes the better teacher for the same time
  coupling: x_hat = ODE(e), dz/dt = u(z, t, t) integrated from t = 1 to 0 with torchdiffeq dopri5
  stage 2: the same iMF loss on straight lines between the pairs, z_t = (1 - t) x_hat + t e, starting
      from the stage-1 weights. The pairs do not cross, so the average velocity over [0, 1] is the
      straight line e - x_hat itself and one step x = e - u(e, r=0, t=1) has far less to average out.

Time convention (the whole collection): data x at t = 0, noise e at t = 1,
  z_t = (1 - t) * x + t * e,  v = dz_t/dt = e - x,  sampling runs from t = 1 down to t = 0.
  (Flow Matching / Rectified Flow papers put noise at t = 0: map their t to 1 - t.)

Run:   python imf_reflow.py                   # moons, about 1.5 minutes on a laptop CPU
       python imf_reflow.py --teacher imf     # iMF teacher, as in the notes (see the README for both)
       python imf_reflow.py --reflow-steps 4000  # reuses stage 1 and its pairs from the first run
       python imf_reflow.py --data digits --steps 2000 --reflow-steps 1000 --batch-size 128 --channels 16 \
           --lr 2e-3   # 8x8 images, offline, ~5.5 min (half of it simulating the pairs)
Outputs in --out (default outputs/imf_reflow/): results.png, samples.npz, metrics.json, stage1.pt, pairs1.pt,
stage2.pt (stage files and pairs are reused by a later run whose settings match).
"""
import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")  # from torch.func.jvp's first use

# --- config ---
SCRIPT = "imf_reflow"
TOY_DATA = ["moons", "8gaussians", "checkerboard", "spirals", "circles"]
IMAGE_DATA = ["digits", "mnist"]


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def positive_float(s):
    v = float(s)
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def fraction(s):
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def get_args(argv=None):
    p = argparse.ArgumentParser(description="improved MeanFlow trained on a reflow coupling (two stages).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="moons", choices=TOY_DATA + IMAGE_DATA, help="dataset")
    p.add_argument("--data-dir", default="data", help="where MNIST is stored / downloaded")
    p.add_argument("--steps", type=positive_int, default=4000, help="training steps of stage 1 (the teacher)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="batch size")
    p.add_argument("--lr", type=positive_float, default=5e-3, help="Adam learning rate")
    p.add_argument("--ema", type=fraction, default=0.999, help="EMA decay of the weights used for sampling; capped by "
                        "(1 + step) / (10 + step), which at 0.999 binds for the first ~9000 steps")
    p.add_argument("--hidden", type=positive_int, default=64, help="width of the 2D residual MLP")
    p.add_argument("--depth", type=positive_int, default=3, help="residual blocks of the 2D MLP")
    p.add_argument("--channels", type=positive_int, default=32, help="base channels of the image U-Net")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help=f"output folder (default outputs/{SCRIPT})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its file in --out "
                        "(finished stages and pairs whose settings match are reused without it)")
    p.add_argument("--n-eval", type=positive_int, default=2000, help="samples for the W2 metric")
    p.add_argument("--ckpt-every", type=positive_int, default=2000, help="checkpoint interval in steps")
    # iMF's own flags
    p.add_argument("--boundary-frac", type=fraction, default=0.7,
                   help="fraction of the batch with r = t (plain flow matching on u(z, t, t))")
    p.add_argument("--r0-frac", type=fraction, default=0.2,
                   help="fraction with r = 0, t ~ U(0, 1]: the slice whose corner (0, 1) 1-NFE sampling uses")
    # reflow's own flags
    p.add_argument("--teacher", default="fm", choices=["fm", "imf"],
                   help="stage 1: fm = flow matching on the boundary u(z, t, t) only (half the step cost, the "
                        "better teacher in the README's runs), imf = iMF as in imf.py (the notes' recipe)")
    p.add_argument("--reflow-steps", type=positive_int, default=2000, help="training steps of stage 2")
    p.add_argument("--from-scratch", action="store_true", help="start stage 2 from new weights, not stage 1's")
    p.add_argument("--n-pairs", type=positive_int, default=16384, help="(x_hat, e) pairs simulated from stage 1")
    p.add_argument("--rtol", type=positive_float, default=1e-5, help="dopri5 relative tolerance (pairs and 'ode')")
    p.add_argument("--atol", type=positive_float, default=1e-5, help="dopri5 absolute tolerance (pairs and 'ode')")
    args = p.parse_args(argv)
    if args.boundary_frac + args.r0_frac > 1:
        p.error("--boundary-frac + --r0-frac must be at most 1")
    args.out = args.out or os.path.join("outputs", SCRIPT)
    return args


def run_config(args):
    """The settings stage 1 depends on; later stages add theirs (stage_configs)."""
    return {"script": SCRIPT, "data": args.data, "hidden": args.hidden, "depth": args.depth,
            "channels": args.channels, "seed": args.seed, "lr": args.lr, "batch_size": args.batch_size,
            "ema": args.ema, "steps": args.steps, "teacher": args.teacher,
            **({"boundary_frac": args.boundary_frac, "r0_frac": args.r0_frac} if args.teacher == "imf" else {})}


# --- data ---
# Toys: a pool of 65,536 points generated at start (batches are drawn from it), scaled with fixed
# constants to about zero mean and unit variance; held-out and floor sets come from other seeds.
TOY_CENTER_SCALE = {"moons": ([0.5, 0.25], [0.87, 0.5]), "8gaussians": ([0.0, 0.0], [1.5, 1.5]),
                    "checkerboard": ([0.0, 0.0], [1.15, 1.15]), "spirals": ([0.0, 0.0], [1.6, 1.6]),
                    "circles": ([0.0, 0.0], [0.56, 0.56])}


def toy_points(name, n, rng):
    """n points of a 2D toy in its own (unnormalised) coordinates, from the numpy Generator rng."""
    from sklearn.datasets import make_circles, make_moons
    if name == "moons":
        return make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))[0]
    if name == "circles":
        return make_circles(n, factor=0.5, noise=0.05, random_state=int(rng.integers(2**31)))[0]
    if name == "8gaussians":
        angles = rng.integers(8, size=n) * (np.pi / 4)
        return 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.15 * rng.standard_normal((n, 2))
    if name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - 2 * rng.integers(2, size=n) + np.floor(x1) % 2
        return np.stack([x1, x2], 1)
    if name == "spirals":
        s = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
        sign = np.where(rng.integers(2, size=n) == 0, 1.0, -1.0)[:, None]
        pts = sign * np.stack([-np.cos(s) * s, np.sin(s) * s], 1) / 4
        return pts + 0.08 * rng.standard_normal((n, 2))
    raise ValueError(f"unknown toy dataset {name!r}")


def load_images(name, data_dir, seed):
    """(train, heldout) float tensors (N, 1, H, W) in [0, 1]."""
    if name == "digits":
        from sklearn.datasets import load_digits
        x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        return x[perm[360:]], x[perm[:360]]
    try:
        from torchvision.datasets import MNIST
        train = MNIST(data_dir, train=True, download=True).data
        test = MNIST(data_dir, train=False, download=True).data
    except Exception as err:  # no network, bad files, ...
        sys.exit(f"error: could not load MNIST from {data_dir!r} ({type(err).__name__}: {err}); "
                 "try --data digits, which works offline")
    return train[:, None].float() / 255.0, test[:2000, None].float() / 255.0


class Data:
    """Training batches in model coordinates, held-out samples in data coordinates."""

    def __init__(self, name, data_dir, seed, device, n_eval):
        self.name, self.device = name, device
        self.rng = np.random.default_rng(seed)
        if name in TOY_DATA:
            self.shape = (2,)
            self.pool = torch.tensor(toy_points(name, 2**16, self.rng), dtype=torch.float32)
            center, scale = TOY_CENTER_SCALE[name]
            self.center, self.scale = torch.tensor(center), torch.tensor(scale)
            self.heldout = toy_points(name, n_eval, np.random.default_rng(seed + 1000)).astype(np.float32)
            self.floor_set = toy_points(name, n_eval, np.random.default_rng(seed + 2000)).astype(np.float32)
        else:
            train, heldout = load_images(name, data_dir, seed)
            self.shape = tuple(train.shape[1:])
            self.train = (2 * train - 1).to(device)  # model coordinates [-1, 1]
            n = min(n_eval, len(heldout))
            g = torch.Generator().manual_seed(seed + 2000)
            self.heldout = heldout[:n].reshape(n, -1).numpy()
            self.floor_set = train[torch.randperm(len(train), generator=g)[:n]].reshape(n, -1).numpy()
        self.n_eval = len(self.heldout)

    def draw(self, n):
        """A training batch of n samples in model coordinates, on the device."""
        if self.shape == (2,):
            x = self.pool[torch.from_numpy(self.rng.integers(len(self.pool), size=n))]
            return ((x - self.center) / self.scale).to(self.device)
        idx = torch.from_numpy(self.rng.integers(len(self.train), size=n)).to(self.device)
        return self.train[idx]

    def to_data(self, x):
        """Model coordinates -> data coordinates (toy units, or images in [0, 1]) as a numpy array."""
        x = x.detach().float().cpu()
        if self.shape == (2,):
            return (x * self.scale + self.center).numpy()
        return ((x + 1) / 2).clamp(0, 1).numpy()


# --- model ---
class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t in [0, 1] with low frequencies (1..max_freq rad): the iMF loss differentiates
    the network in t, and high frequencies (up to 30 rad) made 1-NFE samples about 1.3x worse here."""

    def __init__(self, dim=64, max_freq=2.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2)))

    def forward(self, t):
        angles = t[:, None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResMLP(nn.Module):
    """Residual MLP for 2D data, conditioned on n_times scalar times: forward(z, *times)."""

    def __init__(self, dim=2, n_times=1, hidden=128, depth=3, emb=64):
        super().__init__()
        self.embed = TimeEmbedding(emb)
        self.cond = nn.Sequential(nn.Linear(n_times * emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, z, *times):
        c = self.cond(torch.cat([self.embed(t) for t in times], dim=-1))
        h = self.inp(z)
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)


class SmallUNet(nn.Module):
    """Two-level U-Net for small images (8x8 digits, 28x28 MNIST), conditioned on n_times times."""

    def __init__(self, in_ch=1, n_times=1, ch=32, emb=64):
        super().__init__()
        self.embed = TimeEmbedding(emb)
        self.cond = nn.Sequential(nn.Linear(n_times * emb, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 3 * ch))
        self.in1 = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.in2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1)
        self.mid1 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.mid2 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1)
        self.out1 = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.out2 = nn.Conv2d(ch, in_ch, 3, padding=1)
        self.ch = ch

    def forward(self, z, *times):
        c = self.cond(torch.cat([self.embed(t) for t in times], dim=-1))[:, :, None, None]
        c1, c2 = c[:, :self.ch], c[:, self.ch:]
        h1 = F.silu(self.in2(F.silu(self.in1(z))) + c1)
        d = F.silu(self.down(h1))
        m = d + self.mid2(F.silu(self.mid1(d + c2)))
        u = F.silu(self.up(F.silu(m)))
        return self.out2(F.silu(self.out1(torch.cat([u, h1], dim=1))))


def make_model(shape, n_times, args):
    if len(shape) == 1:
        return ResMLP(shape[0], n_times, args.hidden, args.depth)
    return SmallUNet(shape[0], n_times, args.channels)


# --- method ---
def sample_r_t(n, device, boundary_frac, r0_frac):
    """Times r <= t, in blocks: the first n_b = boundary_frac * n have r = t (flow matching on the boundary
    v = u(z, t, t)); the next r0_frac * n have r = 0, t ~ U(0, 1): the slice u(z, 0, t) whose corner
    (r, t) = (0, 1) is the one-step sampler; the rest are the min and max of two uniform times."""
    nb, n0 = round(n * boundary_frac), round(n * r0_frac)
    a, b = torch.rand(n, device=device), torch.rand(n, device=device)
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    r[:nb] = t[:nb]
    r[nb:nb + n0], t[nb:nb + n0] = 0.0, 1.0 - a[nb:nb + n0]
    return r, t, nb


def meanflow_jvp(model, z, r, t, v):
    """u(z, r, t) and its total derivative d/dt u = du/dz . v + du/dt: one batched forward-mode JVP
    with tangent (v, 0, 1). The model treats samples independently, so no per-sample vmap is needed.
    Weights enter as inputs with explicit zero tangents: the same result, and several times faster on
    CPU than letting torch.func treat them as constants (their implicit zero tangents broadcast slowly)."""
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    zeros = {k: torch.zeros_like(w) for k, w in weights.items()}
    f = lambda w, z, r, t: torch.func.functional_call(model, w, (z, r, t))  # noqa: E731
    return torch.func.jvp(f, (weights, z, r, t), (zeros, v, torch.zeros_like(r), torch.ones_like(t)))


def imf_loss(model, x, e, args):
    """iMF loss ||u(z_t, r, t) + (t - r) sg(d/dt u) - (e - x)||^2 with v_theta = u(z_t, t, t) as tangent."""
    r, t, nb = sample_r_t(len(x), x.device, args.boundary_frac, args.r0_frac)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e                               # z_t = (1 - t) x + t e
    u = model(z, r, t)                                      # u_theta(z_t, r, t), trained
    with torch.no_grad():                                   # sg(.): no graph for the JVP term, which
        zj, rj, tj = z[nb:], r[nb:], t[nb:]                 # vanishes on the boundary r = t: skip it there
        v_theta = model(zj, tj, tj)                         # boundary condition: v(z, t) = u(z, t, t)
        _, dudt = meanflow_jvp(model, zj, rj, tj, v_theta)  # d/dt u along the tangent (v_theta, 0, 1)
    V = torch.cat([u[:nb], u[nb:] + (tj - rj).view(-1, *tb.shape[1:]) * dudt])  # compound V_theta
    return ((V - (e - x)) ** 2).mean()                      # regress the conditional velocity e - x


@torch.no_grad()
def sample(model, e, nfe):
    """nfe equal steps from t = 1 to 0 with z_r = z_t - (t - r) u(z_t, r, t); nfe = 1 is x = e - u(e, 0, 1)."""
    z, ts = e, torch.linspace(1.0, 0.0, nfe + 1, device=e.device)
    for i in range(nfe):
        t, r = ts[i].expand(len(e)), ts[i + 1].expand(len(e))
        z = z - (ts[i] - ts[i + 1]) * model(z, r, t)
    return z


@torch.no_grad()
def euler_sample(model, e, nfe):
    """nfe Euler steps of the instantaneous velocity v(z, t) = u(z, t, t): the flow-matching teacher's
    own few-step sampler (it never trained u(z, r, t) for r < t)."""
    z, ts = e, torch.linspace(1.0, 0.0, nfe + 1, device=e.device)
    for i in range(nfe):
        t = ts[i].expand(len(e))
        z = z + (ts[i + 1] - ts[i]) * model(z, t, t)
    return z


def fm_loss(model, x, e):
    """Flow-matching teacher (--teacher fm): only the boundary u(z_t, t, t) = v(z_t, t) is trained, no JVP."""
    t = torch.rand(len(x), device=x.device)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e
    return ((model(z, t, t) - (e - x)) ** 2).mean()


@torch.no_grad()
def ode_generate(model, e, args, n_grid=1):
    """dopri5 (torchdiffeq) for dz/dt = v(z, t) = u(z, t, t), the instantaneous velocity, from t = 1 to 0.
    Returns the states at n_grid + 1 equally spaced times (path[-1] = x_hat) and the function evaluations."""
    from torchdiffeq import odeint
    nfe = [0]

    def f(t, z):
        nfe[0] += 1
        return model(z, t.expand(len(z)), t.expand(len(z)))

    ts = torch.linspace(1.0, 0.0, n_grid + 1, device=e.device)
    return odeint(f, e, ts, method="dopri5", rtol=args.rtol, atol=args.atol), nfe[0]


# --- training ---
def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        sys.exit("error: --device mps asked for, but MPS is not available")
    return torch.device(name)


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write never replaces a good checkpoint with a broken one."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, config, device):
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not {"model", "ema", "optimizer", "step", "config"} <= set(ckpt):
            raise ValueError("missing keys")
    except Exception as err:
        sys.exit(f"error: cannot read checkpoint {path} ({type(err).__name__}: {str(err)[:80]}); "
                 "delete it or choose another --out")
    diff = {k: (ckpt["config"].get(k), v) for k, v in config.items() if ckpt["config"].get(k) != v}
    if diff:
        what = ", ".join(f"{k}={old!r} there but {new!r} here" for k, (old, new) in diff.items())
        sys.exit(f"error: checkpoint {path} is from another config ({what}); "
                 "use another --out or run without --resume to start over")
    return ckpt


def train(model, loss_fn, draw, args, config, ckpt_path, device, desc="train"):
    """Adam with an EMA copy for sampling; checkpoints, NaN guard, Ctrl-C saves. Returns (ema, info)."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, foreach=True)
    warmup = min(200, args.steps // 10 + 1)

    def lr_at(s):                                          # linear warm-up, then cosine decay to lr / 20
        return args.lr * min(1.0, (s + 1) / warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * s / args.steps)))
    ema = copy.deepcopy(model).requires_grad_(False)
    step, losses = 0, []
    if args.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, config, device)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step, losses = ckpt["step"], list(ckpt.get("losses", []))
        print(f"[{desc}] resumed from {ckpt_path} at step {step}")

    def state():
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "config": config, "losses": losses}

    start_step, pending, interrupted, log_every = step, [], False, 50
    t0 = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc=desc, mininterval=1.0, disable=step >= args.steps)
    try:
        while step < args.steps:
            x, e = draw(args.batch_size)
            loss = loss_fn(model, x, e)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.step()
            with torch.no_grad():
                decay = min(args.ema, (1 + step) / (10 + step))
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            pending.append(loss.detach())
            step += 1
            if step % log_every == 0 or step == args.steps:
                vals = torch.stack(pending).tolist()  # one device sync per log interval
                pending = []
                if not all(math.isfinite(v) for v in vals):
                    bad = step - len(vals) + next(i for i, v in enumerate(vals) if not math.isfinite(v))
                    bar.close()
                    sys.exit(f"error: loss became non-finite at step {bad + 1}; try a lower --lr "
                             f"(e.g. --lr {args.lr / 4:g}). Last good checkpoint: {ckpt_path}")
                losses += vals
                bar.update(len(vals))
                bar.set_postfix(loss=f"{np.mean(vals):.4f}")
                if step % args.ckpt_every == 0 or step == args.steps:
                    save_checkpoint(ckpt_path, state())
    except KeyboardInterrupt:
        interrupted = True
        losses += [v for v in torch.stack(pending).tolist() if math.isfinite(v)] if pending else []
        save_checkpoint(ckpt_path, state())
        print(f"\n[{desc}] interrupted at step {step}: saved {ckpt_path} (continue with --resume)")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    done = step - start_step
    info = {"steps": step, "train_seconds": round(seconds, 2),
            "ms_per_step": round(1000 * seconds / done, 3) if done else None,
            "losses": losses, "interrupted": interrupted}
    return ema, info


# --- evaluation ---
def w2_distance(a, b):
    """Exact 2-Wasserstein distance between two equal-size point sets (optimal matching)."""
    from scipy.optimize import linear_sum_assignment
    a = torch.as_tensor(a, dtype=torch.float64).reshape(len(a), -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(len(b), -1)
    if a.var(0).sum() < b.var(0).sum():  # same optimum; the solver is several times faster with the
        a, b = b, a                         # wider set as rows when the other is collapsed (a poor 1-step set)
    cost = (torch.cdist(a, b) ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def report(samples, data):
    """W2 of each sampler setting against held-out real data, next to the floor of two real sets."""
    floor = w2_distance(data.floor_set, data.heldout)
    metrics = {"w2_floor": round(floor, 5), "n_eval": data.n_eval}
    for key, x in samples.items():
        w2 = w2_distance(x, data.heldout)
        metrics[f"w2_{key}"], metrics[f"w2_ratio_{key}"] = round(w2, 5), round(w2 / floor, 3)
        print(f"{key:>6}  W2 {w2:.4f}  floor {floor:.4f}  ({w2 / floor:.2f}x)")
    return metrics


def save_results(out, samples, data, metrics):
    np.savez(os.path.join(out, "samples.npz"), real=data.heldout.reshape(-1, *data.shape), **samples)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


def image_grid(x, shape, n=8, pad=1):
    """Up to n x n images side by side, separated by pad grey pixels."""
    n = min(n, int(np.sqrt(len(x))))
    x = x[: n * n].reshape(n * n, *shape[1:])
    h, w = x.shape[1:]
    grid = np.full((n * (h + pad) - pad, n * (w + pad) - pad), 0.5, dtype=np.float32)
    for k in range(n * n):
        i, j = divmod(k, n)
        grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = x[k]
    return grid


def plot_results(path, title, data, samples, metrics, losses, paths=None, paths_title="", path_colors=None):
    """One figure: real data, each sampler setting, optional 2D paths (source -> sample), loss curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = 2 + len(samples) + (paths is not None)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
    sets = [("real (held-out)", data.heldout)] + [
        (f"{k}  W2 {metrics[f'w2_ratio_{k}']:.2f}x floor", v) for k, v in samples.items()]
    for ax, (name, x) in zip(axes, sets):
        if data.shape == (2,):
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color="C0" if name.startswith("real") else "C1")
            ax.set_xlim(axes[0].get_xlim()) if name != sets[0][0] else None
            ax.set_ylim(axes[0].get_ylim()) if name != sets[0][0] else None
        else:
            ax.imshow(image_grid(x, data.shape), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    if paths is not None:
        ax = axes[len(sets)]
        for i, p in enumerate(paths[:300]):
            ax.plot(p[:, 0], p[:, 1], color="gray" if path_colors is None else f"C{path_colors[i] % 10}",
                    lw=0.4, alpha=0.5)
        ax.scatter(paths[:300, 0, 0], paths[:300, 0, 1], s=3, color="C2", label="source")
        ax.scatter(paths[:300, -1, 0], paths[:300, -1, 1], s=3, color="C1", label="sample")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(paths_title, fontsize=9)
    ax = axes[-1]
    ax.plot(losses, lw=0.3, alpha=0.4, color="C0")
    if len(losses) >= 50:
        ax.plot(np.arange(49, len(losses)), np.convolve(losses, np.ones(50) / 50, "valid"), color="C3")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training loss", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---
def make_pairs(model, args, shape, k, device):
    """The stage-k coupling: noise e and x_hat = ODE_k(e), simulated in chunks; returns CPU tensors."""
    g = torch.Generator().manual_seed(args.seed + 4000 + k)
    e = torch.randn(args.n_pairs, *shape, generator=g)
    x, nfe = [], 0
    for chunk in tqdm(e.split(4096), desc=f"pairs of stage {k} (dopri5)", mininterval=1.0):
        path, n = ode_generate(model, chunk.to(device), args)
        x.append(path[-1].cpu())
        nfe += n
    return torch.cat(x), e, nfe


def stage_configs(args):
    """The settings each stage file (and the pairs file) depends on: its own and those of the stages before it.
    A file whose stored config differs is recomputed, never mixed with this run's."""
    stage1 = run_config(args)
    pairs1 = {**stage1, "pairs1": {"n": args.n_pairs, "rtol": args.rtol, "atol": args.atol}}
    stage2 = {**pairs1, "stage2": {"steps": args.reflow_steps, "from_scratch": args.from_scratch,
                                   "boundary_frac": args.boundary_frac, "r0_frac": args.r0_frac}}
    return {"stage1": stage1, "pairs1": pairs1, "stage2": stage2}


def read_stored(path, config, what):
    """The dict saved at path if it was made with this config; None if absent or made with another (said)."""
    if not os.path.exists(path):
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        old = stored["config"]
    except Exception as err:
        sys.exit(f"error: cannot read {what} {path} ({type(err).__name__}: {str(err)[:80]}); "
                 "delete it or choose another --out")
    if old != config:
        diff = ", ".join(f"{k}={old.get(k)!r} there but {v!r} here" for k, v in config.items() if old.get(k) != v)
        print(f"note: {path} was made with other settings ({diff}); recomputing it")
        return None
    return stored


def train_stage(name, model, loss_fn, draw, args, config, steps, device):
    """Train one stage into --out/<name>.pt, or reuse that file when it was made with this config."""
    path = os.path.join(args.out, f"{name}.pt")
    stored = read_stored(path, config, "stage file")
    reuse = stored is not None and (stored["step"] >= steps or args.resume)
    if stored is not None and not reuse:
        print(f"note: {path} stopped at step {stored['step']} of {steps}; starting it over (--resume continues it)")
    elif reuse and stored["step"] >= steps:
        print(f"[{name}] {path} was made with these settings: reusing it")
    stage_args = argparse.Namespace(**{**vars(args), "steps": steps, "resume": reuse})
    ema, info = train(model, loss_fn, draw, stage_args, config, path, device, desc=name)
    info["reused"] = stored is not None and stored["step"] >= steps
    return ema, info


def get_pairs(model, args, shape, k, config, device):
    """Pairs (x_hat, e) of stage k from --out/pairs<k>.pt when made with this config, else simulated and saved."""
    path = os.path.join(args.out, f"pairs{k}.pt")
    stored = read_stored(path, config, "pairs file")
    if stored is not None:
        x, e = stored.get("x"), stored.get("e")
        if not (isinstance(x, torch.Tensor) and isinstance(e, torch.Tensor)
                and x.shape == e.shape == (args.n_pairs, *shape) and bool(torch.isfinite(x).all())):
            sys.exit(f"error: pairs file {path} does not hold {args.n_pairs} finite pairs of shape {shape}; "
                     "delete it or choose another --out")
        print(f"[pairs{k}] reused {path} ({args.n_pairs} pairs)")
        return x, e, {"reused": True, "ode_nfe": stored.get("nfe"), "train_seconds": stored.get("seconds")}
    t0 = time.perf_counter()
    x, e, nfe = make_pairs(model, args, shape, k, device)
    seconds = round(time.perf_counter() - t0, 2)
    save_checkpoint(path, {"x": x, "e": e, "nfe": nfe, "seconds": seconds, "config": config})
    print(f"[pairs{k}] {args.n_pairs} pairs by dopri5 (rtol {args.rtol:g}, atol {args.atol:g}): "
          f"{nfe} function evaluations over {math.ceil(args.n_pairs / 4096)} chunk(s), {seconds:.1f} s -> {path}")
    return x, e, {"reused": False, "ode_nfe": nfe, "train_seconds": seconds}


def plot_stages(path, title, data, samples, metrics, stage_info, paths, colors, teacher):
    """Top row: real data, the stage-1 ODE paths that make the pairs, stage 2's one-step jumps (2D; for
    images the stage-1 ODE samples); bottom row: the loss curves, 1-NFE samples of stage 1 and stage 2."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    fig, axes = plt.subplots(2, 3, figsize=(9.6, 6.4))

    def show(ax, x, label, color="C1"):
        if data.shape == (2,):
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color=color)
        else:
            ax.imshow(image_grid(x, data.shape), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(label, fontsize=9)

    show(axes[0, 0], data.heldout, "real (held-out)", "C0")
    for j, name in enumerate(("stage1", "stage2"), start=1):
        if f"{name}_nfe1" in samples:
            how = " (1 Euler step)" if name == "stage1" and teacher == "fm" else ""
            show(axes[1, j], samples[f"{name}_nfe1"], f"{name}: 1-NFE{how}, W2 {metrics[f'w2_ratio_{name}_nfe1']:.2f}x floor")
            if data.shape == (2,):
                axes[1, j].set_xlim(axes[0, 0].get_xlim()), axes[1, j].set_ylim(axes[0, 0].get_ylim())
    for j, (name, label) in enumerate((("stage1", "stage 1: ODE of u(z, t, t) -> pairs"),
                                       ("stage2", "stage 2: one step e -> e - u(e, 0, 1)")), start=1):
        ax = axes[0, j]
        if name not in paths:
            if data.shape != (2,) and name == "stage1":
                show(ax, samples["stage1_ode"], f"stage1: dopri5 ODE, W2 {metrics['w2_ratio_stage1_ode']:.2f}x")
            else:
                ax.axis("off")
            continue
        ax.add_collection(LineCollection(paths[name], colors=[f"C{c % 10}" for c in colors], lw=0.4, alpha=0.5))
        ax.scatter(paths[name][:, 0, 0], paths[name][:, 0, 1], s=2, color="C2", label="noise e (t = 1)")
        ax.scatter(paths[name][:, -1, 0], paths[name][:, -1, 1], s=2, color="k", label="sample (t = 0)")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(label, fontsize=9)
    ax, start = axes[1, 0], 0
    for j, name in enumerate(stage_info):
        losses = stage_info[name]["losses"]
        ax.plot(np.arange(start, start + len(losses)), losses, lw=0.3, color=f"C{j}", label=name)
        start += len(losses)
    ax.set_yscale("log"), ax.set_xlabel("step (stages one after another)")
    ax.legend(fontsize=7), ax.set_title("training loss", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    data = Data(args.data, args.data_dir, args.seed, device, args.n_eval)
    configs = stage_configs(args)

    def draw_data(n):                                           # stage 1: independent data and noise
        x = data.draw(n)
        return x, torch.randn_like(x)

    teacher_loss = fm_loss if args.teacher == "fm" else (lambda m, x, e: imf_loss(m, x, e, args))
    model = make_model(data.shape, 2, args).to(device)          # u_theta(z, r, t)
    stages, infos, pair_infos = {}, {}, {}
    stages["stage1"], infos["stage1"] = train_stage("stage1", model, teacher_loss, draw_data, args,
                                                    configs["stage1"], args.steps, device)
    if not infos["stage1"]["interrupted"]:
        x_hat, e_hat, pair_infos["pairs1"] = get_pairs(stages["stage1"], args, data.shape, 1,
                                                       configs["pairs1"], device)
        x_hat, e_hat = x_hat.to(device), e_hat.to(device)
        torch.manual_seed(args.seed + 5001)                     # the same stage 2 whether or not stage 1 ran
        rng = np.random.default_rng(args.seed + 5001)

        def draw_pairs(n):                                      # stage 2: the coupling (x_hat, e)
            i = torch.from_numpy(rng.integers(len(x_hat), size=n)).to(device)
            return x_hat[i], e_hat[i]

        model = make_model(data.shape, 2, args).to(device)
        if not args.from_scratch:
            model.load_state_dict(stages["stage1"].state_dict())
        stages["stage2"], infos["stage2"] = train_stage("stage2", model, lambda m, x, e: imf_loss(m, x, e, args),
                                                        draw_pairs, args, configs["stage2"], args.reflow_steps,
                                                        device)

    g = torch.Generator().manual_seed(args.seed + 3000)
    e = torch.randn(data.n_eval, *data.shape, generator=g).to(device)
    out, paths = {}, {}
    for name, m in stages.items():
        m.eval()
        few_step = euler_sample if name == "stage1" and args.teacher == "fm" else sample
        for n in (1, 2):
            out[f"{name}_nfe{n}"] = few_step(m, e, n)
    path, infos["stage1"]["ode_nfe"] = ode_generate(stages["stage1"], e, args, 16 if data.shape == (2,) else 1)
    out["stage1_ode"] = path[-1]                                # what the pairs are made of
    samples = {k: data.to_data(v) for k, v in out.items()}
    if data.shape == (2,):
        paths["stage1"] = np.stack([data.to_data(z) for z in path[:, :300]], axis=1)
        if "stage2" in stages:
            paths["stage2"] = np.stack([data.to_data(e[:300]), samples["stage2_nfe1"][:300]], axis=1)
    print(f"iMF + reflow on {args.data} ({args.teacher} teacher): W2 at 1 and 2 NFE ("
          + ("Euler steps of v = u(z, t, t) for the fm teacher, " if args.teacher == "fm" else "")
          + f"z_r = z_t - (t - r) u otherwise) and of the stage-1 dopri5 ODE ({infos['stage1']['ode_nfe']} NFE) "
          "that made the pairs; EMA weights:")
    metrics = report(samples, data)
    took = sum(i["train_seconds"] for i in [*infos.values(), *pair_infos.values()] if not i["reused"])
    print(f"training + pairs: {took:.1f} s in this run" + (" (some stages reused)" if any(
        i["reused"] for i in [*infos.values(), *pair_infos.values()]) else ""))
    metrics["stages"] = {name: {k: v for k, v in info.items() if k != "losses"} for name, info in infos.items()}
    metrics["pairs"] = pair_infos
    metrics["command"] = " ".join(["python", f"{SCRIPT}.py"] + (sys.argv[1:] if argv is None else list(argv)))
    last = "stage2" if "stage2" in stages else "stage1"         # plain keys: the last stage
    save_results(args.out, {**samples, **{k[len(last) + 1:]: v for k, v in samples.items()
                                          if k.startswith(last + "_nfe")}}, data, metrics)
    colors = None
    if data.shape == (2,):
        e0 = e[:300].cpu().numpy()                              # colour paths by the noise point's angle sector
        colors = ((np.arctan2(e0[:, 1], e0[:, 0]) + np.pi) / (2 * np.pi) * 8).astype(int) % 8
    plot_stages(os.path.join(args.out, "results.png"), f"improved MeanFlow on a reflow coupling, {args.data}: "
                f"{args.teacher} teacher ({args.steps} steps) -> dopri5 pairs -> iMF ({args.reflow_steps} steps)",
                data, samples, metrics, infos, paths, colors, args.teacher)
    print(f"wrote {args.out}/results.png, samples.npz, metrics.json and the stage files")
    if any(info["interrupted"] for info in infos.values()):
        sys.exit(130)
    return metrics


if __name__ == "__main__":
    main()
