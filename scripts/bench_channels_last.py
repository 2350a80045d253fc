"""How much faster convolutions train in channels-last layout (`trainer.channels_last`, on by default).

One training step (forward, cross-entropy, backward, SGD with momentum) of each model on a batch of
Fashion-MNIST-shaped inputs, timed in torch's default layout and in channels-last, interleaved in
rounds so that the machine's drift hits both alike; the table gives the median time per step and
the ratio. The models are the ones `scripts/bench_distill.py` trains (its teacher and its two
students) and the shipped defaults (`cnn`, `cnn_small`, `resnet`).

    python scripts/bench_channels_last.py              # one torch thread, batch 128
    python scripts/bench_channels_last.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from kdpipe.models import cnn, resnet

MODELS = {
    "bench teacher (cnn w32 d4)": lambda: cnn((1, 28, 28), 10, width=32, depth=4),
    "bench student 1/10 (cnn w10 d4)": lambda: cnn((1, 28, 28), 10, width=10, depth=4),
    "bench student 1/50 (cnn w9 d3)": lambda: cnn((1, 28, 28), 10, width=9, depth=3),
    "cnn (default teacher)": lambda: cnn((1, 28, 28), 10),
    "cnn_small (default student)": lambda: cnn((1, 28, 28), 10, width=8, depth=2),
    "resnet": lambda: resnet((1, 28, 28), 10),
}


def step_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median milliseconds of one SGD step over `steps` steps, after two warm-up steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per layout and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"median of {args.rounds} x {args.steps} steps\n")
    print("| model | default ms/step | channels-last ms/step | speed-up |")
    print("|---|---|---|---|")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        base = build()
        cl = build()
        cl.load_state_dict(base.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        with torch.no_grad():  # the two layouts compute the same function
            assert torch.allclose(base.eval()(x), cl.eval()(x), atol=1e-4), name
        times = {"nchw": [], "cl": []}
        for _ in range(args.rounds):
            for layout in times:
                torch.manual_seed(0)
                model = build()
                if layout == "cl":
                    model = model.to(memory_format=torch.channels_last)
                times[layout].append(step_ms(model.train(), x, y, args.steps))
        a, b = statistics.median(times["nchw"]), statistics.median(times["cl"])
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
