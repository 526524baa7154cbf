#!/usr/bin/env bash
# The measurements behind the open issues' figures of record, as named steps for a lent GPU.
#
#   COMMIT=$(git rev-parse HEAD) bash benchmarks/device_run.sh STEP [STEP ...]   (on the GPU machine)
#   bash benchmarks/device_run.sh --list          the steps and what each measures
#   bash benchmarks/device_run.sh --dry-run STEP  the commands, not run
#   bash benchmarks/device_run.sh --digest        the sources' digest (run here before a call)
#
# Why a script: a device call is limited to 10 minutes and a session to about 30, and the ignored
# folders that held each session's call scripts do not survive a machine reset. Steps run in the
# order given, each under its own time limit; a failing or timed-out step is recorded and the next
# one still runs, so one bad step does not cost the call. Each step writes `<step>.log` (and its
# JSON where the benchmark writes one) under $OUT (default ./out/device); `summary.txt` there has
# one line a step: name, exit status (124 = timed out), seconds. Expects the reference stack in
# .anchors/ (see ../shared/anchors/README.md) and WikiText-2 nowhere: every benchmark here uses
# random seeded weights.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/out/device}"
export OUT COMMIT="${COMMIT:-unknown}"
export PYTHONPATH="$PWD:$PWD/.anchors${PYTHONPATH:+:$PYTHONPATH}"

