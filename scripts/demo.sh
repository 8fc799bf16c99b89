#!/usr/bin/env bash
# The toy pipeline end to end on CPU: teacher -> AYF-EMD flow map -> 1/2/4/8-step samples,
# a figure and a metrics table. Called by `make demo`; outputs go to $DEMO (default demo_out).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-demo_out}
AYF=${AYF:-.venv/bin/ayf}   # the container sets AYF=ayf and PY=python (docker/compose.yaml)
PY=${PY:-.venv/bin/python}
if [ -e "$DEMO/metrics.md" ]; then
  echo "$DEMO already holds a finished demo; move it away or run: make demo DEMO=another_folder" >&2
  exit 1
fi
mkdir -p "$DEMO"
common=(--trainer.default_root_dir "$DEMO" --trainer.logger.init_args.save_dir "$DEMO")

echo "== 1/4 teacher: flow matching on the toy mixture"
$AYF fit --config configs/toy/teacher.yaml "${common[@]}" --trainer.max_steps 3000
teacher=$(ls -t "$DEMO"/teacher/version_*/checkpoints/last.ckpt | head -n1)

echo "== 2/4 student: AYF-EMD distillation of $teacher"
$AYF fit --config configs/toy/distill_emd.yaml "${common[@]}" --trainer.max_steps 2500 \
  --model.teacher ayf.checkpoints.CheckpointTeacher --model.teacher.ckpt_path "$teacher"
student=$(ls -t "$DEMO"/distill_emd/version_*/checkpoints/last.ckpt | head -n1)

echo "== 3/4 sampling 1, 2, 4, 8 steps from the same noise"
$PY -c "import numpy as np; np.save('$DEMO/noise.npy', np.random.default_rng(0).standard_normal((4000, 2)).astype('float32'))"
pairs=()
for n in 1 2 4 8; do
  $AYF sample --ckpt_path "$student" --steps $n --noise "$DEMO/noise.npy" --output "$DEMO/samples_${n}step.npy" --overwrite
  pairs+=("flow map ${n}-step=$DEMO/samples_${n}step.npy")
done
$AYF sample --ckpt_path "$teacher" --solver euler --steps 64 --noise "$DEMO/noise.npy" --output "$DEMO/teacher_euler64.npy" --overwrite
pairs+=("teacher Euler 64=$DEMO/teacher_euler64.npy")

echo "== 4/4 metrics against the exact mixture"
$AYF toy --noise "$DEMO/noise.npy" --out "$DEMO" --samples "${pairs[@]}"
echo "TensorBoard: .venv/bin/tensorboard --logdir $DEMO"
