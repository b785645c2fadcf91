"""Training steps with glibc's default malloc vs the project's settings (malloc_tuning.py), in one run.

    python experiments/benchmarks/glibc_malloc.py [--repeats 5 --steps 10] [--model cnn_snn]

Each measurement is a fresh process (mallopt cannot be undone in one), alternating default / tuned, that builds
the encoder of `model=<--model>` and times --steps training steps (forward + squared-norm loss + backward + AdamW)
of a pair batch of random uint8 images after 3 untimed ones. Printed per repeat and as medians: images/s, minor
page faults per step and kernel (system) CPU seconds per step, and the ratio tuned / default images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys, time, torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from siamese_retrieval.malloc_tuning import tune_malloc
applied = tune_malloc()
steps, model_name, conf = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with initialize_config_dir(conf, version_base="1.3"):
    cfg = compose("train", overrides=[f"model={model_name}"])
torch.manual_seed(0)
enc = instantiate(cfg.model.module.encoder).train()
opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
x = torch.randint(0, 256, (2 * cfg.model.batch_size, 3, cfg.model.inputs.height, cfg.model.inputs.width),
                  dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
def step():
    opt.zero_grad(set_to_none=True)
    enc({"image": x}).pow(2).sum().backward()
    opt.step()
for _ in range(3):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"applied": applied, "img_s": steps * len(x) / (t1 - t0),
                  "faults": (r1.ru_minflt - r0.ru_minflt) / steps, "sys_s": (r1.ru_stime - r0.ru_stime) / steps}))
"""


def measure(tuned: bool, args: argparse.Namespace) -> dict:
    env = dict(os.environ, SIAMESE_RETRIEVAL_MALLOC="tuned" if tuned else "default")
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), args.model, str(ROOT / "conf")],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn_snn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for r in range(args.repeats):
        for name in (("default", "tuned") if r % 2 == 0 else ("tuned", "default")):
            runs[name].append(measure(name == "tuned", args))
        print(f"repeat {r}: " + "  ".join(
            f"{n} {runs[n][-1]['img_s']:.0f} img/s, {runs[n][-1]['faults']:.0f} faults/step, "
            f"{runs[n][-1]['sys_s']:.3f} s sys/step" for n in ("default", "tuned")))
    assert all(m["applied"] for m in runs["tuned"]) and not any(m["applied"] for m in runs["default"])
    med = {n: {k: statistics.median(m[k] for m in v) for k in ("img_s", "faults", "sys_s")} for n, v in runs.items()}
    for n in ("default", "tuned"):
        print(f"{n}: {med[n]['img_s']:.0f} img/s, {med[n]['faults']:.0f} minor faults/step, "
              f"{med[n]['sys_s']:.3f} s system time/step (medians of {args.repeats})")
    print(f"ratio tuned / default images/s: {med['tuned']['img_s'] / med['default']['img_s']:.2f}; page faults "
          f"{med['default']['faults'] / max(med['tuned']['faults'], 1):.1f}x fewer")


if __name__ == "__main__":
    main()