# name | seconds | what it measures | command (run by bash; $OUT and $COMMIT expand at run time)
STEPS=$(cat <<'EOF'
tests-4bit|300|the 4-bit dt_proj decode fold's kernel test on CUDA (never seen to pass there)|python -m pytest -q -x --tb=short -p no:cacheprovider tests/test_kernel_scan.py -k 4bit
tests-kernels|540|the kernel tests compiled for the GPU (no interpreter), over 12 processes (pytest-xdist is in the device image): one process took over 26 minutes for the 432 tests, most of it compiling (session 53); each result on its own line (-v), so a step cut by its time limit still names a failure (session 55 lost one's name)|python -m pytest -v --tb=short -p no:cacheprovider -n 12 tests/test_kernel_gather_int8.py tests/test_kernel_scan.py tests/test_kernel_conv1d.py tests/test_pdl.py tests/test_kernel_gemm.py tests/test_kernel_gemm_w4.py
prefill|540|issue 13: mamba-2.8b W8A8 prefill 1x128, 1x2048, 8x2048 against mamba_ssm, plain and graph, with kernel time by kind|python benchmarks/reference.py --models mamba-2.8b --recipes quamba --prefill 1x128 1x2048 8x2048 --decode-batches --no-hf-check --breakdown-models mamba-2.8b --breakdown-shapes 1x128 1x2048 --breakdown-decode-batches --commit "$COMMIT" --json "$OUT/prefill.json"
prefill-pdl|400|issue 13: the short prompt with the prefill's kernels launched with PDL (QUAMBA_FX_PREFILL_PDL=1), for an A/B with the prefill step|QUAMBA_FX_PREFILL_PDL=1 python benchmarks/reference.py --models mamba-2.8b --recipes quamba --prefill 1x128 1x2048 --decode-batches --no-hf-check --breakdown-models --commit "$COMMIT" --json "$OUT/prefill-pdl.json"
decode|540|issue 14: mamba-2.8b W8A8 decode tokens/s at batch 1, 16, 64 against mamba_ssm, kernel time at batch 16|python benchmarks/reference.py --models mamba-2.8b --recipes quamba --prefill --decode-batches 1 16 64 --no-hf-check --breakdown-models mamba-2.8b --breakdown-shapes --breakdown-decode-batches 16 --commit "$COMMIT" --json "$OUT/decode.json"
decode-w4|540|issue 16: mamba-2.8b W4A16 and W4A8 decode at batch 1, 16, 64 (round-to-nearest weights: GPTQ does not change the kernels)|python benchmarks/reference.py --models mamba-2.8b --recipes quamba2-w4a16 quamba2-w4a8 --rtn-weights --prefill --decode-batches 1 16 64 --no-hf-check --breakdown-models --commit "$COMMIT" --json "$OUT/decode-w4.json"
mamba2|540|issue 16: mamba2-2.7b W8A8 prefill 8x2048 and decode at batch 1, 64 against mamba_ssm's Mamba-2|python benchmarks/reference.py --models mamba2-2.7b --recipes quamba --prefill 8x2048 --decode-batches 1 64 --no-hf-check --breakdown-models mamba2-2.7b --breakdown-shapes 8x2048 --breakdown-decode-batches --commit "$COMMIT" --json "$OUT/mamba2.json"
rows-b16|450|issue 14: dt_proj inside the decode scan for blocks of 16 sequences (one int8 MMA a program; session 58: +1.3% at batch 16, +0.6% at 32, -3.3% at 64, so on up to 32) against dt_proj as its GEMM (DT_PROJ_ROWS_MAX_BATCH 64 or 0): its kernel tests on CUDA, then mamba-2.8b W8A8 decode at batch 16, 32 and 64 (where the two cross) with the kernel on 4 or 8 warps, two rounds, mamba_ssm alongside|python -m pytest -q --tb=short -p no:cacheprovider tests/test_kernel_scan.py -k "block_of_sequences or dt_proj_in_the_kernel or above_the_batch"; python benchmarks/decode_settings.py --model mamba-2.8b --batches 16 32 64 --rounds 2 --ref --set quamba_fx.kernels.scan.DT_PROJ_ROWS_MAX_BATCH=64,0 --set quamba_fx.kernels.scan.ROWS_WARPS=4,8 --commit "$COMMIT" --json "$OUT/rows-b16.json"
gemm-b16|420|issue 14: the decode GEMMs of mamba-2.8b at 16 and 32 rows launched as a step runs them, and every config of the few-row kernel there (session 30 swept them on an H200; on the H100 in session 58 out_proj took 6.99 us a block at batch 16 for 13.1 MB, about 65% of the copy rate, in_proj about 77%): whether out_proj has a faster config on this GPU|python benchmarks/decode_gemm.py --models 2.8b --m 16 32 --sweep-m 16 32 --commit "$COMMIT" --json "$OUT/gemm-b16.json"
timeline|420|issue 14: where W8A8 decode steps (mamba-2.8b, batch 1 and 16, graph replays) spend their time between kernels, ours and mamba_ssm's: busy, idle, overlap, the largest gaps|python benchmarks/decode_timeline.py --model mamba-2.8b --recipe quamba --batches 1 16 --ref --commit "$COMMIT" --json "$OUT/timeline.json"
timeline-w4|300|issue 16: the same for W4A16 at batch 1 (round-to-nearest weights)|python benchmarks/decode_timeline.py --model mamba-2.8b --recipe quamba2-w4a16 --rtn-weights --batches 1 --commit "$COMMIT" --json "$OUT/timeline-w4.json"
scan|480|issue 13: the prefill scan alone against mamba_ssm's, with dt_proj folded in or not, and each walk's configs alone|python benchmarks/scan.py --shapes 1,5120,2048 8,5120,2048 1,5120,128 1,1536,2048 --walks --commit "$COMMIT" --json "$OUT/scan.json"
gemm|400|issue 13: the int8 prefill GEMMs of mamba-2.8b against cuBLAS fp16 at 2048 and 16384 rows|python benchmarks/gemm.py --m 2048 16384 --only 2.8b --model-outs --no-overhead --json "$OUT/gemm.json"
host|300|issues 13-14: the host time of plain calls (mamba-130m 1x128 prefill, decode step), with a cProfile and the A/B of the Generator graphs' flat weight reads|python benchmarks/host_overhead.py --model mamba-130m --shape 1x128 --top 30 --sort tottime cumtime --compare-flatten --json "$OUT/host.json"
w4-sweep|400|issue 16: the W4A8 decode GEMM's launch configs at 16 and 64 rows|python benchmarks/gemm_w4.py --m 16 64 --sweep --json "$OUT/w4-sweep.json"
greedy-ab|360|issue 14: what the host's gap between CUDA-graph replays costs: mamba-2.8b W8A8 greedy decode at batch 1 and 16 with 1, 8 and 32 steps a graph (Generator.greedy), two rounds, mamba_ssm alongside; Generator's tests on the GPU first|python -m pytest -q --tb=short -p no:cacheprovider tests/test_generator.py -m "slow or not slow" && python benchmarks/decode_settings.py --model mamba-2.8b --batches 1 16 --rounds 2 --ref --greedy --set quamba_fx.runtime.STEPS_PER_GRAPH=1,8,32 --commit "$COMMIT" --json "$OUT/greedy-ab.json"
dt-proj-b16|300|issue 14: mamba-2.8b W8A8 decode at batch 16 with dt_proj inside the scan update (DT_PROJ_MAX_BATCH 16) or as its GEMM (8, the rule since session 21, from kernel times of that day), two rounds, mamba_ssm alongside|python benchmarks/decode_settings.py --model mamba-2.8b --batches 16 --rounds 2 --ref --set quamba_fx.kernels.scan.DT_PROJ_MAX_BATCH=8,16 --commit "$COMMIT" --json "$OUT/dt-proj-b16.json"
ncu-w4|420|issue 16: Nsight Compute on the W4A16 GEMV alone at one row (2.8b in_proj and out_proj; each kernel launched on its own, cold L2): throughput, occupancy, scheduler and warp stall reasons, the memory chart: what holds it at 1.6 and 0.8 TB/s|ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:_w4a16_gemv_kernel --launch-count 2 python benchmarks/gemm_w4.py --m 1 --layers in_proj && ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:_w4a16_gemv_kernel --launch-count 2 python benchmarks/gemm_w4.py --m 1 --layers out_proj
w4-head|240|issue 16: the 4-bit LM head of mamba-2.8b (50280 x 2560, since session 54) on the W4A16 GEMV and tensor-core kernel at 1, 16 and 64 rows against cuBLAS fp16, the head a decode step ran before|python benchmarks/gemm_w4.py --m 1 16 64 --layers lm_head --json "$OUT/w4-head.json"
w4-tile-ab|360|issue 16: mamba-2.8b W4A16 batch-1 decode under the W4A16 GEMV rule's tile: 16, 32 or 64 rows x 512 or 128 columns (a warp then spans fewer chunks and more rows; session 35's in-model sweep never had 128), two rounds|python benchmarks/decode_settings.py --model mamba-2.8b --recipe quamba2-w4a16 --rtn-weights --batches 1 --rounds 2 --set quamba_fx.kernels.gemv_w4._BLOCK_K=512,128 --set quamba_fx.kernels.gemv_w4._BLOCK_N=16,32,64 --commit "$COMMIT" --json "$OUT/w4-tile-ab.json"
w4-rows-ab|540|issue 16: mamba-2.8b W4A16 batch-1 decode with the W4A16 GEMV's threads taking 1, 2 or 4 rows (_BLOCK_N 16, 32, 64 at 8 warps; since session 54 each row its own tile in the activations' layout, no shared memory in the loop, 7.9, 5.8 and 4.8 SASS instructions a weight byte, 40, 64 and 80 registers: 6, 4 and 3 programs an SM, so `_PROGRAMS` 1056 or 528), two rounds; the GEMV's tests on the GPU first (the PTX of several rows a thread never ran there)|python -m pytest -q --tb=short -p no:cacheprovider tests/test_kernel_gemm_w4.py -k "several_rows or conv_step_gives or one_fp16_row" && python benchmarks/decode_settings.py --model mamba-2.8b --recipe quamba2-w4a16 --rtn-weights --batches 1 --rounds 2 --set quamba_fx.kernels.gemv_w4._BLOCK_N=16,32,64 --set quamba_fx.kernels.gemv_w4._PROGRAMS=1056,528 --commit "$COMMIT" --json "$OUT/w4-rows-ab.json"
EOF
)

