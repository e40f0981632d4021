"""rectified_flow.py - 1-Rectified Flow: straight-line interpolation between any two distributions.

Method (Liu et al., "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow", 2023):
  couple a target sample x (t = 0) with a source sample e (t = 1): noise -> data, or any distribution
  to any other (--source 8gaussians --data moons is distribution-to-distribution transfer);
  straight-line interpolation:   z_t = (1 - t) * x + t * e,   dz_t/dt = e - x
  loss:                          ||v_theta(z_t, t) - (e - x)||^2
  sampling: the ODE dz/dt = v_theta(z, t) from t = 1 (source) to t = 0 (target), Euler by hand.
  What the method is about, measured on the simulated ODE (z_1 = e, z_0 = x_hat):
  straightness    S = E int_0^1 ||(z_1 - z_0) - v(z_t, t)||^2 dt   (0 for perfectly straight paths)
  transport cost  C = E ||x_hat - e||^2
  The straight lines of the independent coupling cross; the ODE paths cannot, so they bend and the one-step
  map averages over crossings. Reflow (reflow.py) retrains on the ODE's own pairs and straightens them.

Class conditioning (--cond): a label embedding with one extra "no label" index, which --label-drop (0.1) trains.
  Classifier-free guidance (--guidance W) at sampling: v = v(z, t | no label) + W (v(z, t | label) - v(z, t | no
  label)), two network evaluations per step, counted in the NFE reported (nfe2 is one guided Euler step).

Time convention (the whole collection): data x at t = 0, noise e at t = 1,
  z_t = (1 - t) * x + t * e,  v = dz_t/dt = e - x,  sampling runs from t = 1 down to t = 0.
  (Flow Matching / Rectified Flow papers put noise at t = 0: map their t to 1 - t; the Rectified Flow
  paper's X1 - X0, target minus source, is our z_0 - z_1, and its velocity is minus ours.)

Run:   python rectified_flow.py                                 # gaussian -> moons, about a minute on a CPU
       python rectified_flow.py --source 8gaussians --data moons  # distribution-to-distribution transfer
       python rectified_flow.py --data digits                 # 8x8 images; defaults per dataset (--help)
Outputs in --out (default outputs/<script name>/): results.png, samples.npz, metrics.json, checkpoint.pt.
"""
import argparse
import copy
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
def rf_loss(model, x, e, labels=None):
    """1-rectified flow: ||v_theta(z_t, t) - (e - x)||^2 on the straight line z_t = (1 - t) x + t e
    (labels: the class of each x, or the "no label" index where --label-drop dropped it; None: unconditional)."""
    t = torch.rand(len(x), device=x.device)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e
    return ((model(z, t, labels=labels) - (e - x)) ** 2).mean()


@torch.no_grad()
def euler_sample(model, e, steps, labels=None, w=1.0, keep_path=False):
    """Fixed-step Euler from t = 1 to 0: z <- z + (t_next - t) v(z, t), v guided with weight w for the
    labels asked for (w != 1: two network evaluations per step). Returns x (and the path)."""
    z, ts, path = e, torch.linspace(1.0, 0.0, steps + 1, device=e.device), [e]
    for i in range(steps):
        z = z + (ts[i + 1] - ts[i]) * guided(model, z, (ts[i].expand(len(e)),), labels, w)
        path.append(z)
    return (z, torch.stack(path, 1)) if keep_path else z


@torch.no_grad()
def straightness(model, e, steps=100, labels=None, w=1.0):
    """Simulate the (guided) ODE with `steps` Euler steps; return x_hat, S = E int ||(z_1 - z_0) - v(z_t, t)||^2 dt
    (a Riemann sum over the visited points) and the transport cost C = E ||x_hat - e||^2."""
    z, ts, dev = e, torch.linspace(1.0, 0.0, steps + 1, device=e.device), []
    velocities = []
    for i in range(steps):
        v = guided(model, z, (ts[i].expand(len(e)),), labels, w)
        velocities.append(v)
        z = z + (ts[i + 1] - ts[i]) * v
    line = e - z                                            # z_1 - z_0 with z_1 = e, z_0 = x_hat
    for v in velocities:
        dev.append(((line - v) ** 2).flatten(1).sum(1))
    S = torch.stack(dev).mean().item()
    C = ((z - e) ** 2).flatten(1).sum(1).mean().item()
    return z, S, C


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


def embed_inputs(net, times, labels):
    """The times' sinusoidal embeddings and, for a class-conditional net, its label embedding (labels None:
    the extra "no label" index n_classes, which --label-drop trains), concatenated."""
    parts = [net.embed(t) for t in times]
    if net.n_classes:
        if labels is None:
            labels = torch.full((len(times[0]),), net.n_classes, dtype=torch.long, device=times[0].device)
        parts.append(net.label(labels))
    return torch.cat(parts, dim=-1)


