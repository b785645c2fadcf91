#!/usr/bin/env bash
# The GPU recipe on a bare GPU machine (one H200 here), as measured for the README:
#   bash experiments/beat_verification/gpu_run.sh OUT_DIR [SEEDS]
# Installs wheels from .whl/ when present (a machine without pip access: docs/scale.md, "On a GPU"),
# renders the two cities on every core, then trains, side by side on the one GPU, the default cnn_snn with
# trainer=gpu (seed 0) and experiment=gpu_recipe for each seed, then backbone_snn (ResNet-50 + MixVPR) on the
# city exported in GSV-Cities' layout: its training images/s and its recall on the city. Each run leaves OUT_DIR/<name>.tgz (its
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
root = ensure_city("data_cache", city); ensure_city("data_cache", views_config(views, city))
open("/tmp/city_root", "w").write(str(root))
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
  [ -f "$dir/benchmarks.csv" ] && cp "$dir/benchmarks.csv" "$out/$name-benchmarks.csv"
}
# image caches first, one process each size (side-by-side runs would all decode the same images)
python3 train.py trainer=gpu logger=csv model=cnn_snn trainer.max_epochs=0 > /tmp/cache96.log 2>&1 &
python3 train.py experiment=gpu_recipe logger=csv trainer.max_epochs=0 > /tmp/cache192.log 2>&1 &
wait; echo "image caches ready at $((SECONDS - start)) s" | tee -a "$out/summary.txt"
run default_s0 model=cnn_snn seed=0 &
for s in $seeds; do run gpu_recipe_s$s experiment=gpu_recipe seed=$s & done
wait
# backbone_snn: ResNet-50 + MixVPR trained on the default city written in GSV-Cities' layout, tested on the city
# itself (benchmarks=[...]); WEIGHTS=resnet50.pth (README, "Bring your own") starts it from ImageNet, else random.
city=$(cat /tmp/city_root)
python3 -m siamese_retrieval.data.convert --layout contract --root "$city" --to gsv_cities --out /tmp/gsv-city \
  > /tmp/convert.log 2>&1 || tail -2 /tmp/convert.log
backbone=(model=backbone_snn model.backbone=resnet50 model.module.encoder.aggregation.name=mixvpr data=gsv_cities
          data.root=/tmp/gsv-city ${WEIGHTS:+model.weights=$WEIGHTS})
python3 experiments/benchmarks/train_throughput.py --device cuda --steps 100 --warmup 10 --repeats 3 \
  $(printf -- "--override %s " "${backbone[@]}") 2>&1 | grep -E "images/s|ratio" | tee -a "$out/summary.txt"
run backbone_mixvpr_s0 "${backbone[@]}" "benchmarks=[msls_city:$city]" seed=0
echo "all done at $((SECONDS - start)) s" | tee -a "$out/summary.txt"
