"""1-Rectified Flow: straight-line interpolation between any two distributions, sampled by its ODE.

Liu et al., "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow" (ICLR 2023),
with the collection's time convention: target x at t = 0, source e at t = 1 (the paper has X0 the source at
t = 0: its t is our 1 - t, and its velocity X1 - X0 is minus ours).
  coupling      x ~ target, e ~ source, independent: N(0, I) -> data, or one toy to another (--source)
  interpolation z_t = (1 - t) x + t e,  dz_t/dt = e - x,  t ~ U(0, 1)
  loss          || v_theta(z_t, t) - (e - x) ||^2
  sampling      dz/dt = v_theta(z, t) from t = 1 to 0 with Euler steps, z <- z + (t_next - t) v_theta(z, t)
  straightness  S = E int_0^1 ||(z_1 - z_0) - v(z_t, t)||^2 dt on the simulated ODE (0: straight paths);
  transport     C = E ||z_0 - z_1||^2. The straight lines of the independent coupling cross, the ODE's paths
                cannot: they bend, and one step averages over the crossings (reflow.py straightens them).
  guidance      --cond --guidance W: v(no label) + W (v(label) - v(no label)) for t in --guidance-interval
Departures from the paper: small networks with a low-frequency time embedding.

  python rectified_flow.py                                  # N(0, I) -> moons, about 30 s on a laptop CPU
  python rectified_flow.py --source 8gaussians --data moons # distribution-to-distribution transfer
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
def coupling(target, source=None):
    """The independent coupling of two distributions: batches (x, e, labels) with x and labels from the target
    batches and e from the source batches (None: the target batches' e ~ N(0, I))."""
    for x, e, labels in target:
        yield x, e if source is None else next(source)[0], labels


def rf_loss(model, x, e, labels=None):
    """1-rectified flow: ||v_theta(z_t, t) - (e - x)||^2 on the straight line z_t = (1 - t) x + t e."""
    t = torch.rand(len(x), device=x.device)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e
    return ((model(z, t, labels=labels) - (e - x)) ** 2).mean()


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
    z, nfe = e, 0
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()      # float32 times as Python numbers: no waits
    for t, t_next in zip(ts, ts[1:]):
        w_t = w if lo <= t <= hi else 1.0
        z = z + (t_next - t) * velocity(model, z, torch.full((len(e),), t, device=e.device), labels, w_t)
        nfe += 1 if labels is None or w_t == 1 else 2
    return z, nfe


@torch.no_grad()
def straightness(model, e, steps=100, labels=None, w=1.0, interval=(0.0, 1.0)):
    """Simulate the ODE from z_1 = e with `steps` Euler steps, guided only for t in the interval. Returns
    the path z(t_i), t_i = 1 ... 0, its straightness S = E int_0^1 ||(z_1 - z_0) - v(z_t, t)||^2 dt (a sum
    over the steps) and the transport cost C = E ||z_0 - z_1||^2."""
    lo, hi = torch.tensor(interval).tolist()                # float32, as the times
    path, v = [e], []
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()      # float32 times as Python numbers: no waits
    for t, t_next in zip(ts, ts[1:]):
        w_t = w if lo <= t <= hi else 1.0
        v.append(velocity(model, path[-1], torch.full((len(e),), t, device=e.device), labels, w_t))
        path.append(path[-1] + (t_next - t) * v[-1])
    line = e - path[-1]                                     # z_1 - z_0
    S = torch.stack([((line - vi) ** 2).flatten(1).sum(1) for vi in v]).mean().item()
    return torch.stack(path), S, (line ** 2).flatten(1).sum(1).mean().item()


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
DEFAULTS = {"toys": {"steps": 4000, "batch_size": 512, "lr": 5e-3, "channels": 32, "n_eval": 2000,
                     "ode_steps": 100, "guidance_interval": [0.0, 1.0]},
            "digits": {"steps": 4000, "batch_size": 128, "lr": 2e-3, "channels": 16, "n_eval": 2000,
                       "ode_steps": 100, "guidance_interval": [0.0, 1.0]},
            "mnist": {"steps": 6000, "batch_size": 64, "lr": 2e-3, "channels": 16, "n_eval": 1000,
                      "ode_steps": 16, "guidance_interval": [0.0, 1.0]}}


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
    p = argparse.ArgumentParser(description="1-Rectified Flow between two distributions.",
                                epilog=epilog, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    per_data = argparse.SUPPRESS                            # from DEFAULTS, for the --data given
    p.add_argument("--data", default="moons", choices=TOYS + ["digits", "mnist"], help="dataset")
    p.add_argument("--data-dir", default="data", help="where MNIST is stored or downloaded to")
    p.add_argument("--steps", type=positive(int), default=per_data, help="training steps")
    p.add_argument("--batch-size", type=positive(int), default=per_data, help="batch size")
    p.add_argument("--lr", type=positive(float), default=per_data, help="learning rate")
    p.add_argument("--channels", type=positive(int), default=per_data, help="base channels of the U-Net")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device")
    p.add_argument("--seed", type=int, default=0, help="random seed (0 or more)")
    p.add_argument("--out", default=os.path.join("outputs", SCRIPT), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--n-eval", type=positive(int), default=per_data, help="samples to evaluate")
    p.add_argument("--cond", action="store_true", help=f"class-conditional ({', '.join(N_CLASSES)})")
    p.add_argument("--guidance", type=positive(float), default=1.0,
                   help="with --cond: classifier-free guidance weight")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=per_data, metavar=("LO", "HI"),
                   help="guide only for t in [LO, HI]; unguided elsewhere")
    p.add_argument("--source", default="gaussian", choices=["gaussian"] + TOYS, help="distribution at t = 1")
    p.add_argument("--ode-steps", type=positive(int), default=per_data, help="Euler steps of the 'ode' path")
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
    if args.source != "gaussian" and args.data not in TOYS:
        p.error("a toy --source needs a toy --data")
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
    source = None if args.source == "gaussian" else Data(args.source, args.data_dir, args.seed + 7, device,
                                                         args.n_eval)
    n_classes = data.n_classes if args.cond else 0
    if data.shape == (2,):                                  # v_theta(z, t): one time
        model = ResMLP(1, n_classes).to(device)
    else:                                                   # channels-last: faster convolutions on a CPU
        model = SmallUNet(data.shape, 1, args.channels, n_classes)
        model = model.to(device, memory_format=torch.channels_last)
    keys = ["data", "data_dir", "channels", "cond", "source", "seed", "lr", "batch_size"]
    config = {k: vars(args)[k] for k in keys + ["steps"]}   # what makes it this run: --resume refuses others
    # a finished checkpoint made with these settings is sampled again (another --guidance: no training), an
    # unfinished one continued by --resume
    path = os.path.join(args.out, "checkpoint.pt")
    ckpt = load_checkpoint(path, config, args.resume)
    if ckpt is not None and ckpt["step"] < config["steps"] and not args.resume:
        print(f"note: {path} stopped at step {ckpt['step']}; training it anew (--resume continues it)")
        ckpt = None
    elif ckpt is not None and ckpt["step"] == config["steps"]:
        print(f"note: sampling the finished {path} again; delete it to train anew")
    batches = coupling(data.batches(args.batch_size, args.cond),
                       None if source is None else source.batches(args.batch_size))
    ema, info = train(model, rf_loss, batches, args.steps, args.lr, path, config, ckpt)

    # Euler with 1 to 8 steps and the simulated ODE, from the same source points, for the held-out labels
    if source is None:
        e = eval_noise(data, args.seed + 3000, device)
    else:                                                   # the source's held-out set, in model coordinates
        e = ((torch.as_tensor(source.heldout) - source.center) / source.scale).to(device)
    labels = data.heldout_labels if args.cond else None
    y = None if labels is None else torch.as_tensor(labels, device=device)
    w, interval = args.guidance, args.guidance_interval
    runs = [euler_sample(ema, e, k, y, w, interval) for k in (1, 2, 4, 8)]
    samples = {f"nfe{nfe}": data.to_data(x) for x, nfe in runs}     # keyed by their network evaluations
    paths, S, C = straightness(ema, e, args.ode_steps, y, w, interval)
    samples["ode"] = data.to_data(paths[-1])
    print(f"1-Rectified Flow {args.source} -> {args.data}, {info['steps']} steps; Euler, and the ODE's "
          f"{args.ode_steps} steps:")
    metrics = report_w2(samples, data) if data.shape == (2,) else {}
    print(f"straightness {S:.4f}, transport cost {C:.4f} (model coordinates)")
    metrics.update(steps=info["steps"], train_seconds=info["train_seconds"], straightness=round(S, 5),
                   transport_cost=round(C, 5))
    panels = [("real (held-out)", data.heldout), *samples.items()]
    if data.shape == (2,):
        panels.append(("ode", np.stack([data.to_data(z) for z in paths[:, :300]], 1)))     # the ODE's paths
    title = f"1-Rectified Flow {args.source} -> {args.data}" + (f", guidance {w:g}" if y is not None else "")
    title += f", straightness {S:.3f}, transport cost {C:.3f}"
    save_results(args, samples, data, metrics, labels)
    plot_panels(os.path.join(args.out, "results.png"), f"{title}, {info['steps']} steps", panels,
                {"1-RF": info["losses"]}, metrics, labels)
    return metrics


if __name__ == "__main__":
    try:
        run(get_args())
    except RunError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:                               # train saved the checkpoint and said so
        sys.exit(130)