class ResMLP(nn.Module):
    """Residual MLP for 2D data, conditioned on n_times scalar times and optionally a class label:
    forward(z, *times, labels=None)."""

    def __init__(self, dim=2, n_times=1, hidden=128, depth=3, emb=64, n_classes=0):
        super().__init__()
        self.embed, self.n_classes = TimeEmbedding(emb), n_classes
        if n_classes:
            self.label = nn.Embedding(n_classes + 1, emb)   # index n_classes: no label
        self.cond = nn.Sequential(nn.Linear((n_times + (n_classes > 0)) * emb, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, z, *times, labels=None):
        c = self.cond(embed_inputs(self, times, labels))
        h = self.inp(z)
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)


class SmallUNet(nn.Module):
    """U-Net for small images (C channels, any even height and width), conditioned on n_times times and
    optionally a class label: forward(z, *times, labels=None). Full and half resolution (ch and 2 ch channels:
    8x8 digits); with deep=True also a quarter resolution with 4 ch channels (28x28 MNIST: 28 -> 14 -> 7),
    which sees a whole digit for little compute."""

    def __init__(self, in_ch=1, n_times=1, ch=32, emb=64, n_classes=0, deep=False):
        super().__init__()
        self.embed, self.n_classes, self.ch, self.deep = TimeEmbedding(emb), n_classes, ch, deep
        if n_classes:
            self.label = nn.Embedding(n_classes + 1, emb)   # index n_classes: no label
        self.cond = nn.Sequential(nn.Linear((n_times + (n_classes > 0)) * emb, 4 * ch), nn.SiLU(),
                                  nn.Linear(4 * ch, (7 if deep else 3) * ch))
        self.in1 = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.in2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1)
        self.mid1 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.mid2 = nn.Conv2d(2 * ch, 2 * ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1)
        self.out1 = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.out2 = nn.Conv2d(ch, in_ch, 3, padding=1)
        if deep:                                            # quarter resolution, added to the half one
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
        if self.deep:
            q = F.silu(self.down2(F.silu(m)))
            q = q + self.deep2(F.silu(self.deep1(q + c3)))
            m = m + self.up2(F.silu(q))
        u = F.silu(self.up(F.silu(m)))
        return self.out2(F.silu(self.out1(torch.cat([u, h1], dim=1))))


def make_model(shape, n_times, hidden=64, depth=3, channels=32, n_classes=0):
    """A residual MLP for 2D points, a small U-Net for images (C, H, W), with a quarter-resolution level when H
    and W are multiples of 4 and at least 16; forward(z, *times, labels=None). n_classes > 0: class-conditional,
    with a label embedding of n_classes + 1 entries (the last: no label)."""
    if len(shape) == 1:
        return ResMLP(shape[0], n_times, hidden, depth, n_classes=n_classes)
    if shape[1] % 2 or shape[2] % 2:
        raise RunError(f"the U-Net needs an even image height and width, got {shape[1]}x{shape[2]}")
    deep = shape[1] % 4 == 0 and shape[2] % 4 == 0 and min(shape[1:]) >= 16
    return SmallUNet(shape[0], n_times, channels, n_classes=n_classes, deep=deep)


def guided(model, z, times, labels=None, w=1.0):
    """The network at (z, *times) for these labels (None: unconditional). With w != 1, classifier-free guidance
    out(no label) + w (out(label) - out(no label)): two network evaluations, made as one batched call."""
    if labels is None or w == 1:
        return model(z, *times, labels=labels)
    null = torch.full_like(labels, model.n_classes)
    out = model(torch.cat([z, z]), *[torch.cat([t, t]) for t in times], labels=torch.cat([null, labels]))
    uncond, cond = out.chunk(2)
    return uncond + w * (cond - uncond)


# --- data ---
class RunError(Exception):
    """A problem the user can fix (a missing device or download, an unreadable or mismatched file, a diverged
    loss): the functions raise it, and only main turns it into a one-line message and an exit code."""


# Toys: a pool of 65,536 points generated at start (batches are drawn from it), scaled with fixed
# constants to about zero mean and unit variance; held-out and floor sets come from other seeds.
TOY_DATA = ["moons", "8gaussians", "checkerboard", "spirals", "circles"]
IMAGE_DATA = ["digits", "mnist"]
N_CLASSES = {"moons": 2, "circles": 2, "spirals": 2, "8gaussians": 8, "digits": 10, "mnist": 10}  # for --cond
TOY_CENTER_SCALE = {"moons": ([0.5, 0.25], [0.87, 0.5]), "8gaussians": ([0.0, 0.0], [1.5, 1.5]),
                    "checkerboard": ([0.0, 0.0], [1.15, 1.15]), "spirals": ([0.0, 0.0], [1.6, 1.6]),
                    "circles": ([0.0, 0.0], [0.56, 0.56])}


