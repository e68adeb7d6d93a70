#!/usr/bin/env bash
# GPU check (run on a CUDA machine from the repo root): prepare synthetic-fundus, train
# none/gaussian/laplace on --device cuda, then the training benchmark on cuda.
# Dependencies missing on the GPU image can be carried as wheels in .whl/ (see docs/benchmarks.md).
set -uo pipefail
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$REPO/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
W=$(mktemp -d) && cd "$W"
python3 -m dpcam prepare --n 6000 --workers 8 2>&1 | tail -1
python3 - <<'PY' 2>&1 | grep -v Warning | tee "$OUT/gpu_fit.txt"
from dpcam.config import TrainConfig
from dpcam.train.fit import fit
for scheme in ["none", "gaussian", "laplace"]:
    r = fit(TrainConfig(scheme=scheme, epsilon=5, device="cuda", epochs=3, clip=1.0 if scheme != "laplace" else 5.0), progress=False)
    m = r.metrics
    print(f"{scheme}: device={m['device']} test_acc={m['test_accuracy']:.3f} eps={m['epsilon']} sigma={m['noise_multiplier']} steps={m['steps']} secs={m['train_seconds']:.1f}")
PY
cd "$REPO"
python3 benchmarks/bench_train.py --device cuda --n ${BENCH_N:-4096} --models smallcnn resnet18 2>&1 | tee "$OUT/bench_train_cuda.md"
