"""keypoint_set embedding without gradients: whole batches of data.eval_batch_size vs chunks of inference_chunk.

    python experiments/benchmarks/inference_chunk.py [--sets 3450 --batch 1024 --chunk 128 --repeats 5]

What it measures is what a `keypoint_set` run does before every epoch (embedding its ~3,450 place anchors for
look-alike packing, in batches of data.eval_batch_size = 1024) and at every validation and test: the default
encoder (random weights, eval mode, `torch.no_grad`) embeds `--sets` random 512-keypoint sets in batches of
`--batch`, either in one pass per batch (`inference_chunk: null`) or in chunks of `--chunk` sets. Each measurement
is a fresh process with the project's malloc settings (malloc_tuning.py), as train.py runs, alternating the two:
wall time, minor page faults and kernel time; medians and the ratio whole / chunked of the same run. Both give the
same embeddings (tests/test_keypoint_set.py; the script checks it too).
"""

from __future__ import annotations

import argparse
import json
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
tune_malloc()
sets, batch, chunk, conf = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
with initialize_config_dir(conf, version_base="1.3"):
    cfg = compose("train", overrides=["model=keypoint_set", f"model.module.encoder.inference_chunk={chunk}"])
torch.manual_seed(0)
enc = instantiate(cfg.model.module.encoder).eval()
n = int(cfg.model.inputs.n_keypoints)
g = torch.Generator().manual_seed(0)
data = {"desc": torch.randint(0, 256, (sets, n, 32), dtype=torch.uint8, generator=g),
        "feat": torch.rand(sets, n, 7, generator=g), "mask": torch.rand(sets, n, generator=g) < 0.95}
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
with torch.no_grad():
    emb = torch.cat([enc({k: v[s : s + batch] for k, v in data.items()}) for s in range(0, sets, batch)])
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"s": t1 - t0, "faults": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime,
                  "checksum": float(emb.double().sum()), "first": emb[0, :4].tolist()}))
"""


def measure(chunk: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.sets), str(args.batch), chunk, str(ROOT / "conf")],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=3450, help="sets embedded (the default city's place anchors)")
    ap.add_argument("--batch", type=int, default=1024, help="sets per encoder call (data.eval_batch_size)")
    ap.add_argument("--chunk", type=int, default=128, help="model.module.encoder.inference_chunk")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    settings = {"whole": "null", "chunked": str(args.chunk)}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for r in range(args.repeats):
        for name in (("whole", "chunked") if r % 2 == 0 else ("chunked", "whole")):
            runs[name].append(measure(settings[name], args))
        print(f"repeat {r}: " + "  ".join(f"{n} {runs[n][-1]['s']:.2f} s, {runs[n][-1]['faults']} faults, "
                                          f"{runs[n][-1]['sys_s']:.2f} s sys" for n in settings), flush=True)
    whole, chunked = runs["whole"][0], runs["chunked"][0]
    same = abs(whole["checksum"] - chunked["checksum"]) < 1e-3 and all(
        abs(a - b) < 1e-5 for a, b in zip(whole["first"], chunked["first"]))
    med = {n: {k: statistics.median(m[k] for m in v) for k in ("s", "faults", "sys_s")} for n, v in runs.items()}
    for n in settings:
        print(f"{n} (inference_chunk={settings[n]}): {med[n]['s']:.2f} s for {args.sets} sets in batches of "
              f"{args.batch}, {med[n]['faults']:.0f} minor faults, {med[n]['sys_s']:.2f} s system time "
              f"(medians of {args.repeats})")
    print(f"same embeddings: {same}; ratio whole / chunked time: {med['whole']['s'] / med['chunked']['s']:.2f}")


if __name__ == "__main__":
    main()