def toy_points(name, n, rng):
    """n points of a 2D toy in its own (unnormalised) coordinates, from the numpy Generator rng, and their
    labels: the moon, the circle, the spiral arm, the Gaussian (checkerboard: none, -1)."""
    from sklearn.datasets import make_circles, make_moons
    if name == "moons":
        return make_moons(n, noise=0.05, random_state=int(rng.integers(2**31)))
    if name == "circles":
        return make_circles(n, factor=0.5, noise=0.05, random_state=int(rng.integers(2**31)))
    if name == "8gaussians":
        k = rng.integers(8, size=n)
        angles = k * (np.pi / 4)
        return 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.15 * rng.standard_normal((n, 2)), k
    if name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - 2 * rng.integers(2, size=n) + np.floor(x1) % 2
        return np.stack([x1, x2], 1), np.full(n, -1)
    if name == "spirals":
        s = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
        k = rng.integers(2, size=n)
        sign = np.where(k == 0, 1.0, -1.0)[:, None]
        pts = sign * np.stack([-np.cos(s) * s, np.sin(s) * s], 1) / 4
        return pts + 0.08 * rng.standard_normal((n, 2)), k
    raise ValueError(f"unknown toy dataset {name!r}")


def load_images(name, data_dir):
    """(train, train labels, heldout, heldout labels): images as float tensors (N, C, H, W) in [0, 1], labels
    as int64 tensors."""
    if name == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        x, y = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(digits.target).long()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        return x[perm[360:]], y[perm[360:]], x[perm[:360]], y[perm[:360]]
    try:
        from torchvision.datasets import MNIST
        train, test = MNIST(data_dir, train=True, download=True), MNIST(data_dir, train=False, download=True)
    except Exception as err:  # no network, bad files, ...
        raise RunError(f"could not load MNIST from {data_dir!r} ({type(err).__name__}: {err}); "
                       "try --data digits, which works offline") from None
    return (train.data[:, None].float() / 255.0, train.targets.long(), test.data[:2000, None].float() / 255.0,
            test.targets[:2000].long())


class Data:
    """Training batches in model coordinates, held-out samples (and labels) in data coordinates. The floor
    sets are real sets the size of the held-out one: one for the toys, five training subsets for images."""

    def __init__(self, name, data_dir, seed, device, n_eval):
        self.name, self.device, self.data_dir = name, device, data_dir
        self.rng = np.random.default_rng(seed)
        self.n_classes = N_CLASSES.get(name, 0)
        if name in TOY_DATA:
            self.shape = (2,)
            pool, labels = toy_points(name, 2**16, self.rng)
            self.pool, self.labels = torch.tensor(pool, dtype=torch.float32), torch.tensor(labels).long()
            center, scale = TOY_CENTER_SCALE[name]
            self.center, self.scale = torch.tensor(center), torch.tensor(scale)
            heldout, self.heldout_labels = toy_points(name, n_eval, np.random.default_rng(seed + 1000))
            self.heldout = heldout.astype(np.float32)
            self.floor_sets = [toy_points(name, n_eval, np.random.default_rng(seed + 2000))[0].astype(np.float32)]
        else:
            train, self.labels, heldout, heldout_labels = load_images(name, data_dir)
            self.shape = tuple(train.shape[1:])
            self.train = (2 * train - 1).to(device)  # model coordinates [-1, 1]
            n = min(n_eval, len(heldout))
            g = torch.Generator().manual_seed(seed + 2000)
            self.heldout, self.heldout_labels = heldout[:n].reshape(n, -1).numpy(), heldout_labels[:n].numpy()
            self.floor_sets = [train[torch.randperm(len(train), generator=g)[:n]].reshape(n, -1).numpy()
                               for _ in range(5)]   # FD of a few hundred images moves a lot between subsets
        self.n_eval = len(self.heldout)
        if self.n_eval < 2:
            raise RunError("--n-eval must be at least 2: the quality number compares sets of samples")

    def draw(self, n):
        """A training batch of n samples in model coordinates and their labels (int64), on the device."""
        if self.shape == (2,):
            idx = torch.from_numpy(self.rng.integers(len(self.pool), size=n))
            return ((self.pool[idx] - self.center) / self.scale).to(self.device), self.labels[idx].to(self.device)
        idx = torch.from_numpy(self.rng.integers(len(self.train), size=n))
        return self.train[idx.to(self.device)], self.labels[idx].to(self.device)

    def to_data(self, x):
        """Model coordinates -> data coordinates (toy units, or images in [0, 1]) as a numpy array."""
        x = x.detach().float().cpu()
        if self.shape == (2,):
            return (x * self.scale + self.center).numpy()
        return ((x + 1) / 2).clamp(0, 1).numpy()