# A digest of the sources a device call copies (Python and shell files of the package, the
# benchmarks and the tests, and pyproject.toml; no caches, no build outputs). The copy carries no
# git history, so COMMIT is only a label: environment.txt records this digest beside it, and
# `--digest` run on the checkout at that commit must print the same, or the label is wrong.
source_digest() {
    find quamba_fx benchmarks tests pyproject.toml -type f \( -name '*.py' -o -name '*.sh' -o -name '*.toml' \) \
        -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

field() {  # step name, field number
    awk -F'|' -v name="$1" -v f="$2" '$1 == name { print $f }' <<<"$STEPS"
}

list_steps() {
    awk -F'|' '{ printf "%-14s %4ss  %s\n", $1, $2, $3 }' <<<"$STEPS"
}

dry_run=0
case "${1:-}" in
    ""|-h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; echo; list_steps; exit 0 ;;
    --list) list_steps; exit 0 ;;
    --digest) source_digest; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
esac
[ "$#" -gt 0 ] || { echo "device_run.sh: name at least one step (--list shows them)" >&2; exit 2; }
for step in "$@"; do
    [ -n "$(field "$step" 1)" ] || { echo "device_run.sh: no step '$step' (--list shows them)" >&2; exit 2; }
done

if [ "$dry_run" -eq 1 ]; then
    for step in "$@"; do
        echo "$(field "$step" 4)"
    done
    exit 0
fi

mkdir -p "$OUT"
{
    echo "commit $COMMIT, $(date -u +%FT%TZ)"
    echo "sources $(source_digest)"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} > "$OUT/environment.txt" 2>&1
failed=0
for step in "$@"; do
    start=$SECONDS
    timeout "$(field "$step" 2)" bash -c "$(field "$step" 4)" > "$OUT/$step.log" 2>&1
    status=$?
    echo "$step status=$status seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
    [ "$status" -eq 0 ] || failed=1
done
exit "$failed"
