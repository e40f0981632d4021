"""k-Rectified Flow (reflow): retrain a flow on its own ODE's pairs, so that one Euler step samples well.

Liu et al., "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow" (ICLR 2023),
with the collection's time convention: data x at t = 0, noise e ~ N(0, I) at t = 1 (the paper's t is 1 - t).
  stage 1     1-rectified flow on independent pairs: || v_theta(z_t, t) - (e - x) ||^2, z_t = (1 - t) x + t e
  coupling    x_hat = ODE(e): dz/dt = v(z, t) from t = 1 to 0 (dopri5; mnist: 16 midpoint steps)
  stage k+1   the same loss on the straight lines between the pairs (x_hat, e) of stage k, from its weights
  one step    x = e - v(e, 1); --distill fits only that map, || v(e, 1) - (e - x_hat) ||^2, for comparison
  straightness S = E int_0^1 ||(z_1 - z_0) - v(z_t, t)||^2 dt drops with each reflow; the transport cost
              E ||x_hat - e||^2 does not rise (for the exact flow: the paper's theorem)
  guidance    --cond --guidance W: stage 1's ODE, guided v(no label) + W (v(label) - v(no label)) for t in
              --guidance-interval, makes the pairs per label; the later stages learn the guided map
Departures from the paper (measured: RESULTS.md): half of each reflow batch at t = 1, where one Euler step
reads v (the paper: t ~ U(0, 1)); small networks; on mnist stage 1's ODE unguided for t > 0.9 (as fm.py).

  python reflow.py              # moons: 1-RF, dopri5 pairs, 2-RF; about a minute on a laptop CPU
  python reflow.py --distill    # also a one-step distillation on the same pairs
Files in --out: stage1.pt, pairs1.pt, stage2.pt, ...; a later run reuses those made with its settings.
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# --- method ---
def rf_loss(model, x, e, labels=None, t1_frac=0.0):
    """||v_theta(z_t, t) - (e - x)||^2 on the line z_t = (1 - t) x + t e; t1_frac of the batch at t = 1 (where
    one Euler step reads v), the rest t ~ U(0, 1)."""
    t = torch.rand(len(x), device=x.device)
    t[:round(len(x) * t1_frac)] = 1.0
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e
    return ((model(z, t, labels=labels) - (e - x)) ** 2).mean()


def distill_loss(model, x, e, labels=None):
    """One-step distillation on the pairs: ||v_theta(e, 1) - (e - x_hat)||^2."""
    t = torch.ones(len(x), device=x.device)
    return ((model(e, t, labels=labels) - (e - x)) ** 2).mean()


def velocity(model, z, t, labels=None, w=1.0):
    """v_theta(z, t); with labels and w != 1, guided: v(no label) + w (v(label) - v(no label)), one call."""
    if labels is None or w == 1:
        return model(z, t, labels=labels)
    null = torch.full_like(labels, model.n_classes)
    uncond, cond = model(torch.cat([z, z]), torch.cat([t, t]), labels=torch.cat([null, labels])).chunk(2)
    return uncond + w * (cond - uncond)


@torch.no_grad()
def euler_sample(model, e, steps, labels=None, w=1.0, interval=(0.0, 1.0)):
    """Euler from t = 1 to 0 in equal steps, z <- z + (t_next - t) v(z, t), guided in the interval: z, NFE."""
    lo, hi = torch.tensor(interval).tolist()                # float32, as the times
    z, ts, nfe = e, torch.linspace(1.0, 0.0, steps + 1).tolist(), 0
    for i in range(steps):
        w_t = w if lo <= ts[i] <= hi else 1.0
        t = torch.full((len(e),), ts[i], device=e.device)
        z = z + (ts[i + 1] - ts[i]) * velocity(model, z, t, labels, w_t)
        nfe += 1 if labels is None or w_t == 1 else 2
    return z, nfe


@torch.no_grad()
def ode_generate(model, e, labels=None, w=1.0, interval=(0.0, 1.0), n_grid=1, steps=0):
    """dz/dt = v(z, t) from t = 1 to 0 by dopri5 (or steps midpoint steps), guided in the interval: the path
    at n_grid + 1 times and the NFE."""
    from torchdiffeq import odeint
    nfe = [0]

    def f(t, z):                                            # t: torchdiffeq's tensor, its solvers wait on it
        w_t = w if interval[0] <= t.clamp(0, 1) <= interval[1] else 1.0      # dopri5 steps past t = 0
        nfe[0] += 1 if labels is None or w_t == 1 else 2
        return velocity(model, z, t.expand(len(z)), labels, w_t)

    ts = torch.linspace(1.0, 0.0, n_grid + 1, device=e.device)
    if steps:                                               # fixed steps: far cheaper on MNIST (RESULTS.md)
        return odeint(f, e, ts, method="midpoint", options={"step_size": 1.0 / steps}), nfe[0]
    options = {"dtype": torch.float32 if e.device.type == "mps" else torch.float64}   # MPS has no float64
    try:
        return odeint(f, e, ts, method="dopri5", rtol=1e-5, atol=1e-5, options=options), nfe[0]
    except AssertionError:                                  # a non-finite velocity: dopri5 "underflow in dt"
        return torch.full((n_grid + 1, *e.shape), math.nan, device=e.device), nfe[0]


@torch.no_grad()
def straightness(model, path, labels=None, w=1.0, interval=(0.0, 1.0)):
    """Of an ODE path z(t_i), t_i = 1 ... 0: S = E int_0^1 ||(z_1 - z_0) - v(z_t, t)||^2 dt (a Riemann sum; 0
    for straight paths) and the transport cost C = E ||z_0 - z_1||^2."""
    lo, hi = torch.tensor(interval).tolist()                # float32, as the times
    ts = torch.linspace(1.0, 0.0, len(path)).tolist()
    line = path[0] - path[-1]
    gaps = []
    for z, t in zip(path[:-1], ts[:-1]):
        w_t = w if lo <= t <= hi else 1.0
        v = velocity(model, z, torch.full((len(z),), t, device=z.device), labels, w_t)
        gaps.append(((line - v) ** 2).flatten(1).sum(1))
    return torch.stack(gaps).mean().item(), (line ** 2).flatten(1).sum(1).mean().item()


def make_pairs(model, n, shape, seed, n_classes=0, w=1.0, interval=(0.0, 1.0), steps=0, chunk=4096):
    """The coupling on the CPU: n noises e, x_hat = ODE(e) in chunks (with n_classes: balanced labels, the ODE
    guided with w in the interval), the NFE a pair (a chunk's most) and the seconds it took."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    e = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % n_classes if n_classes else None
    x_hat, nfe = [], 0
    for i, part in enumerate(tqdm(e.split(chunk), desc="pairs (ODE)", mininterval=1.0)):
        y = None if labels is None else labels[i * chunk:(i + 1) * chunk].to(device)
        path, k = ode_generate(model, part.to(device), y, w, interval, steps=steps)
        x_hat.append(path[-1].cpu())
        nfe = max(nfe, k)
    seconds = round(time.perf_counter() - t0, 2)
    return {"x_hat": torch.cat(x_hat), "e": e, "labels": labels, "nfe": nfe, "seconds": seconds}


def pair_batches(pairs, n, device):
    """Endless batches (x_hat, e, labels) of random pairs on the device, for a reflow stage."""
    while True:
        i = torch.randint(len(pairs["e"]), (n,))
        labels = None if pairs["labels"] is None else pairs["labels"][i].to(device)
        yield pairs["x_hat"][i].to(device), pairs["e"][i].to(device), labels


# --- model ---
class TimeEmbedding(nn.Module):                             # low frequencies: higher ones hurt iMF

    def __init__(self, dim=64, max_freq=2.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2)))

    def forward(self, t):
        angles = t[:, None] * self.freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


