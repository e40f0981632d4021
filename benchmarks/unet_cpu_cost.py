"""Training-step cost of the image U-Net on MNIST-shaped batches (1 x 28 x 28, the quarter level included),
for the settings that decide how fast a CPU trains it: channels, memory format (the scripts' channels-last
against PyTorch's default), batch size, threads, and the flow-matching step against iMF's. Variants are timed
in alternating blocks in one process after an untimed warm-up block each, so that all see the same machine
state; the data are random images (no download). From the repository root:

    python benchmarks/unet_cpu_cost.py                  # 3 rounds of 20 steps per variant, a few minutes
    python benchmarks/unet_cpu_cost.py --steps 5 --repeats 1

It imports fm.py and imf.py (the scripts themselves import nothing from each other)."""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fm  # noqa: E402
import imf  # noqa: E402

# name: (loss, channels, batch size, channels_last, threads); the scripts' U-Net is channels-last
VARIANTS = {
    "fm, 16 ch, batch 64": ("fm", 16, 64, True, 2),
    "fm, 16 ch, batch 64, contiguous (NCHW)": ("fm", 16, 64, False, 2),
    "fm, 8 ch, batch 64": ("fm", 8, 64, True, 2),
    "fm, 32 ch, batch 64": ("fm", 32, 64, True, 2),
    "fm, 16 ch, batch 32": ("fm", 16, 32, True, 2),
    "fm, 16 ch, batch 128": ("fm", 16, 128, True, 2),
    "fm, 16 ch, batch 64, 1 thread": ("fm", 16, 64, True, 1),
    "iMF, 16 ch, batch 64": ("imf", 16, 64, True, 2),
    "iMF, 16 ch, batch 64, contiguous (NCHW)": ("imf", 16, 64, False, 2),
}


def make(loss, channels, channels_last):
    torch.manual_seed(0)
    if loss == "fm":
        model, fn = fm.SmallUNet((1, 28, 28), 1, channels), fm.fm_loss
    else:
        model, fn = imf.SmallUNet((1, 28, 28), 2, channels), imf.imf_loss
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return model, fn, torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)


def block(model, fn, opt, batch, channels_last, threads, steps):
    """Milliseconds per Adam step over `steps` steps."""
    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.rand(batch, 1, 28, 28) * 2 - 1).contiguous(memory_format=fmt)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = fn(model, x, torch.randn_like(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks of each variant")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats) <= 0:
        p.error("--steps and --repeats must be positive")
    threads = torch.get_num_threads()
    built = {name: make(v[0], v[1], v[3]) for name, v in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    for name, (loss, ch, batch, last, n_threads) in VARIANTS.items():       # warm-up, untimed
        block(*built[name], batch, last, min(n_threads, threads), 2)
    for _ in range(args.repeats):
        for name, (loss, ch, batch, last, n_threads) in VARIANTS.items():
            times[name].append(block(*built[name], batch, last, min(n_threads, threads), args.steps))
    torch.set_num_threads(threads)
    rows = ["| variant | ms per step | ms per image |", "|---|---|---|"]
    for name, (loss, ch, batch, last, n_threads) in VARIANTS.items():
        ms = float(np.median(times[name]))
        rows.append(f"| {name} | {ms:.1f} | {ms / batch:.2f} |")
    print("\n".join(rows))
    return {name: float(np.median(v)) for name, v in times.items()}


if __name__ == "__main__":
    main()
