export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p $OUT/t $OUT/f $OUT/l
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -p no:cacheprovider -m gpu -n 6 -v tests > $OUT/t/gpu_tests.log 2>&1; echo "tests rc=$?"
grep -cE "PASSED" $OUT/t/gpu_tests.log; grep -E "FAILED|ERROR" $OUT/t/gpu_tests.log | head -20; tail -2 $OUT/t/gpu_tests.log
unset XLA_PYTHON_CLIENT_PREALLOCATE
timeout 160 python3 -m benchmarks.bench_fusions --configs gelu gelu+qk_producer --iters 10 --warmup 2 --out $OUT/f > $OUT/f/log.txt 2>&1; echo "fusions rc=$?"
grep -v "Warning\|it/s" $OUT/f/log.txt | grep -E "ms|error|Error" | tail -8
timeout 175 python3 -m benchmarks.bench_lora --variants none r32 --budget-s 165 --timeout 170 --out $OUT/l > $OUT/l/log.txt 2>&1; echo "lora rc=$?"
grep -v "Warning\|it/s" $OUT/l/log.txt | tail -8
