#!/usr/bin/env bash
# The GPU checks on a lent GPU machine (one H100 or H200), as one prepared
# script: the benchmarks and the test suite (PARTS below), results and logs under
# $OUT. From the repository root:
#
#   bash benchmarks/gpu_run.sh
#
# The GPU image (python3 3.12 with JAX and PyTorch on CUDA 13, equinox, diffrax,
# optax, orbax, transformers, safetensors, huggingface-hub) has no diffusers, and
# nothing can be fetched there. Download its wheel, and importlib_metadata (the one
# requirement of diffusers the image lacks), here, into a git-ignored folder, and
# name that folder in the run's `carry`:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata torchdiffeq==0.2.5 \
#       pytest pluggy iniconfig hypothesis sortedcontainers attrs beartype
#
# (add transformers and safetensors wheels there too for other versions than the
# image's). WHEELS=folder overrides the folder, MODELS the bfloat16 run's models.
# PARTS picks what runs (comma-separated; all three take about 15 minutes, the
# whole of a session's device time, so pick):
#   models  benchmarks/large_models.py (about 9 minutes)
#   grid    benchmarks/instability_grid.py: paper 000's Fig. 3 workload, jaxflow and
#           PyTorch/torchdiffeq on the same GPU (issue 16; about 2 minutes)
#   suite   the test suite on the GPU (issue 16: TF32 and float32 identities),
#           stopped after 4 minutes with what ran so far
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WHEELS=${WHEELS:-.whl}
MODELS=${MODELS:-sd35-medium,flux-dev,sd35-large}
PY=${PY:-python3}
PARTS=${PARTS:-models,grid,suite}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# The carried wheels, beside the image's packages. `pip install -e . --no-deps`
# would need hatchling (the build backend), which the image lacks and cannot
# fetch: jaxflow runs from the source tree through PYTHONPATH instead.
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no wheels in $WHEELS/: diffusers must already be importable" >&2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi || true
    "$PY" -c "import jax, torch, diffusers, jaxflow; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, torch.cuda.get_device_name()); print('diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/environment.txt"
"$PY" -c "import diffusers, jaxflow.diffusers" || exit 1

if [[ ",$PARTS," == *",models,"* ]]; then
# bfloat16, both sizes, the three models: each (model, framework) one worker
# process (sizes ascending inside it); the budget bounds the whole run, and the
# JSON is rewritten after every worker, so a cut run keeps what it measured
"$PY" benchmarks/large_models.py --models "$MODELS" --sizes 512,1024 --dtypes bfloat16 \
    --repeats 3 --timeout 200 --budget 320 --out "$OUT/large_models.json" 2>&1 |
    tee "$OUT/large_models.log"

# the large-model study's cost per image (--study): SD3.5 Medium, bfloat16, 512^2
# and 1024^2, 4 Euler steps each way extrapolated linearly to 500 (a diffusers
# worker for the paper's route, then a jaxflow worker: port, 8 compiles, timings)
"$PY" benchmarks/large_models.py --study --models sd35-medium --sizes 512,1024 \
    --dtypes bfloat16 --study-steps 4 --repeats 2 --timeout 150 --budget 150 \
    --out "$OUT/large_models_study.json" 2>&1 | tee "$OUT/large_models_study.log"

# float32 (no TF32 on either side) at 512^2, SD3.5 Medium only
"$PY" benchmarks/large_models.py --models sd35-medium --sizes 512 --dtypes float32 \
    --repeats 3 --timeout 80 --budget 80 --out "$OUT/large_models_float32.json" 2>&1 |
    tee "$OUT/large_models_float32.log"
fi

if [[ ",$PARTS," == *",grid,"* ]]; then
    # jaxflow's routes on JAX's default device (the GPU), PyTorch's on cuda; scipy
    # on 20 points only (it is the CPU baseline, measured on the CPU machine)
    "$PY" benchmarks/instability_grid.py --scipy-points 20 --json "$OUT/instability_grid.json" \
        2>&1 | tee "$OUT/instability_grid.log"
    "$PY" benchmarks/instability_grid.py --dtype float32 --scipy-points 0 \
        --json "$OUT/instability_grid_float32.json" 2>&1 | tee "$OUT/instability_grid_float32.log"
fi

if [[ ",$PARTS," == *",suite,"* ]]; then
    # the whole suite on the GPU, one process (xdist would put every worker on the
    # one device), every failure listed (no -x); the junit file is written as far as
    # it got when the time runs out. Needs pytest, hypothesis and beartype wheels in
    # $WHEELS besides the image's packages.
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests \
        --junitxml="$OUT/suite.xml" 2>&1 | tee "$OUT/suite.log"
fi