# --- training ---
def pick_device(name):
    """auto: CUDA, else Apple's MPS, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RunError("--device mps asked for, but MPS is not available")
    return torch.device(name)


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write never replaces a good checkpoint with a broken one."""
    tmp = f"{path}.{os.getpid()}.tmp"                          # two runs at once never share a temporary file
    torch.save(state, tmp)
    os.replace(tmp, path)


def config_diff(old, new):
    """The settings that differ, including those only one side has (None on the other)."""
    keys = list(new) + [k for k in old if k not in new]
    return ", ".join(f"{k}={old.get(k)!r} there but {new.get(k)!r} here" for k in keys if old.get(k) != new.get(k))


def read_saved(path, what, device="cpu"):
    """The dict torch.save wrote to path, with the 'config' it was made with; RunError naming the file otherwise."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(saved, dict) or "config" not in saved:
            raise ValueError("not a dict with a config")
    except Exception as err:
        raise RunError(f"cannot read {what} {path} ({type(err).__name__}: {str(err)[:80]}); "
                       "delete it or choose another --out") from None
    return saved


def load_checkpoint(path, config, device):
    ckpt = read_saved(path, "checkpoint", device)
    if not {"model", "ema", "optimizer", "step"} <= set(ckpt):
        raise RunError(f"cannot read checkpoint {path} (keys missing); delete it or choose another --out")
    if ckpt["config"] != config:
        raise RunError(f"checkpoint {path} is from another config ({config_diff(ckpt['config'], config)}); "
                       "use another --out or run without --resume to start over")
    return ckpt


def lr_at(step, lr, total):
    """Linear warm-up, then cosine decay to lr / 20 at step `total` (the schedule's length), lr / 20 after it."""
    warmup = min(200, total // 10 + 1)
    s = min(step, total)
    return lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * s / total)))


def ode_time_dtype(device):
    """torchdiffeq's adaptive solvers keep time in float64 unless told otherwise; MPS has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def rng_state(rngs):
    """The random state a training step uses: torch's (CPU, CUDA, MPS) and the numpy Generators of the batches."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "mps": [torch.mps.get_rng_state()] if torch.backends.mps.is_available() else [],
            "numpy": json.dumps([g.bit_generator.state for g in rngs])}


def set_rng_state(state, rngs):
    torch.set_rng_state(state["torch"].cpu())              # a checkpoint loaded onto a GPU has them there
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if state.get("mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"][0].cpu())
    for g, s in zip(rngs, json.loads(state["numpy"])):
        g.bit_generator.state = s


def drop_labels(labels, p, n_classes):
    """For classifier-free guidance: each label becomes the "no label" index n_classes with probability p."""
    if labels is None or p == 0:
        return labels
    return torch.where(torch.rand(len(labels), device=labels.device) < p, n_classes, labels)