def embed_inputs(net, times, labels):
    """The times' embeddings and, for a class-conditional net, the labels' (None: "no label")."""
    parts = [net.embed(t) for t in times]
    if net.n_classes:
        no_label = torch.full_like(times[0], net.n_classes, dtype=torch.long)
        parts.append(net.label(no_label if labels is None else labels))
    return torch.cat(parts, dim=-1)


class ResMLP(nn.Module):
    """Residual MLP for 2D points: forward(z, *times, labels=None)."""

    def __init__(self, n_times=1, n_classes=0, hidden=64, depth=3, emb=64):
        super().__init__()
        self.embed, self.n_classes = TimeEmbedding(emb), n_classes
        if n_classes:
            self.label = nn.Embedding(n_classes + 1, emb)   # the last index: no label
        self.cond = nn.Sequential(nn.Linear((n_times + (n_classes > 0)) * emb, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))
        self.inp = nn.Linear(2, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, z, *times, labels=None):
        c = self.cond(embed_inputs(self, times, labels))
        h = self.inp(z)
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)


class SmallUNet(nn.Module):
    """U-Net for images: forward(z, *times, labels=None); H, W of 16, 20, 24, ...: a quarter level of 4 ch."""

    def __init__(self, shape, n_times=1, ch=32, n_classes=0, emb=64):
        super().__init__()
        self.embed, self.n_classes, self.ch = TimeEmbedding(emb), n_classes, ch
        self.deep = shape[1] % 4 == 0 and shape[2] % 4 == 0 and min(shape[1:]) >= 16
        if n_classes:
            self.label = nn.Embedding(n_classes + 1, emb)   # the last index: no label
        self.cond = nn.Sequential(nn.Linear((n_times + (n_classes > 0)) * emb, 4 * ch), nn.SiLU(),
                                  nn.Linear(4 * ch, (7 if self.deep else 3) * ch))
        self.in1 = nn.Conv2d(shape[0], ch, 3, padding=1)
        self.in2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1)
        self.mid1 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.mid2 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1)
        self.out1 = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.out2 = nn.Conv2d(ch, shape[0], 3, padding=1)
        if self.deep:
            self.down2 = nn.Conv2d(2 * ch, 4 * ch, 4, stride=2, padding=1)
            self.deep1 = nn.Conv2d(4 * ch, 4 * ch, 3, padding=1)
            self.deep2 = nn.Conv2d(4 * ch, 4 * ch, 3, padding=1)
            self.up2 = nn.ConvTranspose2d(4 * ch, 2 * ch, 4, stride=2, padding=1)

    def forward(self, z, *times, labels=None):
        c = self.cond(embed_inputs(self, times, labels))[:, :, None, None]
        c1, c2, c3 = c[:, :self.ch], c[:, self.ch:3 * self.ch], c[:, 3 * self.ch:]
        h1 = F.silu(self.in2(F.silu(self.in1(z))) + c1)
        d = F.silu(self.down(h1))
        m = d + self.mid2(F.silu(self.mid1(d + c2)))
        if self.deep:                                       # quarter resolution, added to the half one
            q = F.silu(self.down2(F.silu(m)))
            q = q + self.deep2(F.silu(self.deep1(q + c3)))
            m = m + self.up2(F.silu(q))
        u = F.silu(self.up(F.silu(m)))
        return self.out2(F.silu(self.out1(torch.cat([u, h1], dim=1))))


