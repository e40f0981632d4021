"""iMF on a reflow coupling: a teacher, pairs (x_hat, e) by its ODE, then improved MeanFlow on the pairs.

iMF (Geng et al., "Mean Flows for One-step Generative Modeling", 2025) on the coupling of reflow (Liu et al.,
ICLR 2023), with the collection's time convention: data x at t = 0, noise e ~ N(0, I) at t = 1,
z_t = (1 - t) x + t e (the reflow paper's t is 1 - t).
  stage 1    the teacher on independent (x, e): flow matching on the boundary, || u(z_t, t, t) - (e - x) ||^2
             (--teacher fm), or iMF as in stage 2 (--teacher imf)
  coupling   x_hat = ODE(e): dz/dt = v(z, t) = u(z, t, t) from t = 1 to 0 (dopri5; mnist: 16 midpoint steps)
  stage 2    iMF (imf.py) on the pairs, from the teacher's weights: || u(z_t, r, t) + (t - r) sg(d/dt u)
             - (e - x_hat) ||^2, d/dt u = du/dz . v + du/dt by one JVP, tangent (v, 0, 1), v = u(z_t, t, t)
  one step   x = e - u(e, r = 0, t = 1), as z_r = z_t - (t - r) u(z_t, r, t)
  guidance   --cond: pairs per label from the teacher's ODE guided at w = 1, 1.5, 2, 3, 4, a share each
             (fm: classifier-free, for t in --guidance-interval; iMF: w an input, as imf.py); stage 2 takes
             each pair's w as an input (w-conditioned distillation, Meng et al., CVPR 2023), so --guidance W
             is chosen when sampling: a finished run asked for another W samples again, with no training
Departures from the papers (measured: RESULTS.md): a flow-matching teacher by default (half the cost a step,
a better stage 2); iMF's boundary t the larger of two uniforms; small networks; on mnist the fm teacher's
ODE unguided for t > 0.9 (as fm.py, after Kynkaanniemi et al., NeurIPS 2024).

  python imf_reflow.py                  # moons: teacher, dopri5 pairs, iMF; about a minute on a laptop CPU
  python imf_reflow.py --teacher imf    # an iMF teacher instead of flow matching
  python imf_reflow.py --data digits --cond --guidance 2    # then: python evaluate.py outputs/imf_reflow
Files in --out: stage1.pt, pairs1.pt, stage2.pt; a later run reuses those made with its settings.
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
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# --- method ---
def sample_r_t(n, device, boundary_t="max", boundary_frac=0.7, r0_frac=0.2):
    """(r, t), r <= t: the first nb rows r = t, then r = 0 (the one-step corner's slice), then any r < t."""
    nb, n0 = round(n * boundary_frac), round(n * r0_frac)
    a, b = torch.rand(n, device=device), torch.rand(n, device=device)
    r, t = torch.minimum(a, b), torch.maximum(a, b)
    if boundary_t == "logit-normal":
        t[:nb] = torch.sigmoid(torch.randn(nb, device=device) - 0.4)
    elif boundary_t != "max":
        raise ValueError(f"boundary_t must be logit-normal or max, got {boundary_t!r}")
    r[:nb] = t[:nb]
    r[nb:nb + n0], t[nb:nb + n0] = 0.0, 1.0 - a[nb:nb + n0]
    return r, t, nb


def meanflow_jvp(model, z, r, t, v, labels=None, scale=()):
    """u(z, r, t) and d/dt u = du/dz . v + du/dt by one JVP with tangent (v, 0, 1) (and 0 for the weights:
    faster on a CPU than as constants); the guidance scale's input, if any, held fixed."""
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    zeros = {k: torch.zeros_like(w) for k, w in weights.items()}
    f = lambda w, z, r, t: torch.func.functional_call(model, w, (z, r, t, *scale), {"labels": labels})  # noqa
    with warnings.catch_warnings():                         # torch.func.jvp: "torch.jit.script is deprecated"
        warnings.filterwarnings("ignore", message=".*torch.jit.script")
        return torch.func.jvp(f, (weights, z, r, t), (zeros, v, torch.zeros_like(r), torch.ones_like(t)))


def imf_loss(model, x, e, labels=None, w=None, boundary_t="max", w_max=4.0):
    """iMF: ||u(z_t, r, t) + (t - r) sg(d/dt u) - v_g||^2, JVP tangent v_theta = u(z_t, t, t). Unconditional:
    v_g = e - x. With labels u also takes a guidance scale w as the input g = 1 - 1/w: on pairs, each pair's
    (its x is guided already: v_g = e - x); else (the iMF teacher) drawn log-uniform in [1, w_max], and
    labelled rows regress v_g = (e - x) + g sg(v(z_t | label, w) - v(z_t | none, 1)), as in imf.py."""
    r, t, nb = sample_r_t(len(x), x.device, boundary_t)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e                               # z_t = (1 - t) x + t e
    guided = labels is not None and w is None               # the iMF teacher: guided targets
    if guided:
        w = w_max ** torch.rand(len(x), device=x.device)    # a scale a row, log-uniform in [1, w_max]
    scale = [] if labels is None else [1 - 1 / w]           # the net's input g = 1 - 1/w
    u = model(z, r, t, *scale, labels=labels)               # u_theta(z_t, r, t), trained
    with torch.no_grad():                                   # sg(.); the JVP term vanishes where r = t
        j = slice(nb, None)                                 # the rows r < t
        lj, sj = None if labels is None else labels[j], [s[j] for s in scale]
        v_theta = model(z[j], t[j], t[j], *sj, labels=lj)   # boundary condition v(z, t) = u(z, t, t)
        _, dudt = meanflow_jvp(model, z[j], r[j], t[j], v_theta, lj, sj)
        target = e - x                                      # the conditional velocity
        if guided:                                          # v(z_t, t | label, w): u if r = t, else v_theta
            null = torch.full_like(labels, model.n_classes)
            v_null = model(z, t, t, torch.zeros_like(t), labels=null)
            g = torch.where(labels == null, 0.0, scale[0])  # dropped labels: the unguided target
            target = target + g.view(tb.shape) * (torch.cat([u[:nb], v_theta]) - v_null)
    V = torch.cat([u[:nb], u[nb:] + (t - r)[j].view(-1, *tb.shape[1:]) * dudt])   # the compound prediction
    return ((V - target) ** 2).mean()


@torch.no_grad()
def sample(model, e, nfe, labels=None, w=1.0):
    """nfe equal steps from t = 1 to 0, z_r = z_t - (t - r) u(z_t, r, t); nfe = 1 is x = e - u(e, 0, 1);
    with labels at guidance scale w (the input g = 1 - 1/w)."""
    z, ts = e, torch.linspace(1.0, 0.0, nfe + 1, device=e.device)
    scale = [] if labels is None else [torch.full((len(e),), 1 - 1 / w, device=e.device)]
    for i in range(nfe):
        r, t = ts[i + 1].expand(len(e)), ts[i].expand(len(e))
        z = z - (ts[i] - ts[i + 1]) * model(z, r, t, *scale, labels=labels)
    return z


def fm_loss(model, x, e, labels=None):
    """The flow-matching teacher (--teacher fm): only the boundary u(z_t, t, t) = v(z_t, t) is trained, at
    the scale input of w = 1 (it is guided by classifier-free guidance when sampled)."""
    t = torch.rand(len(x), device=x.device)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e
    scale = [] if labels is None else [torch.zeros_like(t)]
    return ((model(z, t, t, *scale, labels=labels) - (e - x)) ** 2).mean()


def velocity(model, z, t, labels=None, w=1.0, cfg=False):
    """v(z, t) = u_theta(z, t, t); with labels guided by w: as the net's input g = 1 - 1/w (iMF), or with cfg
    (the fm teacher, trained at g = 0) classifier-free, v(no label) + w (v(label) - v(no label))."""
    if labels is None:
        return model(z, t, t)
    g = torch.full_like(t, 0.0 if cfg else 1 - 1 / w)
    if not cfg or w == 1:
        return model(z, t, t, g, labels=labels)
    null = torch.full_like(labels, model.n_classes)
    uncond, cond = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([g, g]),
                         labels=torch.cat([null, labels])).chunk(2)
    return uncond + w * (cond - uncond)