def train(model, loss_fn, draw, steps, lr, ckpt_path, config, device, resume=False, ema_decay=0.999,
          ckpt_every=2000, rngs=(), desc="train"):
    """Adam on loss_fn(model, *draw()) with an EMA copy of the weights for sampling. Saves ckpt_path every
    ckpt_every steps, at the end and on Ctrl-C, with the schedule's length and the RNG states (rngs: the numpy
    Generators draw() uses), so a resumed run repeats an uninterrupted one. A non-finite loss raises RunError
    and leaves the last good checkpoint. Returns (ema, info)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    ema = copy.deepcopy(model).requires_grad_(False)
    step, losses, schedule = 0, [], steps
    if resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, config, device)
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as err:              # e.g. made by an older version of the network
            detail = " ".join(str(err).split())[:100]
            raise RunError(f"checkpoint {ckpt_path} does not fit the network this run builds ({detail}...); "
                           "delete it or choose another --out") from None
        step, losses, schedule = ckpt["step"], list(ckpt.get("losses", [])), ckpt.get("schedule_steps", steps)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"], rngs)
        if step < steps:
            print(f"[{desc}] resumed from {ckpt_path} at step {step}" + (f"; its learning-rate schedule ends at "
                  f"step {schedule}, later steps use lr / 20" if schedule < steps else ""))

    def state(rng_snapshot):
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "config": config, "losses": losses, "schedule_steps": schedule, "rng": rng_snapshot}

    start_step, pending, interrupted, snapshot = step, [], False, None
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc=desc, mininterval=1.0, disable=step >= steps)
    try:
        while step < steps:
            snapshot = rng_state(rngs)                     # a step interrupted half-way restarts from here
            loss = loss_fn(model, *draw())                 # draw(): (x, e, labels or None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, schedule)
            opt.step()
            pending.append(loss.detach())
            step, snapshot = step + 1, None                # from here on, Ctrl-C saves this step as done
            with torch.no_grad():
                decay = min(ema_decay, step / (9 + step))  # warm-up cap (1 + s) / (10 + s) at step s = step - 1
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            save = step % ckpt_every == 0 or step == steps
            if step % 50 == 0 or save:
                vals, pending = torch.stack(pending).tolist(), []  # one device sync per log interval
                bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
                if bad:
                    bar.close()
                    raise RunError(f"loss became non-finite at step {step - len(vals) + bad[0] + 1}; try a lower "
                                   f"--lr (e.g. --lr {lr / 4:g}). Last good checkpoint: {ckpt_path}")
                losses += vals
                bar.update(len(vals))
                bar.set_postfix(loss=f"{np.mean(vals):.4f}")
                if save:
                    save_checkpoint(ckpt_path, state(rng_state(rngs)))
    except KeyboardInterrupt:
        interrupted = True
        vals = torch.stack(pending).tolist() if pending else []
        if not all(math.isfinite(v) for v in vals):             # keep the last good checkpoint
            raise RunError(f"interrupted after the loss became non-finite; try a lower --lr (e.g. --lr {lr / 4:g}). "
                           f"Last good checkpoint: {ckpt_path}") from None
        losses += vals
        save_checkpoint(ckpt_path, state(snapshot or rng_state(rngs)))
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


def eval_noise(data, seed, device="cpu"):
    """The data.n_eval standard-normal samples the evaluation set is generated from. sklearn's moons and
    circles split each real set exactly between the two curves, while n i.i.d. noise points send about
    1/(2 sqrt(n)) more to one of them (1.1% at 2000), which W2 charges as transport across: a perfect sampler
    scored 1.85x-2.22x the floor. There the noise comes from scrambled Sobol points (quasi-random, shares even
    to ~0.1%; a perfect sampler then scores 0.87x-0.91x). Other data draw their real sets i.i.d., and so does
    this (quasi-random points in 64+ dimensions are also correlated across dimensions)."""
    shape = (data.n_eval, *data.shape)
    if data.name not in ("moons", "circles"):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    sobol = torch.quasirandom.SobolEngine(int(np.prod(data.shape)), scramble=True, seed=seed)
    u = sobol.draw(shape[0], dtype=torch.float64)
    return torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)).float().reshape(shape).to(device)


class FeatureNet(nn.Module):
    """A small CNN classifier of the dataset's classes; its penultimate layer (64 features) is the space in
    which image samples are compared (Frechet distance), as FID does with an Inception network."""

    def __init__(self, in_ch=1, n_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def image_classifier(data, seed=0):
    """The FeatureNet for data's images: read from --data-dir/<name>_classifier.pt if that file was made with
    these settings, else trained on the training split (Adam, batch 128, about 20 epochs, 300 to 2000 steps)
    and saved there. A file that cannot be read or was made otherwise is retrained, with a one-line note."""
    steps = min(2000, max(300, 20 * len(data.train) // 128))
    settings = {"data": data.name, "shape": list(data.shape), "n_train": len(data.train), "steps": steps,
                "seed": seed, "net": "FeatureNet 32-64-64-64"}
    path = os.path.join(data.data_dir, f"{data.name}_classifier.pt")
    with torch.random.fork_rng(devices=[]):                    # leaves the caller's random state alone
        torch.manual_seed(seed)
        net = FeatureNet(data.shape[0])
        if os.path.exists(path):
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved["settings"] == settings:
                    net.load_state_dict(saved["model"])
                    return net.eval()
                print(f"note: {path} was made with other settings; training the classifier again")
            except Exception as err:
                print(f"note: cannot read {path} ({type(err).__name__}); training the classifier again")
            torch.manual_seed(seed)                            # the same classifier as a first run's
            net = FeatureNet(data.shape[0])
        x, y = ((data.train + 1) / 2).cpu(), data.labels
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            i = torch.randint(len(x), (128,))
            loss = F.cross_entropy(net(x[i]), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    try:
        os.makedirs(data.data_dir, exist_ok=True)
        save_checkpoint(path, {"model": net.state_dict(), "settings": settings})
    except OSError as err:
        print(f"note: could not cache the classifier in {path} ({type(err).__name__}); it is trained again next time")
    return net.eval()


def frechet_distance(f1, f2):
    """Frechet distance of Gaussians fitted to two feature sets: |m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))."""
    from scipy import linalg
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    eye = 1e-6 * np.eye(f1.shape[1])                           # dead ReLU features make C singular
    c1, c2 = np.cov(f1, rowvar=False) + eye, np.cov(f2, rowvar=False) + eye
    root = linalg.sqrtm(c1 @ c2).real
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


def classify(x, data):
    """Predicted class of each sample (data coordinates): the image classifier's, or for 2D points the label
    of the nearest held-out real point."""
    if data.shape == (2,):
        a, b = torch.as_tensor(np.asarray(x), dtype=torch.float32), torch.as_tensor(data.heldout)
        return data.heldout_labels[torch.cdist(a, b).argmin(1).numpy()]
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1, *data.shape)
        return image_classifier(data)(x).argmax(1).numpy()


def report(samples, data, labels=None):
    """Each sampler setting against held-out real data, next to the floor of real sets of the same size: exact
    W2 for 2D data, the Frechet distance in a digit classifier's features (FD) for images. labels: the classes
    a conditional run asked for (one per sample); then also the share of samples classified as asked."""
    if data.shape == (2,):
        name, distance = "W2", w2_distance
        prepare = lambda x: x  # noqa: E731
    else:
        name, distance, net = "FD", frechet_distance, image_classifier(data)

        def prepare(x):
            with torch.no_grad():
                return net.features(torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1, *data.shape))
    real = prepare(data.heldout)
    floor = float(np.mean([distance(prepare(f), real) for f in data.floor_sets]))
    m = name.lower()
    metrics = {"metric": name, f"{m}_floor": round(floor, 5), "n_eval": data.n_eval}
    for key, x in samples.items():
        d = distance(prepare(x), real)
        metrics[f"{m}_{key}"], metrics[f"ratio_{key}"] = round(d, 5), round(d / floor, 3)
        metrics[f"{m}_ratio_{key}"] = metrics[f"ratio_{key}"]
        acc = ""
        if labels is not None:
            metrics[f"accuracy_{key}"] = round(float((classify(x, data) == labels).mean()), 4)
            acc = f"  accuracy {metrics[f'accuracy_{key}']:.3f}"
        print(f"{key:>12}  {name} {d:.4f}  floor {floor:.4f}  ({d / floor:.2f}x){acc}")
    return metrics


def save_results(out, samples, data, metrics, labels=None):
    """samples.npz (each sampler's samples, the held-out `real` ones, and the requested `labels` of a
    conditional run) and metrics.json."""
    extra = {} if labels is None else {"labels": labels}
    np.savez(os.path.join(out, "samples.npz"), real=data.heldout.reshape(-1, *data.shape), **samples, **extra)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


def image_grid(x, shape, n=8, labels=None):
    """Up to n x n images of shape (C, H, W) in [0, 1] as one (H', W', 3) array with grey borders (any C);
    with labels, one row of n images per class instead (row k: class k)."""
    from torchvision.utils import make_grid
    if labels is not None:                         # row k: the first n samples asked to be class k
        blank = np.full_like(np.asarray(x[0]), 0.5)  # (grey where there are fewer)
        x = np.stack([x[i] if i is not None else blank for k in range(int(labels.max()) + 1)
                      for i in (list(np.flatnonzero(labels == k)[:n]) + [None] * n)[:n]])
    else:
        n = max(1, min(n, int(np.sqrt(len(x)))))
        x = x[: n * n]
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(-1, *shape)
    return make_grid(x, nrow=n, padding=1, pad_value=0.5).permute(1, 2, 0).clamp(0, 1).numpy()


def angle_colors(e):
    """Colour index 0..7 of each 2D source point by its angle sector, to follow paths in a figure."""
    return ((np.arctan2(e[:, 1], e[:, 0]) + np.pi) / (2 * np.pi) * 8).astype(int) % 8


def plot_panels(path, title, data, rows):
    """Save a figure with one row of panels per list in rows. A panel is
    ("real", label): the held-out data;  ("samples", x, label[, labels]): 2D points, or an image grid (with
    the classes a conditional run asked for: coloured by class, or one image row per class);
    ("paths", p, label, colors): 2D paths p[i, k] from p[i, 0] (t = 1) to p[i, -1] (t = 0);
    ("losses", {name: curve}, label): loss curves, one stage after another;  ("text", note);  None: empty."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    ncol = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.2 * ncol, 3.3 * len(rows)), squeeze=False)
    if data.shape == (2,):
        lo, hi = data.heldout.min(0), data.heldout.max(0)
        lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    for ax, panel in zip(axes.flat, [p for row in rows for p in row + [None] * (ncol - len(row))]):
        kind = panel[0] if panel else None
        if kind in ("real", "samples"):
            x = data.heldout if kind == "real" else panel[1]
            y = panel[3] if kind == "samples" and len(panel) > 3 else None
            if data.shape == (2,):
                ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, c="C0" if kind == "real" else "C1" if y is None
                           else [f"C{k % 10}" for k in y])
                ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[1], hi[1])
            else:
                ax.imshow(image_grid(x, data.shape, labels=y))
                ax.set_xticks([]), ax.set_yticks([])
        elif kind == "paths":
            p, colors = panel[1], panel[3]
            ax.add_collection(LineCollection(p, colors=["gray"] if colors is None else
                                             [f"C{c % 10}" for c in colors], lw=0.4, alpha=0.5))
            ax.scatter(p[:, 0, 0], p[:, 0, 1], s=2, color="C2", label="source (t = 1)")
            ax.scatter(p[:, -1, 0], p[:, -1, 1], s=2, color="k", label="sample (t = 0)")
            ax.legend(fontsize=7, loc="upper right")
        elif kind == "losses":
            start = 0
            for j, (name, curve) in enumerate(panel[1].items()):
                steps = np.arange(start, start + len(curve))
                ax.plot(steps, curve, lw=0.3, alpha=0.4, color=f"C{j}")
                if len(curve) >= 50:
                    ax.plot(steps[49:], np.convolve(curve, np.ones(50) / 50, "valid"), color=f"C{j}", label=name)
                start += len(curve)
            ax.set_yscale("log") if start else None
            ax.set_xlabel("step"), ax.legend(fontsize=7) if ax.get_legend_handles_labels()[0] else None
        else:
            ax.axis("off")
            ax.text(0.5, 0.5, panel[1], ha="center", va="center", fontsize=9) if kind == "text" else None
        ax.set_title(panel[-1] if kind == "real" else panel[2], fontsize=9) if kind not in (None, "text") else None
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- config ---
SCRIPT = os.path.splitext(os.path.basename(__file__))[0]


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonnegative_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {s}")
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


