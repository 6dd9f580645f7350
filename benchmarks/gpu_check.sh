#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run (under 8 minutes on one H100/H200):
#   benchmarks/gpu_check.sh OUT_DIR
# With the device tool: run(command="bash benchmarks/gpu_check.sh $OUT", timeout_s=540).
# Uses the machine's own python3 and torch (CUDA build); memfit from this checkout's src/.
# Writes env.txt, cuda-tests.txt, gpt-cuda.md and llama-cuda.md (benchmarks on the GPU: rows
# none, HF-style full recompute, all inputs offloaded, memfit without and with offload).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 KINETO_LOG_LEVEL=6
python3 -c "import torch, transformers, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); print('transformers', transformers.__version__)" > "$out/env.txt" 2>&1
nvidia-smi >> "$out/env.txt" 2>&1
# the CUDA-marked tests: meter against the allocator, plans predicted against
# max_memory_allocated, rebuild under cuBLAS, SDPA flash / memory-efficient with dropout,
# offload (bit-identical, predicted, nothing left after the step, no copy/free race)
timeout 170 python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests > "$out/cuda-tests.txt" 2>&1
echo "pytest exit $?" >> "$out/cuda-tests.txt"
# memfit against the baselines on the GPU, paired timing
rows=none,all,all+offload,optimal-no-offload,optimal
timeout 150 python3 benchmarks/bench_gpt.py --device cuda --layers 12 --width 1024 --seq 1024 --batch 8 --budgets 20%,50%,70% --strategies $rows --repeats 5 --out "$out/gpt-cuda.md" > "$out/gpt-cuda.log" 2>&1
echo "bench exit $?" >> "$out/gpt-cuda.log"
timeout 150 python3 benchmarks/bench_gpt.py --device cuda --hf llama --layers 8 --width 1024 --seq 1024 --vocab 32000 --batch 4 --budgets 20%,50%,70% --strategies $rows --repeats 5 --out "$out/llama-cuda.md" > "$out/llama-cuda.log" 2>&1
echo "bench exit $?" >> "$out/llama-cuda.log"
