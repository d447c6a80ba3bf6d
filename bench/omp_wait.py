"""Two torch processes on the same cores: libgomp's wait policy (why `make test` sets
``OMP_WAIT_POLICY=PASSIVE`` for its two pytest-xdist workers).

One training step of the compact MONAI DenseNet (``densenet-small``, 2D, 128 px, batch 16,
fused AdamW, 2 torch threads), timed in a fresh process (the policy is read when libgomp
loads), in the same run:
  * alone, under libgomp's default policy (the baseline) and under ``PASSIVE``;
  * two such processes at once, under each policy (seconds per step, each process);
  * beside a single-threaded pure-Python loop (what an ingest or a Streamlit server does), under
    each policy.

By default libgomp's idle threads spin for a while before they sleep, which is fastest when
a process has the cores to itself and costly when another process needs them.

Usage: ``python bench/omp_wait.py [--steps 20] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = """
import sys, time, torch
from workbench.model.nets import create_network
torch.set_num_threads(2)
torch.manual_seed(0)
m = create_network(2, 2, architecture="densenet-small").to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), 1e-3, fused=True)
x = torch.rand(16, 1, 128, 128).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 2, (16,))
n = int(sys.argv[1])
for k in range(n + 2):
    if k == 2:
        t = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
print((time.perf_counter() - t) / n)
"""
BUSY = "import time\nt = time.time()\nwhile time.time() - t < {s}: pass\n"


def _env(policy: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(ROOT)
    return env


def _steps(policy: str | None, steps: int, copies: int, beside_python: bool) -> list[float]:
    """Seconds per step of each of ``copies`` processes started together."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STEP, str(steps)],
            env=_env(policy),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(copies)
    ]
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(s=120)]) if beside_python else None
    try:
        return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="each case; the best is kept")
    args = ap.parse_args()
    import torch

    cases = [
        ("alone", 1, False),
        ("two at once", 2, False),
        ("beside a Python loop", 1, True),
    ]
    rows: dict[str, dict[str, float]] = {}
    for policy in (None, "PASSIVE"):
        name = policy or "default"
        for case, copies, beside in cases:
            runs = [_steps(policy, args.steps, copies, beside) for _ in range(args.repeats)]
            rows.setdefault(case, {})[name] = min(max(r) for r in runs)  # slowest copy, best run
    base = rows["alone"]["default"]
    print(
        f"omp_wait, {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
        f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs; "
        "seconds per step (slowest process), ratio to the default policy alone"
    )
    print("| case | default | PASSIVE |\n|---|---|---|")
    for case, by in rows.items():
        cells = " | ".join(f"{by[p]:.3f} s ({by[p] / base:.2f}x)" for p in ("default", "PASSIVE"))
        print(f"| {case} | {cells} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
