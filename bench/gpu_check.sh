#!/usr/bin/env bash
# All GPU work of the project in one run (at most 8 minutes on a bare H100: the estimates below), or its dry run
# on a CPU.
#
#   bash bench/fetch_gpu_wheels.sh     # once, on a machine with PyPI: wheels the GPU image lacks -> .whl/
#   bash bench/gpu_check.sh            # on the GPU machine, from anywhere (cd's to the repo root)
#   bash bench/gpu_check.sh --dry      # on a CPU (CI): same steps, GPU-only ones reported as skipped
#   bash bench/gpu_check.sh --steps build,bench     # a subset (names below)
#   bash bench/gpu_check.sh --collect bench/gpu_check_runs/h100-2027-01-05   # copy a finished run's files to commit
#
# Steps (each timed and logged to $OUT/gpu_check.log; a failing step does not stop the others, but the
# exit code is non-zero if any step failed; the summary table comes last):
#   env        GPU: install .whl/*.whl into /tmp/site (PYTHONPATH=/tmp/site:$PWD), nvidia-smi, versions
#   build      GPU: build the extension with CUDA kernels for this GPU's arch with +PTX (TORCH_CUDA_ARCH_LIST
#              "<cap>+PTX", GPU_CHECK_ARCHS overrides: a newer GPU JITs the PTX), `fastsel info`, and
#              `cuobjdump --list-ptx` must find PTX in fastsel/_C; fails unless CUDA kernels loaded.
#              Dry: no build (make install did it), the CPU extension must load
#   tests      GPU: pytest -k cuda -> $OUT/tests_cuda.log (its output) and tests_cuda.xml (JUnit); fails on any
#              failure OR skip. Dry: skipped
#   bench      bench/gpu_check.py -> $OUT/gpu_check.json, fisher_pass.log, backend_table.json: GEMM ceilings;
#              the linear op's backends (CUDA pipelined / wmma, triton, bmm vs the weight-gradient GEMM) on
#              today's table's shapes plus T in {32, 64}, bf16 / fp16 / fp32, and the backend table written
#              from them; the Fisher pass vs its peers (B=32, eager); `fastsel score` as a user runs it
#              (section fisher_pass: B=32 and 128, the default configuration and the bare pass, SDPA and
#              eager, CUDA graphs off and on, the variability pass); the variability and profile sections.
#              Dry: tiny sizes; triton in its interpreter (TRITON_INTERPRET=1) when triton imports
#   memcheck   GPU: compute-sanitizer memcheck over bench/sanitize_kernels.py, fastsel's kernels only
#              -> $OUT/sanitize_memcheck.log. Dry: bench/sanitize_kernels.py --device cpu -> sanitize_cpu.log
#   racecheck  GPU: the same with racecheck -> $OUT/sanitize_racecheck.log. Dry: skipped
# bench runs before the sanitizers so that a slow sanitizer cannot cost the timings.
#
# Where the results land: everything is under $OUT (default runs/gpu_check, which the device machine
# sends back): gpu_check.log (all output), steps.tsv, summary.txt (the table, printed last), gpu_check.json,
# backend_table.json, build.log, tests_cuda.log / .xml / .xml.summary, sanitize_*.log, fisher_pass.log.
# `--collect DEST` copies the files the summary summarises (sanitizer and test logs cut to their last
# 2000 lines) into DEST, a folder under bench/ to commit with the JSON; it runs no step.
#
# Time budget (seconds on an H100; EST_<step> below, bench/test_gpucheck_budget.py checks that they and a
# summary reserve sum to <= 480 and that the bench sections' shares in bench/gpucheck/config.py fit EST_bench).
# Each step's limit is its estimate, cut to what the whole-run budget has left; a step that would start
# with under 15 s left is skipped, so the summary is always printed.
#
# Environment: OUT (default ./runs/gpu_check), PY (dry mode's python, default .venv/bin/python),
# GPU_CHECK_BUDGET_S (whole-run wall budget, default 480), SANITIZER_TIMEOUT_S (each sanitizer's limit,
# default EST_memcheck / EST_racecheck), GPU_CHECK_BENCH_S (the bench step's limit, default EST_bench),
# GPU_CHECK_TESTS_S (the tests' limit, default EST_tests), GPU_CHECK_REBUILD=1 (build even when a prebuilt
# extension for this python and torch loads), GPU_CHECK_ARCHS (the build's TORCH_CUDA_ARCH_LIST),
# TRITON_CACHE_DIR (default runs/triton_cache: carry it to the next run and Triton neither compiles nor
# autotunes again).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"

DRY=0
COLLECT=""
STEPS="env,build,tests,bench,memcheck,racecheck"