# --- data ---
class RunError(Exception):
    """A problem the user can fix (a file, the data, a diverged loss): one line, no traceback."""


TOYS = ["moons", "8gaussians", "checkerboard", "spirals", "circles"]
N_CLASSES = {"moons": 2, "circles": 2, "spirals": 2, "8gaussians": 8, "digits": 10, "mnist": 10}
TOY_CENTER_SCALE = {"moons": ([0.5, 0.25], [0.87, 0.5]), "8gaussians": ([0, 0], [1.5, 1.5]),
                    "checkerboard": ([0, 0], [1.15, 1.15]), "spirals": ([0, 0], [1.6, 1.6]),
                    "circles": ([0, 0], [0.56, 0.56])}      # fixed, to about mean 0 and variance 1


def toy_points(name, n, rng):
    """n points of a 2D toy, drawn with the numpy Generator rng, and their labels (moon, arm, ...)."""
    from sklearn.datasets import make_circles, make_moons
    if name == "moons":
        return make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    if name == "circles":
        return make_circles(n, factor=0.5, noise=0.05, random_state=int(rng.integers(2**31)))
    if name == "8gaussians":
        k = rng.integers(8, size=n)
        angles = k * (np.pi / 4)
        centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
        return centers + 0.15 * rng.standard_normal((n, 2)), k
    if name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - 2 * rng.integers(2, size=n) + np.floor(x1) % 2
        return np.stack([x1, x2], 1), np.full(n, -1)
    s, k = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi, rng.integers(2, size=n)   # spirals
    arms = np.where(k == 0, 1.0, -1.0)[:, None] * np.stack([-np.cos(s) * s, np.sin(s) * s], 1) / 4
    return arms + 0.08 * rng.standard_normal((n, 2)), k


