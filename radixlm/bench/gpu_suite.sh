#!/usr/bin/env bash
# The GPU measurement suite of issue 13, in one run (8-12 minutes on one H200: eight engine
# starts load the 16 GB model and capture CUDA graphs; SKIP_HF=1 saves the compile minutes).
#
#   bash radixlm/bench/gpu_suite.sh [OUT_DIR]
#
# 1. correctness: pytest -m gpu -x -q tests/ (stops the suite if it fails);
# 2. timings on --random-model llama3-8b, bf16 (random weights written once to /dev/shm, with
#    the real Llama 3 tokenizer when shared/tokenizers/llama3 is beside the checkout):
#    one-batch bs 1/8/64 at 512/128 (and, last, again with HF generate static-cache+compile on
#    the same prompts);
#    a torch-profiler pass of bs 1 and 64 (kernel time vs step wall time); offline random
#    N x 1024/256 in-process and --engine-process; serving the same workload at concurrency 512
#    (native streaming) and concurrency 1 (OpenAI, 512/128); offline shared prefix (2k system
#    prompt) with radix off / on.
# Then it prints one compact table from the JSON files in OUT_DIR.
#
# Request counts are below the issue's (1000 x 1024/256; 64 x 16 shared prefix) to fit the
# time: OFFLINE_N=500, PREFIX_GROUPS=16 by default; set OFFLINE_N=1000 PREFIX_GROUPS=64 for the
# full workloads (about twice as long). SKIP_TESTS=1 skips step 1, SKIP_HF=1 the HF baseline,
# SKIP_TUNE=1 the small-M kernel tuning (TUNE_INSTALL=1 writes its plan into the tree).
# PRESET/DTYPE/IN_LEN/OUT_LEN/OB_BS/OB_IN/OB_OUT/SYS_LEN shrink it for a smoke run on a CPU, e.g.
#   SKIP_TESTS=1 SKIP_HF=1 PRESET=llama DTYPE=float32 OFFLINE_N=8 PREFIX_GROUPS=2 IN_LEN=32 \
#   OUT_LEN=8 OB_BS="1 2" OB_IN=16 OB_OUT=8 SYS_LEN=64 bash radixlm/bench/gpu_suite.sh /tmp/s
set -uo pipefail