# ---- time budget: estimates per step on an H100 (s); the sum with SUMMARY_S stays <= 480 (8 minutes)
EST_env=15        # pip install of the carried wheels, nvidia-smi, versions
EST_build=45      # prebuilt extension: ~5; a build for one arch + PTX with 16 jobs: ~40 (H200: 32 s without PTX)
EST_tests=85      # ~180 CUDA-parametrised tests
EST_bench=235     # bench/gpu_check.py: its sections' shares (bench/gpucheck/config.py) + start-up
EST_memcheck=40   # compute-sanitizer memcheck over ~120 small kernel calls
EST_racecheck=40  # racecheck over the same
SUMMARY_S=20      # kept back for the backend table, the summary and the step records
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --steps) STEPS="$2"; shift ;;
        --steps=*) STEPS="${1#--steps=}" ;;
        --collect) COLLECT="$2"; shift ;;
        -h|--help) sed -n '2,49p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT

# --collect DEST: copy the files of a finished run that the summary summarises into DEST (to commit)
if [ -n "$COLLECT" ]; then
    mkdir -p "$COLLECT" || exit 1
    n=0
    for f in summary.txt steps.tsv gpu_check.json backend_table.json tests_cuda.xml tests_cuda.xml.summary \
             gpu_check.log build.log tests_cuda.log sanitize_memcheck.log sanitize_racecheck.log sanitize_cpu.log \
             fisher_pass.log; do
        [ -f "$OUT/$f" ] || continue
        case "$f" in
            *.log) tail -n 2000 "$OUT/$f" > "$COLLECT/$f" ;;  # the end says what failed; the whole stays in $OUT
            *) cp "$OUT/$f" "$COLLECT/$f" ;;
        esac
        n=$((n + 1))
    done
    echo "gpu_check.sh: $n files of $OUT copied to $COLLECT"
    [ "$n" -gt 0 ]
    exit $?
fi

LOG="$OUT/gpu_check.log"
STEPS_TSV="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS_TSV"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$REPO/runs/triton_cache}"
START_S=$(date +%s)
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    PY="${PY:-$REPO/.venv/bin/python}"
    [ -x "$PY" ] || PY="$(command -v python3)"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    PY="python3"
    export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

FAILED=()

log() { echo "$@" | tee -a "$LOG"; }

elapsed() { echo $(( $(date +%s) - START_S )); }

# left SECONDS_WANTED: seconds the step may run (its own limit, cut to the budget left less SUMMARY_S for the
# summary); prints 0 when too little is left
left() {
    local want="$1" rest
    rest=$(( BUDGET_S - $(elapsed) - SUMMARY_S ))
    if [ "$rest" -lt 15 ]; then echo 0; elif [ "$rest" -lt "$want" ]; then echo "$rest"; else echo "$want"; fi
}

record() {  # record NAME STATUS SECONDS
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STEPS_TSV"
    log "--- [$1] $2 (${3} s)"
}

wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# run_step NAME FUNCTION: runs FUNCTION with its output teed to the log; FUNCTION's exit code decides
# (0 ok, 100 skipped with the reason in $OUT/.skip, anything else failed)
run_step() {
    local name="$1" fn="$2" t0 rc status
    wanted "$name" || return 0
    log ""
    log "=== [$name] $(date '+%H:%M:%S') (elapsed $(elapsed) s)"
    rm -f "$OUT/.skip" "$OUT/.status"
    t0=$(date +%s)
    "$fn" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 100 ]; then
        status="skipped ($(cat "$OUT/.skip" 2>/dev/null || echo '?'))"
    elif [ "$rc" = 0 ]; then
        status="ok$( [ -s "$OUT/.status" ] && echo " ($(cat "$OUT/.status"))" )"
    else
        status="FAILED (rc $rc$( [ -s "$OUT/.status" ] && echo ", $(cat "$OUT/.status")" ))"
        FAILED+=("$name")
    fi
    record "$name" "$status" "$(( $(date +%s) - t0 ))"
}

skip() { echo "$1" > "$OUT/.skip"; return 100; }
note() { echo "$1" > "$OUT/.status"; }

# ------------------------------------------------------------------------------------------------
step_env() {
    echo "repo $REPO, out $OUT, dry $DRY, python $("$PY" --version 2>&1)"
    if [ "$DRY" = 1 ]; then
        "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'threads', torch.get_num_threads())"
        return $?
    fi
    local rc=0
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
            || { echo "pip install of .whl/*.whl failed"; rc=1; }
        ls "$REPO"/.whl
    else
        echo "no .whl/*.whl (run bench/fetch_gpu_wheels.sh here and carry .whl): datasets / opacus may be missing"
        rc=1
    fi
    nvidia-smi || rc=1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" || rc=1
    nvcc --version | tail -2 || rc=1
    command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
    # versions the carried wheels depend on, and an import check of each carried package
    python3 - <<'EOF' || rc=1
import importlib, importlib.metadata as md
for name in ("transformers", "peft", "triton", "pytest", "pyarrow", "fsspec", "huggingface-hub", "pandas", "numpy", "scipy", "opt-einsum"):
    try:
        print(f"{name:<16} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:<16} MISSING")
bad = 0
for mod in ("dill", "multiprocess", "datasets", "opacus"):
    try:
        m = importlib.import_module(mod)
        print(f"import {mod:<12} ok {getattr(m, '__version__', '')} ({m.__file__})")
    except Exception as exc:
        bad += 1
        print(f"import {mod:<12} FAILED: {type(exc).__name__}: {exc}")
raise SystemExit(1 if bad else 0)
EOF
    [ "$rc" = 0 ] || note "see the log"
    return $rc
}