# Defaults per dataset for the flags not given on the command line (mnist: sized for a GPU; the README has a
# CPU command).
DEFAULTS = {"toys": {"steps": 4000, "batch_size": 512, "lr": 5e-3, "channels": 32},
            "digits": {"steps": 4000, "batch_size": 128, "lr": 2e-3, "channels": 16},
            "mnist": {"steps": 20000, "batch_size": 128, "lr": 1e-3, "channels": 32}}


def per_data(key):
    return "default: " + ", ".join(f"{v[key]:g} on {k}" for k, v in DEFAULTS.items())


def check_cond_args(p, args):
    if args.cond and args.data not in N_CLASSES:
        p.error(f"--cond needs data with labels ({', '.join(N_CLASSES)}); {args.data} has none")
    if args.guidance != 1 and not (args.cond and args.label_drop > 0):
        p.error("--guidance needs --cond and --label-drop > 0 (guidance uses the model without a label)")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="moons", choices=TOY_DATA + IMAGE_DATA, help="dataset")
    p.add_argument("--data-dir", default="data", help="where MNIST is stored / downloaded")
    p.add_argument("--steps", type=positive_int, default=argparse.SUPPRESS,
                   help=f"training steps ({per_data('steps')})")
    p.add_argument("--batch-size", type=positive_int, default=argparse.SUPPRESS,
                   help=f"batch size ({per_data('batch_size')})")
    p.add_argument("--lr", type=positive_float, default=argparse.SUPPRESS,
                   help=f"Adam learning rate ({per_data('lr')})")
    p.add_argument("--ema", type=fraction, default=0.999, help="EMA decay of the weights used for sampling; capped by "
                        "(1 + step) / (10 + step), which at 0.999 binds for the first ~9000 steps")
    p.add_argument("--hidden", type=positive_int, default=64, help="width of the 2D residual MLP")
    p.add_argument("--depth", type=positive_int, default=3, help="residual blocks of the 2D MLP")
    p.add_argument("--channels", type=positive_int, default=argparse.SUPPRESS,
                   help=f"base channels of the image U-Net ({per_data('channels')})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed")
    p.add_argument("--out", default=None, help=f"output folder (default outputs/{SCRIPT})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out, on its lr schedule")
    p.add_argument("--n-eval", type=positive_int, default=2000, help="samples for the quality number (W2 or FD)")
    p.add_argument("--ckpt-every", type=positive_int, default=2000, help="checkpoint interval in steps")
    p.add_argument("--cond", action="store_true", help="class-conditional model: " + ", ".join(
                   f"{k} ({n} classes)" for k, n in N_CLASSES.items()))
    p.add_argument("--label-drop", type=fraction, default=0.1,
                   help="with --cond: share of training labels replaced by 'no label' (guidance needs it)")
    p.add_argument("--guidance", type=positive_float, default=1.0, help="with --cond: classifier-free guidance "
                   "weight W, v = v(no label) + W (v(label) - v(no label)), 1 = none; "
                   "applied at sampling (two network evaluations per step)")
    # the method's own flags
    p.add_argument("--source", default="gaussian", choices=["gaussian"] + TOY_DATA,
                   help="source distribution at t = 1 (a 2D toy makes it distribution-to-distribution transfer)")
    p.add_argument("--ode-steps", type=positive_int, default=100,
                   help="Euler steps of the simulated ODE used for straightness, transport cost and 'ode' samples")
    args = p.parse_args(argv)
    for key, value in DEFAULTS["toys" if args.data in TOY_DATA else args.data].items():
        vars(args).setdefault(key, value)
    check_cond_args(p, args)
    if args.source != "gaussian" and args.data not in TOY_DATA:
        p.error("a 2D toy --source needs a 2D toy --data")
    args.out = args.out or os.path.join("outputs", SCRIPT)
    return args


