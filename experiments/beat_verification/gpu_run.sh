#!/usr/bin/env bash
# The GPU recipe on a bare GPU machine (one H200 here), as measured for the README:
#   bash experiments/beat_verification/gpu_run.sh OUT_DIR [SEEDS]
# Installs wheels from .whl/ when present (a machine without pip access: see the README's "On a GPU"),
# renders the two cities on every core, then trains, side by side on the one GPU, the default cnn_snn with
# trainer=gpu (seed 0) and experiment=gpu_recipe for each seed. Each run leaves OUT_DIR/<name>.tgz (its
# metrics.json, best checkpoint and log) as soon as it ends, and a line in OUT_DIR/summary.txt.
set -u
out=${1:?OUT_DIR}; seeds=${2:-"0 1 2"}; start=$SECONDS
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 WANDB_MODE=offline OMP_NUM_THREADS=3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/summary.txt"
python3 - <<'PY' 2>&1 | tail -2 | tee -a "$out/summary.txt"
import time; t = time.perf_counter()
from omegaconf import OmegaConf
from siamese_retrieval.data.synth import SynthConfig, ensure_city
from siamese_retrieval.data.train_views import views_config
views = OmegaConf.to_container(OmegaConf.load("conf/model/cnn_snn.yaml").train_views)
city = SynthConfig.from_preset("default")
ensure_city("data_cache", city); ensure_city("data_cache", views_config(views, city))
print(f"rendered both cities in {time.perf_counter() - t:.1f} s")
PY
run() {  # NAME OVERRIDES...: one training run; its results packed as soon as it ends
  local name=$1; shift
  local t0=$SECONDS
  python3 train.py trainer=gpu logger=csv "$@" > "/tmp/$name.log" 2>&1
  local rc=$? dir
  dir=$(grep -o "outputs/train/runs/[0-9-]*/[0-9-]*" "/tmp/$name.log" | head -1)
  echo "$name rc=$rc wall_s=$((SECONDS - t0)) dir=$dir" | tee -a "$out/summary.txt"
  cp "/tmp/$name.log" "$dir/" 2>/dev/null
  [ -n "$dir" ] && tar czf "$out/$name.tgz" -C "$dir" metrics.json checkpoints "$name.log" --exclude last.ckpt 2>/dev/null
}
# image caches first, one process each size (side-by-side runs would all decode the same images)
python3 train.py trainer=gpu logger=csv model=cnn_snn trainer.max_epochs=0 > /tmp/cache96.log 2>&1 &
python3 train.py experiment=gpu_recipe logger=csv trainer.max_epochs=0 > /tmp/cache192.log 2>&1 &
wait; echo "image caches ready at $((SECONDS - start)) s" | tee -a "$out/summary.txt"
run default_s0 model=cnn_snn seed=0 &
for s in $seeds; do run gpu_recipe_s$s experiment=gpu_recipe seed=$s & done
wait
echo "all done at $((SECONDS - start)) s" | tee -a "$out/summary.txt"
