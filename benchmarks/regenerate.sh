#!/usr/bin/env bash
# Regenerate every committed table and figure, e.g. after a default changed:
#
#     setsid nohup benchmarks/regenerate.sh > /tmp/regenerate.log 2>&1 &
#
# Two lanes of benchmarks run side by side (the tables' machine: two processes, one thread
# each); the zoo models a table needs are trained by it when the store lacks them or holds
# another recipe. Each finished step is committed at once (`git commit -- benchmarks/results`,
# one lane at a time), so a stop loses at most the step under way; rows are cached, so a
# rerun resumes. `zoo.md` is then written from the cards of the models the tables used, and
# the latency and clone-cost tables run alone: they time things. The seeds 3-5 runs of the
# three tables whose "Avg >= Continual+KD" goal is closest (`more_seeds/`) feed `paired_seeds.md`.
# About 8 h on a 2-core CPU when every zoo model and row is new: estimated from the committed
# rows' wall times (Tables 1-2: 12 h of rows; the seeds 3-5 runs: 2.2 h), over two lanes. The
# first full run took 3 h (2026-11-26), before PNC rows also built and tuned every finalist
# for the selection regret.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1  # logs show each row as it ends
PNC=.venv/bin/pnc
PY=.venv/bin/python
LOGS=benchmarks/results/logs
mkdir -p "$LOGS"

step() {  # step NAME COMMAND...: run, log, commit the results it wrote
    local name=$1
    shift
    echo "$(date -u +%FT%TZ) start $name"
    if "$@" > "$LOGS/$name.log" 2>&1; then
        flock .git/regenerate.lock git add benchmarks/results
        flock .git/regenerate.lock git commit -q -m "bench: $name regenerated ($*)" -- benchmarks/results
        echo "$(date -u +%FT%TZ) done $name"
    else
        echo "$(date -u +%FT%TZ) FAILED $name (see $LOGS/$name.log)"
    fi
}

RUN="--seeds 0,1,2 --out benchmarks/results"
MORE=(--methods "Continual+KD,PNC" --seeds 3,4,5 --out benchmarks/results/more_seeds)
ALL="Pre-trained,Direct Ensemble,Calibrated Ensemble,Joint+Full,Continual+KD,Continual,PNC"

lane1() {
    step table1-lenet5 $PNC bench paper --arch lenet5 --scales S,M $RUN
    step table1-lenet5-old0 $PNC bench paper --arch lenet5 --scales S,M --old-fraction 0 $RUN
    step table1-resnetc20 $PNC bench paper --arch resnetc20 --scales S,M --methods "$ALL" $RUN
    step table3-lenet5 $PNC bench incremental --arch lenet5 $RUN
    step table3-lenet5-old0 $PNC bench incremental --arch lenet5 --old-fraction 0 $RUN
    step figures-lenet5 $PNC bench figures --arch lenet5 --out benchmarks/results
    step more-seeds-resnetc20 $PNC bench paper --arch resnetc20 --scales M "${MORE[@]}"
    step more-seeds-resnetc20-cnn4 $PNC bench hetero --pairs resnetc20-cnn4 "${MORE[@]}"
}

lane2() {
    step table2-resnetc20-cnn4-vit $PNC bench hetero --pairs resnetc20-cnn4,vit-lenet5,lenet5-vit $RUN
    step table2-resnet18-mobilenetv2 $PNC bench hetero --pairs resnet18-mobilenetv2 $RUN
    step table1-resnetc20-old0 $PNC bench paper --arch resnetc20 --scales S,M --old-fraction 0 --methods "$ALL" $RUN
    step figures-resnetc20 $PNC bench figures --arch resnetc20 --seeds 0 --figures 3 --out benchmarks/results
    step more-seeds-lenet5 $PNC bench paper --arch lenet5 --scales M "${MORE[@]}"
}

lane1 &
lane2 &
wait
step zoo $PY benchmarks/zoo_defaults.py --from-store
step goals $PY benchmarks/goals_summary.py
step paired-seeds $PY benchmarks/paired_seeds.py --extra more_seeds --tables table1-fashion-mnist-lenet5:M \
    table1-fashion-mnist-resnetc20:M table2-resnetc20-cnn4:S
step onnx-latency $PY -m pnc.bench.onnx_latency --work-dir /tmp/pnc-bench-onnx
step clone-cost $PY benchmarks/clone_cost.py
step clone-cost-joint $PY benchmarks/clone_cost.py --joint
step clone-memory $PY benchmarks/clone_memory.py --target fmnist32-mobilenetv2_050-target --source fmnist32-resnet18-source --scale S
step clone-memory-keep-freed $PY benchmarks/clone_memory.py --target fmnist32-mobilenetv2_050-target --source fmnist32-resnet18-source --scale S --keep-freed
echo "$(date -u +%FT%TZ) all steps ended"
