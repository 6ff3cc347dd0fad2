#!/bin/bash
# One device call: GPU checks and the edit benchmark at real shapes (random weights).
# Needs, carried beside the tree: .whl (omegaconf, antlr4 wheels), .devcarry/smollm2_tokenizer, and
# .devcarry/counterfact_dev_head.json (the first 50 dev records, the facts edited: ../shared does not travel) and
# .devcarry/counterfact_train_head.json (the first 100 records of counterfact-train.json, MEMIT's batch), made by
#   python -c "import json; json.dump(json.load(open('../shared/data/counterfact/counterfact_original_format.json'))[:50], open('.devcarry/counterfact_dev_head.json', 'w'))"
#   python -c "import json; json.dump(json.load(open('../shared/data/counterfact/counterfact-train.json'))[:100], open('.devcarry/counterfact_train_head.json', 'w'))"
# and deleted after the call.
# SHAPES="" skips the edit benchmark, GPU_TESTS=0 the GPU tests, MEMIT_SHAPES="" the MEMIT batch benchmark.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 FACTEDIT_CACHE=/tmp/factedit-cache
tok=$FACTEDIT_CACHE/models/smollm2_135m-carried
mkdir -p $tok && cp .devcarry/smollm2_tokenizer/* $tok/ && echo '{}' > $tok/factedit.json
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
[ "${GPU_TESTS:-1}" = 1 ] && timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_rome.py tests/test_memit.py -k "cuda_graph or gpu or bf16 or kept" 2>&1 | tail -25 | tee $OUT/pytest.log
for shape in ${SHAPES-gpt2-xl llama-7b gpt-j}; do
  echo "=== $shape"
  timeout ${SHAPE_TIMEOUT:-240} python3 benchmarks/bench_edit.py --shape $shape --records ${EDITS:-12} --data .devcarry/counterfact_dev_head.json \
    --baseline-facts ${BASELINE_EDITS:-3} 2>&1 | grep -v "Loading weights" | tee $OUT/bench_edit_$shape.log | tail -9
done
for shape in ${EVAL_SHAPES:-}; do  # CounterFact evaluation records/s (bench_eval.py), data carried in .devcarry
  echo "=== eval $shape"
  timeout ${EVAL_TIMEOUT:-300} python3 benchmarks/bench_eval.py --shape $shape --rome --records ${RECORDS:-10} \
    --data .devcarry/counterfact_dev_head.json 2>&1 | grep -v "Loading weights\|LeafSpec" | tee $OUT/bench_eval_$shape.log | tail -9
done
for shape in ${MEMIT_SHAPES-gpt2-xl}; do  # a MEMIT batch (bench_memit.py) against single ROME fits
  echo "=== memit $shape"
  timeout ${MEMIT_TIMEOUT:-240} python3 benchmarks/bench_memit.py --shape $shape --facts ${MEMIT_FACTS:-100} \
    --data .devcarry/counterfact_train_head.json --baseline-facts ${MEMIT_BASELINE:-10} 2>&1 \
    | grep -v "Loading weights\|GPU available\|TPU available\|Tip:\|max_epochs" | tee $OUT/bench_memit_$shape.log | tail -9
done