def load_images(name, data_dir):
    """(train, train labels, held-out, held-out labels): images (N, C, H, W) in [0, 1], int64 labels."""
    if name == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        return x[perm[360:]], y[perm[360:]], x[perm[:360]], y[perm[:360]]
    try:
        from torchvision.datasets import MNIST
        train, test = MNIST(data_dir, train=True, download=True), MNIST(data_dir, train=False, download=True)
    except Exception as err:                                # no network, broken files, ...
        why = " ".join(str(err).split())[:120]
        raise RunError(f"cannot load MNIST in {data_dir!r} ({why}); --data digits works offline") from None
    return train.data[:, None] / 255, train.targets, test.data[:2000, None] / 255, test.targets[:2000]


class Data:
    """Training set in model coordinates (toys ~ mean 0, variance 1; images in [-1, 1]); held-out and floor
    sets in data coordinates."""

    def __init__(self, name, data_dir, seed, device, n_eval):
        self.name, self.data_dir, self.seed, self.device = name, data_dir, seed, device
        self.n_classes = N_CLASSES.get(name, 0)
        if name in TOYS:                                    # batches come from a pool of 65,536 points
            train, labels = toy_points(name, 2**16, np.random.default_rng(seed))
            heldout, heldout_labels = toy_points(name, n_eval, np.random.default_rng(seed + 1000))
            self.floor = toy_points(name, n_eval, np.random.default_rng(seed + 2000))[0].astype(np.float32)
            center, scale = TOY_CENTER_SCALE[name]
        else:
            train, labels, heldout, heldout_labels = load_images(name, data_dir)
            center, scale = 0.5, 0.5
        self.heldout = np.asarray(heldout[:n_eval], dtype=np.float32)
        self.heldout_labels = np.asarray(heldout_labels[:n_eval])
        self.center, self.scale = (torch.tensor(v, dtype=torch.float32) for v in (center, scale))
        self.train = ((torch.as_tensor(train, dtype=torch.float32) - self.center) / self.scale).to(device)
        self.labels, self.shape = torch.as_tensor(labels).long().to(device), tuple(self.train.shape[1:])

    def batches(self, n, cond=False, label_drop=0.1):
        """Endless (x, e, labels); labels None unless cond, label_drop of them "no label" (n_classes)."""
        while True:
            i = torch.randint(len(self.train), (n,), device=self.device)
            x, y = self.train[i], self.labels[i]
            e = torch.randn_like(x)
            drop = torch.rand(n, device=self.device) < label_drop
            yield x, e, torch.where(drop, self.n_classes, y) if cond else None

    def to_data(self, x):
        x = x.detach().float().cpu() * self.scale + self.center
        return (x if self.shape == (2,) else x.clamp(0, 1)).numpy()