@torch.no_grad()
def euler_sample(model, e, steps, labels=None, w=1.0, interval=(0.0, 1.0)):
    """The fm teacher: Euler from t = 1 to 0 in equal steps, z <- z + (t_next - t) v(z, t), classifier-free
    guided in the interval: z, NFE."""
    lo, hi = torch.tensor(interval).tolist()                # float32, as the times
    z, ts, nfe = e, torch.linspace(1.0, 0.0, steps + 1).tolist(), 0
    for i in range(steps):
        w_t = w if lo <= ts[i] <= hi else 1.0
        t = torch.full((len(e),), ts[i], device=e.device)
        z = z + (ts[i + 1] - ts[i]) * velocity(model, z, t, labels, w_t, cfg=True)
        nfe += 1 if labels is None or w_t == 1 else 2
    return z, nfe


@torch.no_grad()
def ode_generate(model, e, labels=None, w=1.0, interval=(0.0, 1.0), n_grid=1, steps=0, cfg=False):
    """dz/dt = v(z, t) from t = 1 to 0 by dopri5 (or steps midpoint steps), guided in the interval (with cfg;
    else at the scale input): the path at n_grid + 1 times, the NFE."""
    from torchdiffeq import odeint
    nfe = [0]

    def f(t, z):                                            # t: torchdiffeq's tensor, its solvers wait on it
        w_t = w if not cfg or interval[0] <= t.clamp(0, 1) <= interval[1] else 1.0   # dopri5 steps past 0
        nfe[0] += 2 if cfg and labels is not None and w_t != 1 else 1
        return velocity(model, z, t.expand(len(z)), labels, w_t, cfg)

    ts = torch.linspace(1.0, 0.0, n_grid + 1, device=e.device)
    if steps:                                               # fixed steps: far cheaper on MNIST (RESULTS.md)
        return odeint(f, e, ts, method="midpoint", options={"step_size": 1.0 / steps}), nfe[0]
    options = {"dtype": torch.float32 if e.device.type == "mps" else torch.float64}   # MPS has no float64
    try:
        return odeint(f, e, ts, method="dopri5", rtol=1e-5, atol=1e-5, options=options), nfe[0]
    except AssertionError:                                  # a non-finite velocity: dopri5 "underflow in dt"
        return torch.full((n_grid + 1, *e.shape), math.nan, device=e.device), nfe[0]