step_build() {
    local t
    if [ "$DRY" = 1 ]; then
        echo "dry: no build (make install builds the CPU extension); checking that it loads"
        "$PY" -m fastsel info
        "$PY" -c "import sys, fastsel; s = fastsel.EXTENSION; print('fastsel._C:', s.reason); sys.exit(0 if s.loaded else 1)"
        return $?
    fi
    # A prebuilt extension for this python and torch (built elsewhere against the same torch release and
    # carried along, to save the GPU's time) is used when it loads with CUDA kernels and no mismatch;
    # GPU_CHECK_REBUILD=1 builds regardless.
    if [ "${GPU_CHECK_REBUILD:-0}" != 1 ] && python3 -c "
import sys, fastsel
from fastsel.ops.backend import EXTENSION, torch_mismatch
print('prebuilt fastsel._C:', EXTENSION)
sys.exit(0 if EXTENSION.loaded and EXTENSION.cuda and torch_mismatch() is None else 1)"; then
        python3 -m fastsel info
        note "prebuilt extension (GPU_CHECK_REBUILD=1 rebuilds)"
        return 0
    fi
    t=$(left "$EST_build"); [ "$t" = 0 ] && { skip "time budget"; return 100; }
    # this GPU's arch with +PTX (compute_XY PTX embedded beside the sm_XY code: a GPU newer than any arch
    # compiled for JITs it instead of failing with "no kernel image")
    local archs="${GPU_CHECK_ARCHS:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)+PTX}"
    echo "TORCH_CUDA_ARCH_LIST=$archs"
    MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$archs" FASTSEL_FORCE_CUDA=1 timeout "$t" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/build.log"
    if [ "$rc" != 0 ]; then note "build failed, rc $rc: $OUT/build.log"; return "$rc"; fi
    python3 -m fastsel info
    python3 -c "import sys, fastsel; s = fastsel.EXTENSION; print('fastsel._C:', s.reason); sys.exit(0 if s.loaded and s.cuda else 1)" \
        || { note "extension did not load with CUDA kernels"; return 1; }
    check_ptx "$archs"
}

# check_ptx ARCHS: fastsel/_C must hold PTX when ARCHS asks for it (cuobjdump lists one entry per kernel)
check_ptx() {
    case "$1" in *PTX*) ;; *) note "built for $1 (no +PTX asked)"; return 0 ;; esac
    local so n
    so=$(ls "$REPO"/fastsel/_C*.so 2>/dev/null | head -1)
    command -v cuobjdump >/dev/null || { note "built for $1; cuobjdump not found: PTX not checked"; return 0; }
    n=$(cuobjdump --list-ptx "$so" 2>/dev/null | grep -c "PTX file")
    echo "PTX entries in $so: $n"
    [ "$n" -gt 0 ] || { note "built for $1 but $so holds no PTX"; return 1; }
    note "built for $1, $n PTX entries"
}

step_tests() {
    [ "$DRY" = 1 ] && { skip "dry: make test runs the suite"; return 100; }
    local t rc
    t=$(left "${GPU_CHECK_TESTS_S:-$EST_tests}"); [ "$t" = 0 ] && { skip "time budget"; return 100; }
    # every test with a CUDA parameter; not -x (one run must show every failure). The nvcc compile and
    # CPU-emulation tests (test_cuda_sources), the build-script and gpu-check tests run in CI instead.
    # (tests about CUDA that only make sense without one, e.g. "--device cuda on a CPU-only torch", are
    # left out by name: they skip on a GPU by design)
    # its output also to $OUT/tests_cuda.log (the log the summary's line summarises, committed with the run)
    timeout "$t" python3 -m pytest -q -rs tests -k "cuda and not on_cpu_torch" -p no:cacheprovider --junitxml="$OUT/tests_cuda.xml" \
        --ignore=tests/extension 2>&1 | tee "$OUT/tests_cuda.log"
    rc=${PIPESTATUS[0]}
    # fail on any failure, error or skip (a skipped CUDA test is an untested kernel), or no test at all
    python3 - "$OUT/tests_cuda.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:
    print(f"no JUnit XML: {exc}"); open(sys.argv[1] + ".summary", "w").write("no junit xml"); raise SystemExit(1)
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
msg = f"{n['tests']} tests, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
bad = []
for case in root.iter("testcase"):
    for tag in ("skipped", "failure", "error"):
        el = case.find(tag)
        if el is not None:
            bad.append(f"{tag} {case.get('name')}")
            print(f"  {tag.upper()}: {case.get('classname')}::{case.get('name')}: {(el.get('message') or '')[:200]}")
if bad:
    msg += ": " + ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
print(msg)
open(sys.argv[1] + ".summary", "w").write(msg)
raise SystemExit(0 if n["tests"] and not (n["failures"] or n["errors"] or n["skipped"]) else 1)
EOF
    local prc=$?
    note "$(cat "$OUT/tests_cuda.xml.summary" 2>/dev/null)"
    [ "$rc" = 0 ] && [ "$prc" = 0 ] && return 0
    [ "$rc" = 124 ] && note "timed out; $(cat "$OUT/tests_cuda.xml.summary" 2>/dev/null)"
    return 1
}

