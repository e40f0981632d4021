"""Per-step training cost of iMF against plain flow matching on the same network, batch and data, timed
alternately in one process so that both see the same machine state. From the repository root:

    python benchmarks/imf_step_cost.py                   # moons, batch 512, 5 x 100 steps of each
    python benchmarks/imf_step_cost.py --data digits --batch-size 128 --steps 50

It imports imf.py (the scripts themselves import nothing from each other)."""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imf  # noqa: E402


def fm_loss(model, x, e, labels=None):
    """Flow matching on the boundary u(z, t, t): the cost of a plain velocity-regression step."""
    t = torch.rand(len(x), device=x.device)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    z = (1 - tb) * x + tb * e
    return ((model(z, t, t) - (e - x)) ** 2).mean()


def step_cost(model, batches, steps, repeats):
    """Median milliseconds per Adam step of each loss over `repeats` alternating blocks of `steps` steps."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    losses = {"flow matching": fm_loss, "iMF": imf.imf_loss}
    times = {k: [] for k in losses}
    for _ in range(repeats):
        for name, fn in losses.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = fn(model, *next(batches))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            loss.item()                                     # waits for the device
            times[name].append((time.perf_counter() - t0) / steps * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks of each loss")
    p.add_argument("--data", default="moons", choices=imf.TOYS + ["digits", "mnist"], help="dataset")
    p.add_argument("--data-dir", default="data", help="where MNIST is stored")
    p.add_argument("--batch-size", type=int, default=512, help="batch size")
    p.add_argument("--channels", type=int, default=16, help="U-Net channels (images)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.batch_size, args.channels) <= 0:
        p.error("--steps, --repeats, --batch-size and --channels must be positive")
    try:
        device = torch.device(imf.get_args(["--device", args.device]).device)   # "auto": the one there is
        torch.manual_seed(0)
        data = imf.Data(args.data, args.data_dir, 0, device, 2)
    except imf.RunError as err:
        sys.exit(f"error: {err}")
    if data.shape == (2,):                                  # the network imf.py trains on this data
        model = imf.ResMLP(2).to(device)
    else:
        model = imf.SmallUNet(data.shape, 2, args.channels).to(device, memory_format=torch.channels_last)
    ms = step_cost(model, data.batches(args.batch_size), args.steps, args.repeats)
    print(f"ms per step on {device} (median of {args.repeats} x {args.steps}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()) + f"; iMF / flow matching = "
          f"{ms['iMF'] / ms['flow matching']:.2f}")
    return ms


if __name__ == "__main__":
    main()