@torch.no_grad()
def straightness(model, path, labels=None, w=1.0, interval=(0.0, 1.0), cfg=False):
    """Of an ODE path z(t_i), t_i = 1 ... 0: S = E int_0^1 ||(z_1 - z_0) - v(z_t, t)||^2 dt (a Riemann sum; 0
    for straight paths) and the transport cost C = E ||z_0 - z_1||^2."""
    lo, hi = torch.tensor(interval).tolist()                # float32, as the times
    ts = torch.linspace(1.0, 0.0, len(path)).tolist()
    line = path[0] - path[-1]
    gaps = []
    for z, t in zip(path[:-1], ts[:-1]):
        w_t = w if not cfg or lo <= t <= hi else 1.0
        v = velocity(model, z, torch.full((len(z),), t, device=z.device), labels, w_t, cfg)
        gaps.append(((line - v) ** 2).flatten(1).sum(1))
    return torch.stack(gaps).mean().item(), (line ** 2).flatten(1).sum(1).mean().item()


def make_pairs(model, n, shape, seed, n_classes=0, scales=(1.0,), interval=(0.0, 1.0), steps=0, chunk=4096,
               cfg=False):
    """The coupling, on the CPU: n noises e, x_hat = ODE(e) in chunks, balanced labels (if n_classes) and an
    equal share guided at each scale w (with cfg in the interval), the NFE a pair (the most), the seconds."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    e = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % n_classes if n_classes else None
    w = torch.tensor(scales)[torch.arange(n) * len(scales) // n]           # in blocks, each label balanced
    parts = [(s, i) for s in scales for i in torch.nonzero(w == s)[:, 0].split(chunk)]
    x_hat, nfe = torch.empty(n, *shape), 0
    for s, i in tqdm(parts, desc="pairs (ODE)", mininterval=1.0):
        y = None if labels is None else labels[i].to(device)
        path, k = ode_generate(model, e[i].to(device), y, s, interval, steps=steps, cfg=cfg)
        x_hat[i] = path[-1].cpu()
        nfe = max(nfe, k)
    seconds = round(time.perf_counter() - t0, 2)
    return {"x_hat": x_hat, "e": e, "labels": labels, "w": w, "nfe": nfe, "seconds": seconds}


def pair_batches(pairs, n, device):
    """Endless batches (x_hat, e, labels, w) of random pairs on the device, for a reflow stage."""
    while True:
        i = torch.randint(len(pairs["e"]), (n,))
        labels = None if pairs["labels"] is None else pairs["labels"][i].to(device)
        yield pairs["x_hat"][i].to(device), pairs["e"][i].to(device), labels, pairs["w"][i].to(device)


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
GUIDANCE_SWEEP = (1.0, 1.5, 2.0, 3.0, 4.0)                  # --cond: stage 2's pairs and samples at each
DEFAULTS = {"toys": {"steps": 4000, "reflow_steps": 2000, "batch_size": 512, "lr": 5e-3, "channels": 32,
                     "n_pairs": 16384, "ode_steps": 0, "n_eval": 2000, "guidance_interval": [0.0, 1.0]},
            "digits": {"steps": 5000, "reflow_steps": 2500, "batch_size": 128, "lr": 2e-3, "channels": 16,
                       "n_pairs": 8192, "ode_steps": 0, "n_eval": 2000, "guidance_interval": [0.0, 1.0]},
            "mnist": {"steps": 6000, "reflow_steps": 5000, "batch_size": 64, "lr": 1e-3, "channels": 16,
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
    p = argparse.ArgumentParser(description="improved MeanFlow on a reflow coupling.",
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
                   help="with --cond: the guidance scale (stage 2 is sampled at the sweep's too); another "
                   "samples a finished run again")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=per_data, metavar=("LO", "HI"),
                   help="guide the fm teacher's ODE only for t in [LO, HI]; unguided elsewhere")
    p.add_argument("--reflow-steps", type=positive(int), default=per_data, help="training steps of stage 2")
    p.add_argument("--n-pairs", type=positive(int), default=per_data, help="pairs (x_hat, e) made by stage 1")
    p.add_argument("--ode-steps", type=int, default=per_data,
                   help="the ODE of the pairs and 'ode' samples: 0 dopri5, N > 0 N midpoint steps")
    p.add_argument("--teacher", default="fm", choices=["fm", "imf"], help="stage 1: flow matching or iMF")
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
    if args.ode_steps < 0:
        p.error(f"--ode-steps must be 0 or more, got {args.ode_steps}")
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
    if data.shape == (2,):                                  # u_theta(z, r, t), with --cond also of g
        model = ResMLP(2 + args.cond, n_classes).to(device)
    else:                                                   # channels-last: faster convolutions on a CPU
        model = SmallUNet(data.shape, 2 + args.cond, args.channels, n_classes)
        model = model.to(device, memory_format=torch.channels_last)
    fm = args.teacher == "fm"
    keys = ["data", "data_dir", "channels", "cond", "teacher", "seed", "lr", "batch_size"]
    config = {k: vars(args)[k] for k in keys + ["steps"]}   # what makes it this run: --resume refuses others
    stages, infos, pair_infos = {}, {}, {}
    # stage 1, the teacher on independent (x, e): flow matching on the boundary, or iMF with the guidance
    # scale an input: a finished stage file made with these settings is reused, an unfinished one resumed by
    # --resume
    path = os.path.join(args.out, "stage1.pt")
    ckpt = load_checkpoint(path, config, args.resume)
    if ckpt is not None and ckpt["step"] < config["steps"] and not args.resume:
        print(f"note: {path} stopped at step {ckpt['step']}; training it anew (--resume continues it)")
        ckpt = None
    batches = data.batches(args.batch_size, args.cond)
    loss_fn = fm_loss if fm else imf_loss
    stages["stage1"], infos["stage1"] = train(model, loss_fn, batches, args.steps, args.lr, path, config,
                                              ckpt, "stage1")

    # stage 2: iMF on the pairs of the teacher's ODE (per label, a share guided at each scale of the sweep),
    # from its weights, with each pair's scale as its input. The pairs and stage files are reused only if made
    # from the very file upstream ("made_from": its hash)
    scales = GUIDANCE_SWEEP if args.cond else (1.0,)
    pairs_path = os.path.join(args.out, "pairs1.pt")
    pairs_config = {"n_pairs": args.n_pairs, "ode_steps": args.ode_steps, "scales": list(scales),
                    "guidance_interval": args.guidance_interval if fm and args.cond else None,
                    "made_from": file_hash(path)}
    pairs = load_checkpoint(pairs_path, pairs_config, args.resume)
    if pairs is None:
        chunk = 256 if args.data == "mnist" else 4096        # on a CPU big image batches cost 3x more
        pairs = make_pairs(stages["stage1"], args.n_pairs, data.shape, args.seed + 4001, n_classes, scales,
                           args.guidance_interval, args.ode_steps, chunk, cfg=fm)
        save_checkpoint(pairs_path, {**pairs, "config": pairs_config})
    pair_infos["pairs1"] = {"nfe": pairs["nfe"], "seconds": pairs["seconds"]}
    torch.manual_seed(args.seed + 5001)                     # the stage's batches, whether files were reused
    model.load_state_dict(stages["stage1"].state_dict())
    loss_fn = imf_loss
    config = {**config, "steps": args.reflow_steps, "made_from": file_hash(pairs_path)}
    path = os.path.join(args.out, "stage2.pt")
    ckpt = load_checkpoint(path, config, args.resume)
    if ckpt is not None and ckpt["step"] < config["steps"] and not args.resume:
        print(f"note: {path} stopped at step {ckpt['step']}; training it anew (--resume continues it)")
        ckpt = None
    batches = pair_batches(pairs, args.batch_size, device)
    stages["stage2"], infos["stage2"] = train(model, loss_fn, batches, args.reflow_steps, args.lr, path,
                                              config, ckpt, "stage2")

    # each stage: 1, 2, 4 steps and its ODE at --guidance, from the same noise, for the held-out set's labels
    # (the fm teacher: Euler steps, classifier-free guided); with --cond stage 2's steps at each scale too
    e = eval_noise(data, args.seed + 3000, device)
    labels = data.heldout_labels if args.cond else None
    y = None if labels is None else torch.as_tensor(labels, device=device)
    w = args.guidance
    tag = lambda w: f"_w{w:g}" if args.cond else ""         # noqa: E731  (keys stage2_nfe1, or ..._w2, ...)
    ode = f"{args.ode_steps} midpoint steps" if args.ode_steps else "dopri5"
    print(f"iMF on a reflow coupling, {args.data}: each stage's few steps and ODE ({ode}):")
    losses, out, panels = {name: info.pop("losses") for name, info in infos.items()}, {}, []
    for name, model in stages.items():
        cfg = name == "stage1" and fm
        for s in sorted({*scales, w}) if name == "stage2" else [w]:
            for n in (1, 2, 4):
                if cfg:
                    x, nfe = euler_sample(model, e, n, y, s, args.guidance_interval)
                else:
                    x, nfe = sample(model, e, n, y, s), n
                out[f"{name}_nfe{nfe}{tag(s)}"] = x
                if n == 1 and s in (1.0, w, scales[-1]):    # one-step panels (2 NFE if cfg), a few scales
                    panels.append((f"{name}_nfe{nfe}{tag(s)}", x))
        n_grid = 100 if data.shape == (2,) else 10         # the path's points for its straightness
        path, infos[name]["ode_nfe"] = ode_generate(model, e, y, w, args.guidance_interval, n_grid,
                                                    args.ode_steps, cfg)
        out[f"{name}_ode{tag(w)}"] = path[-1]
        S, C = straightness(model, path, y, w, args.guidance_interval, cfg)
        infos[name].update(straightness=S, transport_cost=C)
        print(f"{name}: {infos[name]['steps']} steps, straightness {S:.4f}, transport cost {C:.4f}")
        path = path[:, :300].transpose(0, 1) if data.shape == (2,) else path[-1]    # 2D: the paths
        panels.append((f"{name}_ode{tag(w)}", path))
    samples = {k: data.to_data(v) for k, v in out.items()}
    metrics = report_w2(samples, data) if data.shape == (2,) else {}
    metrics.update(stages=infos, pairs=pair_infos)
    panels = [("real (held-out)", data.heldout)] + [(k, data.to_data(v)) for k, v in panels]
    title = f"iMF on a reflow coupling, {args.data}"
    title += f", guidance {args.guidance:g} (stage 2 sampled at several)" if y is not None else ""
    title += f" for t in {args.guidance_interval}" if y is not None and fm else ""
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