step_bench() {
    local t budget
    if [ "$DRY" = 1 ]; then
        # triton in its interpreter on CPU tensors, when it imports (else the linear section records it missing)
        if "$PY" -c "import triton, triton.language" 2>/dev/null; then
            TRITON_INTERPRET=1 timeout 400 "$PY" bench/gpu_check.py --dry --out "$OUT" --budget-s 360
        else
            echo "triton not importable: the triton backend is not exercised"
            timeout 400 "$PY" bench/gpu_check.py --dry --out "$OUT" --budget-s 360
        fi
        return $?
    fi
    t=$(left "${GPU_CHECK_BENCH_S:-$EST_bench}"); [ "$t" = 0 ] && { skip "time budget"; return 100; }
    budget=$(( t > 60 ? t - 10 : t * 2 / 3 ))
    timeout "$t" python3 bench/gpu_check.py --out "$OUT" --budget-s "$budget"
}

sanitize() {  # sanitize TOOL
    local tool="$1" t rc est
    est=EST_$tool
    t=$(left "${SANITIZER_TIMEOUT_S:-${!est}}"); [ "$t" = 0 ] && { skip "time budget"; return 100; }
    command -v compute-sanitizer >/dev/null || { note "compute-sanitizer not found"; return 1; }
    # kns=fastsel: every fastsel kernel lives in namespace fastsel::cuda, so its mangled name holds
    # "fastsel"; torch's own kernels are not instrumented. memcheck without the caching allocator, so
    # an access past a tensor is not hidden inside a cached block.
    local env=()
    [ "$tool" = memcheck ] && env=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    timeout "$t" ${env[@]+"${env[@]}"} compute-sanitizer --tool "$tool" --kernel-name kns=fastsel --error-exitcode 3 \
        --print-limit 30 python3 bench/sanitize_kernels.py --device cuda > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/sanitize_$tool.log"
    local summary
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed, .* failed" "$OUT/sanitize_$tool.log" | tr '\n' ' ')
    case "$rc" in
        0) note "$summary" ;;
        3) note "sanitizer errors: $summary" ;;
        1) note "kernel mismatch vs reference: $summary" ;;
        124) note "timed out after $t s" ;;
        *) note "rc $rc: $summary" ;;
    esac
    return "$rc"
}

step_memcheck() {
    if [ "$DRY" = 1 ]; then
        "$PY" bench/sanitize_kernels.py --device cpu > "$OUT/sanitize_cpu.log" 2>&1
        local rc=$?
        tail -n 5 "$OUT/sanitize_cpu.log"
        note "no sanitizer (dry): $(grep -E 'passed, .* failed' "$OUT/sanitize_cpu.log")"
        return $rc
    fi
    sanitize memcheck
}

step_racecheck() {
    [ "$DRY" = 1 ] && { skip "no GPU"; return 100; }
    sanitize racecheck
}

# ------------------------------------------------------------------------------------------------
log "gpu_check.sh: $( [ "$DRY" = 1 ] && echo dry || echo GPU ) run, steps $STEPS, budget $BUDGET_S s (estimates: env $EST_env, build $EST_build, tests $EST_tests, bench $EST_bench, memcheck $EST_memcheck, racecheck $EST_racecheck, summary $SUMMARY_S), $(date)"
run_step env step_env
run_step build step_build
run_step tests step_tests
run_step bench step_bench
run_step memcheck step_memcheck
run_step racecheck step_racecheck
rm -f "$OUT/.skip" "$OUT/.status"

log ""
log "total $(elapsed) s"
"$PY" bench/gpu_check.py --summary --out "$OUT" 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
if [ "${#FAILED[@]}" -gt 0 ]; then
    log "FAILED steps: ${FAILED[*]}"
    exit 1
fi
log "all steps passed"
exit 0
