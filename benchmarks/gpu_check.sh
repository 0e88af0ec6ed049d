#!/usr/bin/env bash
# GPU check of the training stack → one JSON (benchmarks/gpu_check.py has the parts): one GPU, and
# tensor parallel 2 against 1 where there are two.
#
#   bash benchmarks/gpu_check.sh [gpu_check options]   # e.g. --parts dense_350m --steps 50
#   bash benchmarks/gpu_check.sh --fetch-wheels        # where PyPI is reachable: the wheels that a GPU
#                                                      # image with torch but without the project lacks → .whl/
#
# Report: $OUT/gpu_check.json when OUT is set, else runs/gpu_check/gpu_check.json (git-ignored), with
# setup.log, gpu_check.log (this run's output), runs.log (every training process) and cuda_tests.log
# beside it. Meant to finish within 8 minutes on one H200 (GPU_CHECK_TOTAL_S, default 470 s, setup
# included); without CUDA it runs the CPU-safe parts at tiny size and says what it skipped.
#
# Environment (bounded): the first of $PYTHON, .venv/bin/python, python3 that imports torch, preferring
# one that sees CUDA. When the project's runtime imports fail there: wheels in .whl/ are installed
# offline into $GPU_CHECK_SITE (default /tmp/pangu-gpu-check-site, put on PYTHONPATH); then, for what is
# still missing, `pip install` of the pyproject.toml pins with a time limit (GPU_CHECK_INSTALL_S, default
# 240 s). If the imports still fail, the JSON says so and the script exits 2.
# Exit status: 0 all parts ok or skipped, 1 a part failed, 2 setup failed, 124 the whole run timed out.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
START=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}
INSTALL_S=${GPU_CHECK_INSTALL_S:-240}
SITE=${GPU_CHECK_SITE:-/tmp/pangu-gpu-check-site}
WHEELS=$ROOT/.whl
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONUNBUFFERED=1

# Modules the training path, the CUDA tests and DeepSpeed import (DeepSpeed's own requirements too),
# and the requirement that brings each (pyproject.toml's pins).
declare -A REQ=(
  [torch]="torch==2.13.0" [deepspeed]="deepspeed==0.19.8" [pydantic]="pydantic>=2.7" [yaml]="pyyaml>=6"
  [numpy]="numpy>=1.26" [jieba]="jieba==0.42.1" [pyarrow]="pyarrow>=16" [fsspec]="fsspec>=2024.6"
  [xxhash]="xxhash>=3" [sentencepiece]="sentencepiece>=0.2" [safetensors]="safetensors>=0.4" [pytest]="pytest>=8"
  [hjson]="hjson" [msgpack]="msgpack" [ninja]="ninja" [cpuinfo]="py-cpuinfo" [psutil]="psutil"
  [einops]="einops" [tqdm]="tqdm" [packaging]="packaging>=20"
)
MODULES=(torch deepspeed pydantic yaml numpy jieba pyarrow fsspec xxhash sentencepiece safetensors pytest
         hjson msgpack ninja cpuinfo psutil einops tqdm packaging)