OUT=${1:-gpu_suite_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
OFFLINE_N=${OFFLINE_N:-500}
PREFIX_GROUPS=${PREFIX_GROUPS:-16}
SERVE_C1_N=${SERVE_C1_N:-16}
PORT=${PORT:-30123}
PRESET=${PRESET:-llama3-8b}
DTYPE=${DTYPE:-bfloat16}
IN_LEN=${IN_LEN:-1024}
OUT_LEN=${OUT_LEN:-256}
OB_BS=${OB_BS:-1 8 64}
OB_IN=${OB_IN:-512}
OB_OUT=${OB_OUT:-128}
SYS_LEN=${SYS_LEN:-2048}
MODEL=(--random-model "$PRESET" --dtype "$DTYPE")
BENCH=("$PY" -m radixlm bench)
START=$(date +%s)
LOG="$OUT/suite.log"
: > "$LOG"

step() { echo "== [$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
run() { step "$*"; "$@" 2>&1 | tee -a "$LOG" | tail -n 25; }

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step "pytest -m gpu -x -q tests/"
  if ! "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 15; then
    echo "GPU tests failed: see $OUT/pytest_gpu.log (timings skipped)"; exit 1
  fi
fi

# The llama3 presets need the real Llama 3 tokenizer (constrained/detokenizing workloads, and
# the default grammar backend cannot read the synthetic one): stop early when it is missing.
if [[ "$PRESET" == llama3* ]] && ! "$PY" -c "
from radixlm.model.random_model import llama3_tokenizer_dir
raise SystemExit(llama3_tokenizer_dir() is None)"; then
  echo "no Llama 3 tokenizer: put it at <repo>/shared/tokenizers/llama3 or <repo>/../shared/..."
  echo "or set RADIXLM_LLAMA3_TOKENIZER=/path/to/llama3 (ALLOW_SYNTHETIC=1 runs without it)"
  [ "${ALLOW_SYNTHETIC:-0}" = 1 ] || exit 1
fi

# Build the random model once (and find its directory for the server).
MODEL_DIR=$("$PY" - "$PRESET" "$DTYPE" <<'EOF'
import sys
import torch
from radixlm.bench.common import random_model_dir
device = "cuda" if torch.cuda.is_available() else "cpu"
print(random_model_dir(sys.argv[1], device=device, dtype=sys.argv[2]))
EOF
)
step "model directory: $MODEL_DIR"

HF=(--baseline hf --hf-variants static-compile)
[ "${SKIP_HF:-0}" = 1 ] && HF=()
run "${BENCH[@]}" one-batch "${MODEL[@]}" --batch-sizes $OB_BS --input-lens "$OB_IN" --output-len "$OB_OUT" \
    --out "$OUT/one_batch.json"
run "${BENCH[@]}" one-batch "${MODEL[@]}" --batch-sizes 1 ${OB_BS##* } --input-lens "$OB_IN" --output-len 32 \
    --profile --profile-steps 8 --out "$OUT/one_batch_profile.json"
grep -A 14 "^top kernels" "$LOG" | tail -n 30 > "$OUT/top_kernels.txt"

# Small-M kernels: time every candidate per projection shape (issues 13 and 16); with
# TUNE_INSTALL=1 the winners replace this GPU's plan in the tree before the FP8 runs use it.
TUNED="$OUT/tuned_plan.json"
[ "${TUNE_INSTALL:-0}" = 1 ] && TUNED="radixlm/model/layers/tuned/$("$PY" -c \
  "import torch; from radixlm.model.layers.tuned import device_slug; print(device_slug(torch.cuda.get_device_name()))").json"
[ "${SKIP_TUNE:-0}" = 1 ] || run "${BENCH[@]}" fp8-gemm --random-model "$PRESET" --ms 1 2 4 8 16 \
    --tune-out "$TUNED" --out "$OUT/fp8_gemm.json"
run "${BENCH[@]}" one-batch "${MODEL[@]}" --batch-sizes 1 ${OB_BS##* } --input-lens "$OB_IN" \
    --output-len "$OB_OUT" --quantization fp8 --out "$OUT/one_batch_fp8.json"

# Constrained decoding against a matched unconstrained control (issue 12).
SCHEMA='{"type":"object","properties":{"name":{"type":"string","maxLength":32},"age":{"type":"integer"},"tags":{"type":"array","items":{"type":"string","maxLength":16},"maxItems":5}},"required":["name","age","tags"],"additionalProperties":false}'
CON=(--num-requests 256 --input-len 512 --output-len 128 --matched-control)
run "${BENCH[@]}" offline "${MODEL[@]}" "${CON[@]}" --json-schema "$SCHEMA" --out "$OUT/constrained_json.json"
run "${BENCH[@]}" offline "${MODEL[@]}" "${CON[@]}" --regex '[0-9a-f]{128}' --out "$OUT/constrained_regex.json"

OFF=(--dataset random --num-requests "$OFFLINE_N" --input-len "$IN_LEN" --output-len "$OUT_LEN")
run "${BENCH[@]}" offline "${MODEL[@]}" "${OFF[@]}" --out "$OUT/offline.json"
run "${BENCH[@]}" offline "${MODEL[@]}" "${OFF[@]}" --engine-process --out "$OUT/offline_engine.json"

PFX=(--dataset shared-prefix --groups "$PREFIX_GROUPS" --prompts-per-group 16 --system-len "$SYS_LEN"
     --question-len 128 --output-len "$OUT_LEN")
run "${BENCH[@]}" offline "${MODEL[@]}" "${PFX[@]}" --disable-radix-cache --out "$OUT/prefix_off.json"
run "${BENCH[@]}" offline "${MODEL[@]}" "${PFX[@]}" --out "$OUT/prefix_on.json"

step "serve $MODEL_DIR on port $PORT"
"$PY" -m radixlm serve --model "$MODEL_DIR" --dtype "$DTYPE" --port "$PORT" \
    --log-level warning > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 300); do
  "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" \
      2> /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server died: see $OUT/server.log"; tail "$OUT/server.log"; exit 1; }
  sleep 1
done
URL=(--base-url "http://127.0.0.1:$PORT")
run "${BENCH[@]}" serving "${URL[@]}" --backend native --dataset random --num-requests "$OFFLINE_N" \
    --input-len "$IN_LEN" --output-len "$OUT_LEN" --max-concurrency 512 --out "$OUT/serving_c512.json"
run "${BENCH[@]}" serving "${URL[@]}" --backend openai --dataset random --num-requests "$SERVE_C1_N" \
    --input-len "$OB_IN" --output-len "$OB_OUT" --max-concurrency 1 --out "$OUT/serving_c1.json"
kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; trap - EXIT

# HF generate last (torch.compile of each batch size takes minutes): the same one-batch cases,
# then HF on the same prompts.
if [ ${#HF[@]} -gt 0 ]; then
  run "${BENCH[@]}" one-batch "${MODEL[@]}" --batch-sizes $OB_BS --input-lens "$OB_IN" \
      --output-len "$OB_OUT" "${HF[@]}" --out "$OUT/one_batch_hf.json"
fi

step "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(v, nd=0):
    return "-" if v is None else f"{v:,.{nd}f}"


lines = [("workload", "radixlm", "roofline %", "notes")]
ob = load("one_batch.json")
if ob:
    for r in ob["results"]:
        lines.append((f"one-batch bs{r['batch']} {r['input_len']}/{r['output_len']} decode tok/s",
                      fmt(r["decode_tok_s"]), fmt(r["decode_roof_pct"], 1),
                      f"out tok/s {fmt(r['output_tok_s'])} ({fmt(r['roof_pct'], 1)}% roof)"))
hf = load("one_batch_hf.json")
if hf:
    for h in hf.get("hf_baseline", []):
        lines.append((f"HF {h['variant']} bs{h['batch']} out tok/s", fmt(h["output_tok_s"]), "",
                      f"radixlm x{h['radixlm_speedup']:.2f} (same run)"))
prof = load("one_batch_profile.json")
if prof:
    for r in prof["results"]:
        p = r.get("profile", {})
        if p.get("profiled_steps"):
            lines.append((f"profile bs{r['batch']}: kernel ms / step wall ms",
                          f"{p['kernel_ms_per_step']:.2f} / {p['step_wall_ms']:.2f}",
                          fmt(100 * p["kernel_ms_per_step"] / p["step_wall_ms"], 1),
                          "kernel share of the step"))
fp8 = load("one_batch_fp8.json")
if fp8 and ob:
    bf16 = {r["batch"]: r["decode_tok_s"] for r in ob["results"]}
    for r in fp8["results"]:
        if r["batch"] in bf16:
            lines.append((f"one-batch FP8 bs{r['batch']} decode tok/s", fmt(r["decode_tok_s"]),
                          fmt(r["decode_roof_pct"], 1),
                          f"{r['decode_tok_s'] / bf16[r['batch']]:.2f}x bf16 (target bs1 >= 1.7x)"))
for name, label in [("constrained_json.json", "JSON schema vs matched control"),
                    ("constrained_regex.json", "regex vs matched control")]:
    d = load(name)
    if d and d.get("matched_control"):
        c = d["matched_control"]
        lines.append((label, f"{c['output_tok_s_ratio']:.3f}x", "",
                      f"TTFT p50 {c['ttft_p50_ratio']:.3f}x (targets >= 0.9x, <= 1.2x)"))
offline = {}
for name, label in [("offline.json", "offline in-process"),
                    ("offline_engine.json", "offline --engine-process"),
                    ("prefix_off.json", "shared prefix radix off"),
                    ("prefix_on.json", "shared prefix radix on")]:
    d = load(name)
    if d:
        r = d["results"][0]
        offline[name] = r["output_tok_s"]
        note = f"{r['requests']} req, aborted {r['aborted']}, hit {r['cache_hit_rate']:.2f}"
        lines.append((label + " out tok/s", fmt(r["output_tok_s"]), fmt(r["roof_pct"], 1), note))
if "prefix_off.json" in offline and "prefix_on.json" in offline:
    lines.append(("shared prefix: on / off", f"{offline['prefix_on.json'] / offline['prefix_off.json']:.2f}x",
                  "", "target >= 3.5x"))
for name, label in [("serving_c512.json", "serving native c512"),
                    ("serving_c1.json", "serving openai c1")]:
    d = load(name)
    if d:
        s = d["summary"]
        share = ""
        if name == "serving_c512.json" and "offline.json" in offline:
            share = f"{100 * s['output_tok_s'] / offline['offline.json']:.1f}% of offline (>= 95)"
        lines.append((label + " out tok/s", fmt(s["output_tok_s"]), "",
                      f"TTFT p50 {fmt(s['ttft_p50_ms'])} ms, ITL p50 {fmt(s['itl_p50_ms'], 2)} / "
                      f"p99 {fmt(s['itl_p99_ms'], 1)} ms, failed {s['failed']} {share}"))
widths = [max(len(str(row[i])) for row in lines) for i in range(4)]
for row in lines:
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
EOF
step "done in $(( $(date +%s) - START )) s; JSON, logs and traces in $OUT"