def run_config(args):
    """The settings a checkpoint must share with this run to be resumed."""
    return {"script": SCRIPT, "data": args.data, "hidden": args.hidden, "depth": args.depth,
            "channels": args.channels, "source": args.source,
            **({"cond": True, "label_drop": args.label_drop} if args.cond else {})}


# --- main ---
def run(args, argv):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    data = Data(args.data, args.data_dir, args.seed, device, args.n_eval)
    source = None if args.source == "gaussian" else Data(args.source, args.data_dir, args.seed + 7, device, 2)
    n_classes = data.n_classes if args.cond else 0
    model = make_model(data.shape, 1, args.hidden, args.depth, args.channels, n_classes).to(device)  # v(z, t)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if not args.resume and os.path.exists(ckpt_path):
        print(f"note: starting over; {ckpt_path} will be replaced (use --resume to continue it)")

    def draw():
        x, y = data.draw(args.batch_size)
        e = torch.randn_like(x) if source is None else source.draw(args.batch_size)[0]
        return x, e, drop_labels(y, args.label_drop, n_classes) if args.cond else None

    loss_fn = rf_loss
    rngs = [data.rng] + ([source.rng] if source else [])       # the numpy Generators draw() uses
    ema, info = train(model, loss_fn, draw, args.steps, args.lr, ckpt_path, run_config(args), device, args.resume,
                      args.ema, args.ckpt_every, rngs, desc=SCRIPT)

    e = (eval_noise(data, args.seed + 3000, device) if source is None  # quasi-random for moons, see there
         else source.draw(data.n_eval)[0])
    ema.eval()
    labels = data.heldout_labels if args.cond else None         # the classes asked for: the held-out set's
    y, w = None if labels is None else torch.as_tensor(labels, device=device), args.guidance
    evals = 1 if y is None or w == 1 else 2                     # network evaluations per Euler step
    out = {f"nfe{k * evals}": euler_sample(ema, e, k, y, w) for k in (1, 2, 4, 8)}
    out["ode"], S, C = straightness(ema, e, args.ode_steps, y, w)
    samples = {k: data.to_data(v) for k, v in out.items()}
    cond = f" (class-conditional, guidance {w:g})" if y is not None else ""
    print(f"1-Rectified Flow {args.source} -> {args.data}{cond}"
          f", {info['steps']} steps, {info['train_seconds']:.1f} s ({info['ms_per_step']} ms/step), EMA weights; "
          f"Euler with 1-8 steps, ode = {args.ode_steps} Euler steps ({args.ode_steps * evals} NFE):")
    metrics = report(samples, data, labels)
    print(f"straightness {S:.4f}   transport cost {C:.4f}   (model coordinates, {args.ode_steps}-step ODE)")
    metrics.update({k: v for k, v in info.items() if k != "losses"})
    metrics.update({"straightness": round(S, 5), "transport_cost": round(C, 5), "source": args.source,
                    "guidance": w if y is not None else None})
    metrics["command"] = " ".join(["python", f"{SCRIPT}.py"] + (sys.argv[1:] if argv is None else list(argv)))
    save_results(args.out, samples, data, metrics, labels)
    row = [("real", "real (held-out)")] + [("samples", x, f"{k}  {metrics['metric']} {metrics[f'ratio_{k}']:.2f}x",
                                            labels) for k, x in samples.items()]
    if data.shape == (2,):
        _, path = euler_sample(ema, e[:300], 16, None if y is None else y[:300], w, keep_path=True)
        paths = np.stack([data.to_data(path[:, i]) for i in range(path.shape[1])], axis=1)
        row.append(("paths", paths, "ODE paths source -> target (16 Euler steps)", angle_colors(e[:300].cpu().numpy())))
    row.append(("losses", {"1-RF": info["losses"]}, "training loss"))
    cond = f", class-conditional (one row per class), guidance {args.guidance:g}" if args.cond else ""
    plot_panels(os.path.join(args.out, "results.png"), f"1-Rectified Flow {args.source} -> {args.data}{cond} "
                f"({info['steps']} steps): straightness {S:.3f}, transport cost {C:.3f}", data, [row])
    print(f"wrote {args.out}/results.png, samples.npz, metrics.json, checkpoint.pt")
    if info["interrupted"]:
        sys.exit(130)
    return metrics


def main(argv=None):
    """Command line entry: one-line errors for problems the user can fix, exit code 130 on Ctrl-C."""
    import matplotlib
    matplotlib.use("Agg")
    args = get_args(argv)
    try:
        return run(args, argv)
    except RunError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print("\ninterrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