# --- training ---
def save_checkpoint(path, state):                          # atomic: never a half-written file
    torch.save(state, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def load_checkpoint(path, config, resume):
    """The file at path if made with config; else None, or with resume an error (unless only "made_from")."""
    if not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        diff = [k for k in {**saved["config"], **config} if saved["config"].get(k) != config.get(k)]
    except Exception as err:
        raise RunError(f"cannot read {path} ({type(err).__name__}): delete it or use another --out") from None
    if resume and set(diff) - {"made_from"}:
        raise RunError(f"{path} was made with another {', '.join(diff)}: drop --resume or use another --out")
    if diff:
        print(f"note: {path} was made with another {', '.join(diff)}; making it again")
    return None if diff else saved


def train(model, loss_fn, batches, steps, lr, path, config, ckpt=None, desc="training", ckpt_every=2000):
    """Adam, warm-up and cosine lr; checkpoints on Ctrl-C, at the end, every ckpt_every. Returns the EMA."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    losses = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        losses = ckpt["losses"]
        torch.manual_seed(hash((config["seed"], len(losses))))     # new batches, not the run's first ones

    def save():
        save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "step": len(losses),
                               "optimizer": opt.state_dict(), "config": config, "losses": losses})

    t0 = time.perf_counter()
    try:
        for step in tqdm(range(len(losses), steps), desc, total=steps, initial=len(losses), mininterval=1):
            loss = loss_fn(model, *next(batches))           # (x, e, labels, ...)
            value = loss.item()                             # the step's one wait for the device
            if not value < 1e4 * (losses[0] if losses else math.inf):     # non-finite, or 10^4 x the first
                why = f"the loss diverged to {value:.3g} at step {step + 1} of {desc}"
                raise RunError(f"{why}; try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            warmup = min(1.0, (step + 1) / min(200, steps // 10 + 1))
            decay = 0.05 + 0.475 * (1 + math.cos(math.pi * step / steps))      # cosine from lr to lr / 20
            for group in opt.param_groups:
                group["lr"] = lr * warmup * decay
            opt.step()
            losses.append(value)
            with torch.no_grad():                           # EMA 0.999, capped by (1 + s) / (10 + s) early on
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()),
                                     1 - min(0.999, (1 + step) / (10 + step)))
            if len(losses) % ckpt_every == 0 or len(losses) == steps:
                save()
    except KeyboardInterrupt:
        save()
        print(f"\ninterrupted at step {len(losses)} of {desc}: saved {path}; --resume continues it")
        raise
    return ema, {"steps": len(losses), "train_seconds": round(time.perf_counter() - t0, 2), "losses": losses}


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


# --- evaluation ---
def w2_distance(a, b):
    """Exact 2-Wasserstein distance of two point sets of one size, by an optimal matching."""
    from scipy.optimize import linear_sum_assignment
    a = torch.as_tensor(a, dtype=torch.float64).reshape(len(a), -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise RunError(f"W2 needs two sets of one size and shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.var(0).sum() < b.var(0).sum():                     # the same optimum, found faster
        a, b = b, a
    cost = (torch.cdist(a, b) ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def eval_noise(data, seed, device):
    """N(0, I); quasi-random (Sobol) for moons and circles, whose real sets split evenly in two curves."""
    n = len(data.heldout)
    if data.name not in ("moons", "circles"):
        return torch.randn(n, *data.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    u = torch.quasirandom.SobolEngine(2, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    return torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)).float().to(device)


def report_w2(samples, data):
    """Each sampler's W2 to the held-out set next to the floor, the W2 of two real sets: printed, returned."""
    floor = w2_distance(data.floor, data.heldout)
    metrics = {"w2_floor": round(floor, 5)}
    for key, x in samples.items():
        if not np.isfinite(x).all():
            print(f"{key:>12}  non-finite samples: no W2")
            continue
        d = w2_distance(x, data.heldout)
        metrics[f"w2_{key}"], metrics[f"w2_ratio_{key}"] = round(d, 5), round(d / floor, 3)
        print(f"{key:>12}  W2 {d:.4f}  floor {floor:.4f}  ({d / floor:.2f}x)")
    return metrics


def save_results(args, samples, data, metrics, labels=None):
    extra = {"floor": data.floor} if data.shape == (2,) else {}
    extra.update({} if labels is None else {"labels": labels})
    np.savez(os.path.join(args.out, "samples.npz"), **samples, **extra, real=data.heldout, data=data.name,
             data_dir=data.data_dir, seed=data.seed)
    metrics["command"] = " ".join(["python", f"{SCRIPT}.py", *args.argv])
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    score = "" if data.shape == (2,) else f"; score the images with: python evaluate.py {args.out}"
    print(f"wrote {args.out}: results.png, samples.npz, metrics.json, the checkpoints{score}")


def image_grid(x, labels=None, n=8):
    """n x n images, or a row of n per class asked for, as one (H, W, 3) array."""
    from torchvision.utils import make_grid
    x = torch.as_tensor(x)
    if labels is None:
        x = x[:n * n]
    else:                                                   # grey where a class has fewer than n
        blank = torch.full((n, *x.shape[1:]), 0.5)
        x = torch.cat([torch.cat([x[labels == k][:n], blank])[:n] for k in range(labels.max() + 1)])
    return make_grid(x, nrow=n, padding=1, pad_value=0.5).permute(1, 2, 0).numpy()


def plot_panels(path, title, panels, losses, metrics, labels=None):
    """A panel per (name, array), then the losses {stage: list}; an (N, K, 2) array: paths from t = 1 to 0."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3.2 * (len(panels) + 1), 3.4))
    axes = fig.subplots(1, len(panels) + 1)
    for i, (ax, (name, x)) in enumerate(zip(axes, panels)):
        ratio = metrics.get(f"w2_ratio_{name}")
        name += " paths" if x.ndim == 3 else f": W2 {ratio:.2f}x floor" if ratio else ""
        ax.set_title(name, fontsize=9)
        if x.ndim == 3:
            ax.plot(x[..., 0].T, x[..., 1].T, color="gray", lw=0.4, alpha=0.5)
            ax.scatter(*x[:, 0].T, s=2, color="C2")
            ax.scatter(*x[:, -1].T, s=2, color="k")
        elif x.ndim == 2:
            colors = "C0" if i == 0 else "C1" if labels is None else [f"C{k % 10}" for k in labels]
            ax.scatter(*x.T, s=2, alpha=0.4, c=colors)
            ax.set(xlim=axes[0].get_xlim(), ylim=axes[0].get_ylim())
        else:
            ax.imshow(image_grid(x, labels))
            ax.axis("off")
    start = 0
    for name, curve in losses.items():                      # one stage after another
        axes[-1].plot(range(start, start + len(curve)), curve, lw=0.5, label=name)
        start += len(curve)
    axes[-1].set(yscale="log", title="training loss")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- config ---
SCRIPT = os.path.splitext(os.path.basename(__file__))[0]
DEFAULTS = {"toys": {"steps": 3400, "reflow_steps": 2500, "batch_size": 512, "lr": 5e-3, "channels": 32,
                     "n_pairs": 16384, "ode_steps": 0, "n_eval": 2000, "guidance_interval": [0.0, 1.0]},
            "digits": {"steps": 5000, "reflow_steps": 2500, "batch_size": 128, "lr": 2e-3, "channels": 16,
                       "n_pairs": 8192, "ode_steps": 0, "n_eval": 2000, "guidance_interval": [0.0, 1.0]},
            "mnist": {"steps": 6000, "reflow_steps": 5000, "batch_size": 64, "lr": 2e-3, "channels": 16,
                      "n_pairs": 8192, "ode_steps": 16, "n_eval": 1000, "guidance_interval": [0.0, 0.9]}}


def positive(cast):
    def parse(text):
        value = cast(text)
        if not 0 < value < math.inf:                        # refuses nan too
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value
    parse.__name__ = cast.__name__                          # argparse's "invalid int value: ..." names it
    return parse


def get_args(argv=None):
    epilog = "defaults per dataset: " + "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for name, d in DEFAULTS.items())
    p = argparse.ArgumentParser(description="k-Rectified Flow (reflow) and one-step distillation.",
                                epilog=epilog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    per_data = argparse.SUPPRESS                            # from DEFAULTS, for the --data given
    p.add_argument("--data", default="moons", choices=TOYS + ["digits", "mnist"], help="dataset")
    p.add_argument("--data-dir", default="data", help="where MNIST is stored or downloaded to")
    p.add_argument("--steps", type=positive(int), default=per_data, help="training steps of stage 1")
    p.add_argument("--batch-size", type=positive(int), default=per_data, help="batch size")
    p.add_argument("--lr", type=positive(float), default=per_data, help="learning rate")
    p.add_argument("--channels", type=positive(int), default=per_data, help="base channels of the U-Net")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device")
    p.add_argument("--seed", type=int, default=0, help="random seed (0 or more)")
    p.add_argument("--out", default=os.path.join("outputs", SCRIPT), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage in --out")
    p.add_argument("--n-eval", type=positive(int), default=per_data, help="samples to evaluate")
    p.add_argument("--cond", action="store_true", help=f"class-conditional ({', '.join(N_CLASSES)})")
    p.add_argument("--guidance", type=positive(float), default=1.0,
                   help="with --cond: classifier-free guidance weight")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=per_data, metavar=("LO", "HI"),
                   help="guide stage 1's ODE only for t in [LO, HI]; unguided elsewhere")
    p.add_argument("--reflow-steps", type=positive(int), default=per_data, help="training steps of a reflow")
    p.add_argument("--n-pairs", type=positive(int), default=per_data, help="pairs (x_hat, e) made by a stage")
    p.add_argument("--ode-steps", type=int, default=per_data, help="the ODE: 0 dopri5, N midpoint steps")
    p.add_argument("--reflows", type=int, default=1, metavar="K", help="reflows after stage 1 (0 or more)")
    p.add_argument("--distill", action="store_true", help="also distill the stage that made the last pairs")
    args = p.parse_args(argv)
    for key, value in DEFAULTS["toys" if args.data in TOYS else args.data].items():
        vars(args).setdefault(key, value)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if args.device == "auto":
        args.device = next(name for name, ok in available.items() if ok)
    if not available[args.device]:
        p.error(f"--device {args.device} is not available here")
    if args.seed < 0:
        p.error(f"--seed must be 0 or more, got {args.seed}")
    if args.cond and args.data not in N_CLASSES:
        p.error(f"--cond needs data with labels ({', '.join(N_CLASSES)})")
    if args.guidance != 1 and not args.cond:
        p.error("--guidance needs --cond (it compares the model with and without a label)")
    if not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
        p.error(f"--guidance-interval needs 0 <= LO <= HI <= 1, got {args.guidance_interval}")
    if min(args.ode_steps, args.reflows) < 0:
        p.error(f"--ode-steps and --reflows must be 0 or more, got {args.ode_steps} and {args.reflows}")
    if args.distill and args.reflows == 0:
        p.error("--distill needs --reflows 1 or more")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return args


# --- main ---
def run(args):
    torch.manual_seed(args.seed)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:                                  # a file, a folder we may not write to, ...
        raise RunError(f"cannot make the --out folder {args.out} ({err.strerror})") from None
    device = torch.device(args.device)
    data = Data(args.data, args.data_dir, args.seed, device, args.n_eval)
    n_classes = data.n_classes if args.cond else 0
    if data.shape == (2,):                                  # v_theta(z, t): one time
        model = ResMLP(1, n_classes).to(device)
    else:                                                   # channels-last: faster convolutions on a CPU
        model = SmallUNet(data.shape, 1, args.channels, n_classes)
        model = model.to(device, memory_format=torch.channels_last)
    keys = ["data", "data_dir", "channels", "cond", "seed", "lr", "batch_size"]
    config = {k: vars(args)[k] for k in keys + ["steps"]}   # what makes it this run: --resume refuses others
    stages, infos, pair_infos = {}, {}, {}
    # stage 1: 1-rectified flow on independent (x, e); a finished stage file made with these settings is
    # reused, an unfinished one continued with --resume
    path = os.path.join(args.out, "stage1.pt")
    ckpt = load_checkpoint(path, config, args.resume)
    if ckpt is not None and ckpt["step"] < config["steps"] and not args.resume:
        print(f"note: {path} stopped at step {ckpt['step']}; training it anew (--resume continues it)")
        ckpt = None
    batches = data.batches(args.batch_size, args.cond)
    stages["stage1"], infos["stage1"] = train(model, rf_loss, batches, args.steps, args.lr, path, config,
                                              ckpt, "stage1")

    # stage k + 1: the same loss on the pairs (x_hat, e) of stage k's ODE (stage 1's guided, per label), from
    # its weights; --distill: the one-step map of the last pairs' stage. A file is reused only if made from
    # the very file upstream ("made_from": its hash)
    later = [(f"stage{k + 1}", k) for k in range(1, args.reflows + 1)]
    later += [("distill", args.reflows)] if args.distill else []
    for name, k in later:
        w = args.guidance if k == 1 else 1.0
        pairs_path = os.path.join(args.out, f"pairs{k}.pt")
        pairs_config = {"n_pairs": args.n_pairs, "ode_steps": args.ode_steps, "guidance": w,
                        "guidance_interval": args.guidance_interval if w != 1 else None,
                        "made_from": file_hash(os.path.join(args.out, f"stage{k}.pt"))}
        pairs = load_checkpoint(pairs_path, pairs_config, args.resume)
        if pairs is None:
            chunk = 256 if args.data == "mnist" else 4096    # on a CPU big image batches cost 3x more
            pairs = make_pairs(stages[f"stage{k}"], args.n_pairs, data.shape, args.seed + 4000 + k, n_classes,
                               w, args.guidance_interval, args.ode_steps, chunk)
            save_checkpoint(pairs_path, {**pairs, "config": pairs_config})
        pair_infos[f"pairs{k}"] = {"nfe": pairs["nfe"], "seconds": pairs["seconds"]}
        torch.manual_seed(args.seed + 5000 + k)             # the stage's batches, whether files were reused
        model.load_state_dict(stages[f"stage{k}"].state_dict())
        loss_fn = distill_loss if name == "distill" else functools.partial(rf_loss, t1_frac=0.5)
        config = {**config, "steps": args.reflow_steps, "made_from": file_hash(pairs_path)}
        path = os.path.join(args.out, f"{name}.pt")
        ckpt = load_checkpoint(path, config, args.resume)
        if ckpt is not None and ckpt["step"] < config["steps"] and not args.resume:
            print(f"note: {path} stopped at step {ckpt['step']}; training it anew (--resume continues it)")
            ckpt = None
        batches = pair_batches(pairs, args.batch_size, device)
        stages[name], infos[name] = train(model, loss_fn, batches, args.reflow_steps, args.lr, path, config,
                                          ckpt, name)

    # each stage: 1, 2, 4 Euler steps (distill: 1) and its ODE, from the same noise, for the held-out set's
    # labels; stage 1 guided as its pairs were, the later stages learned the guided map
    e = eval_noise(data, args.seed + 3000, device)
    labels = data.heldout_labels if args.cond else None
    y = None if labels is None else torch.as_tensor(labels, device=device)
    ode = f"{args.ode_steps} midpoint steps" if args.ode_steps else "dopri5"
    print(f"k-Rectified Flow on {args.data}: each stage's Euler steps and ODE ({ode}):")
    losses, out, panels = {name: info.pop("losses") for name, info in infos.items()}, {}, []
    for name, model in stages.items():
        w = args.guidance if name == "stage1" else 1.0
        for n in (1,) if name == "distill" else (1, 2, 4):
            x, nfe = euler_sample(model, e, n, y, w, args.guidance_interval)
            out[f"{name}_nfe{nfe}"] = x
            if n == 1:                                      # the one-step panel (2 NFE if guided)
                panels.append((f"{name}_nfe{nfe}", x))
        if name == "distill":
            continue
        n_grid = 100 if data.shape == (2,) else 10         # the path's points for its straightness
        path, infos[name]["ode_nfe"] = ode_generate(model, e, y, w, args.guidance_interval, n_grid,
                                                    args.ode_steps)
        out[f"{name}_ode"] = path[-1]
        S, C = straightness(model, path, y, w, args.guidance_interval)
        infos[name].update(straightness=S, transport_cost=C)
        print(f"{name}: {infos[name]['steps']} steps, straightness {S:.4f}, transport cost {C:.4f}")
        panels.append((f"{name}_ode", path[:, :300].transpose(0, 1) if data.shape == (2,) else path[-1]))
    samples = {k: data.to_data(v) for k, v in out.items()}
    metrics = report_w2(samples, data) if data.shape == (2,) else {}
    metrics.update(stages=infos, pairs=pair_infos)
    panels = [("real (held-out)", data.heldout)] + [(k, data.to_data(v)) for k, v in panels]
    title = f"k-Rectified Flow on {args.data}"
    title += f", guidance {args.guidance:g} for t in {args.guidance_interval}" if y is not None else ""
    title += ": " + " -> ".join(f"{name} ({info['steps']} steps)" for name, info in infos.items())
    save_results(args, samples, data, metrics, labels)
    plot_panels(os.path.join(args.out, "results.png"), title, panels, losses, metrics, labels)
    return metrics


if __name__ == "__main__":
    try:
        run(get_args())
    except RunError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:                               # train saved the checkpoint and said so
        print("interrupted: the finished stage and pairs files are kept; a rerun goes on from them")
        sys.exit(130)
