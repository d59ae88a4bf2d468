#!/usr/bin/env bash
# The GPU benchmark (docs/performance.md, "On a GPU"): lmpo vs TRL GRPO on SmolLM2-135M's architecture and on
# a ~0.5 B Qwen2-style config, random weights, bf16 autocast on both sides. Run from a folder holding lmpo/,
# bench/, examples/smollm2_math/, base/ (SmolLM2's config + tokenizer, no weights: `lmpo fetch-model smollm2`
# then copy config.json, generation_config.json and the tokenizer files) and whl/ (trl, datasets and their
# missing dependencies as wheels, for a machine without a package index). Results go to $OUT (default ./gpu_out).
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
SIZES=${SIZES:-smollm2-random qwen05b-random}
if ls whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
for size in $SIZES; do
  timeout ${PER_SIZE_S:-240} python3 ${BENCH:-bench/vs_trl.py} --sizes $size --dtype bfloat16 --warmup 1 --threads 4 --base base \
    --root /tmp/bench_gpu ${EXTRA:-} 2>&1 | tee "$OUT/$size.txt"
done
cd /tmp/bench_gpu && tar czf "$OUT/runs.tgz" --exclude='*/final' --exclude='models' --exclude='*/checkpoint' . 2>/dev/null
ls -la "$OUT"
