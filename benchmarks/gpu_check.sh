#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine (a rented box, or the lent one of docs/benchmarks.md):
# the machine, tests/test_on_cuda.py, then `python bench.py --gpu --json`. Each result is written under the
# folder $OUT (default: gpu_check) as it is produced, so a run cut short keeps what it measured.
#
#     bash benchmarks/gpu_check.sh      # from the project's root; 9 minutes at most
#
# TEST_SECONDS and BENCH_SECONDS bound the two parts (default 150 and 390 s); PYTHON names the interpreter.
set -uo pipefail
out=${OUT:-gpu_check}
python=${PYTHON:-python}
mkdir -p "$out"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  nproc
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

timeout "${TEST_SECONDS:-150}" "$python" -m pytest -q -p no:cacheprovider tests/test_on_cuda.py \
  > "$out/test_on_cuda.txt" 2>&1
echo "exit status $?" >> "$out/test_on_cuda.txt"
tail -n 3 "$out/test_on_cuda.txt"

timeout "${BENCH_SECONDS:-390}" "$python" bench.py --gpu --json "$out/bench.json" > "$out/bench.txt" 2>&1
echo "exit status $?" >> "$out/bench.txt"
cat "$out/bench.txt"