if [ "${1:-}" = "--fetch-wheels" ]; then
  # Pure-Python wheels built here (deepspeed needs torch to build: --no-build-isolation with .venv's),
  # binary ones for the GPU image's CPython (GPU_PY_VERSION, default 3.12), same versions as .venv.
  PYH=${PYTHON:-$ROOT/.venv/bin/python}
  PYV=${GPU_PY_VERSION:-3.12}
  mkdir -p "$WHEELS" && rm -f "$WHEELS"/*.whl
  "$PYH" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==0.19.8" "jieba==0.42.1" || exit 1
  pins=()
  for dist in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
    version=$("$PYH" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist") || exit 1
    pins+=("$dist==$version")
  done
  "$PYH" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${pins[@]}" || exit 1
  ls -la "$WHEELS"; du -sh "$WHEELS"
  echo "carry .whl to the GPU machine (it is git-ignored); gpu_check.sh installs it offline there"
  exit 0
fi

OUT_DIR=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$OUT_DIR"
JSON=$OUT_DIR/gpu_check.json
SETUP_LOG=$OUT_DIR/setup.log
SETUP_JSON=$(mktemp /tmp/gpu-check-setup.XXXXXX)
: >"$SETUP_LOG"
log() { echo "[gpu_check.sh] $*" | tee -a "$SETUP_LOG" >&2; }
elapsed() { echo $(( $(date +%s) - START )); }

# ---- the interpreter --------------------------------------------------------------------------
PY=""
PY_CUDA=0
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
  [ -n "$cand" ] || continue
  command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
  cuda=$(timeout 90 "$cand" -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$SETUP_LOG" | tail -1)
  case "$cuda" in
    1) PY=$cand; PY_CUDA=1; break ;;
    0) [ -n "$PY" ] || PY=$cand ;;
  esac
done
if [ -z "$PY" ]; then
  for cand in "${PYTHON:-}" python3 python; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && { PY=$cand; break; }
  done
fi
if [ -z "$PY" ]; then
  log "no python interpreter found"
  printf '{"schema": 1, "mode": "setup-failed", "setup": {"status": "failed: no python interpreter"}, "parts": {}}\n' >"$JSON"
  exit 2
fi
log "python: $PY ($(timeout 30 "$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)), torch sees CUDA: $PY_CUDA"

missing_modules() {
  timeout 60 "$PY" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "${MODULES[@]}" 2>>"$SETUP_LOG"
}
# The real test: the project's training path imports (DeepSpeed included).
imports_ok() {
  timeout 180 "$PY" -c 'import torch, deepspeed, pydantic, yaml, jieba, pytest
import pangu_model.train, pangu_model.ecss, tokenizer.dataset, pangu_model.plan, benchmarks.train_throughput' \
    >>"$SETUP_LOG" 2>&1
}

DETAIL="already installed"
if ! imports_ok; then
  missing=$(missing_modules)
  log "the project's imports fail in $PY; missing modules: ${missing:-none (see setup.log)}"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    log "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels from .whl/ into $SITE (offline)"
    timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >>"$SETUP_LOG" 2>&1 || log "pip install of .whl/ failed (setup.log)"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    DETAIL="wheels from .whl/ in $SITE"
  fi
  if ! imports_ok; then
    missing=$(missing_modules)
    reqs=()
    for m in $missing; do reqs+=("${REQ[$m]}"); done
    if [ ${#reqs[@]} -gt 0 ]; then
      log "pip install (limit ${INSTALL_S} s): ${reqs[*]}"
      # torch from PyPI on Linux is the CUDA build; --no-build-isolation: deepspeed's setup imports torch.
      timeout "$INSTALL_S" "$PY" -m pip install -q --retries 1 --timeout 20 --no-build-isolation "${reqs[@]}" \
        >>"$SETUP_LOG" 2>&1 || log "pip install failed or timed out (no network?)"
      DETAIL="$DETAIL; pip install ${reqs[*]}"
    fi
  fi
  if ! imports_ok; then
    reason=$(grep -E "Error|error" "$SETUP_LOG" | tail -1 | cut -c1-300)
    missing=$(missing_modules)
    msg="the project's runtime does not import in $PY (missing: ${missing:-?}; ${reason:-see setup.log}); without network, run 'bash benchmarks/gpu_check.sh --fetch-wheels' where PyPI is reachable and carry .whl"
    log "$msg"
    printf '{"status": "failed", "python": "%s", "detail": "%s", "seconds": %s}\n' "$PY" "$DETAIL" "$(elapsed)" >"$SETUP_JSON"
    "$PY" -m benchmarks.gpu_check --setup-failed "$msg" --setup-json "$SETUP_JSON" --output "$JSON"
    rm -f "$SETUP_JSON"
    echo "report: $JSON"
    exit 2
  fi
fi
SETUP_S=$(elapsed)
log "environment ready in ${SETUP_S} s ($DETAIL)"
printf '{"status": "ok", "python": "%s", "cuda": %s, "detail": "%s", "pythonpath": "%s", "seconds": %s}\n' \
  "$PY" "$PY_CUDA" "$DETAIL" "${PYTHONPATH:-}" "$SETUP_S" >"$SETUP_JSON"

# ---- the check ----------------------------------------------------------------------------------
LEFT=$(( TOTAL_S - $(elapsed) ))
BUDGET=$(( LEFT - 25 ))  # the parts' budget; the rest: summary and a hard stop's margin
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; LEFT=85; fi  # setup ate the time: a minimal run past the total
log "running benchmarks.gpu_check: parts budget ${BUDGET} s, hard limit $(( LEFT - 5 )) s"
timeout -k 10 $(( LEFT - 5 )) "$PY" -u -m benchmarks.gpu_check --output "$JSON" --budget "$BUDGET" \
  --setup-json "$SETUP_JSON" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -f "$SETUP_JSON"
[ "$rc" -eq 124 ] && log "benchmarks.gpu_check hit the hard time limit: the JSON holds the parts finished before it"
if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then  # cut off or crashed: it printed no summary of its own
  echo
  timeout 60 "$PY" -m benchmarks.gpu_check --summary "$JSON" || true
fi
echo "report: $JSON  (logs beside it; total $(elapsed) s, exit $rc)"
exit "$rc"
