#!/usr/bin/env bash
# `make load-test`: start workers on a model, offer the default load profile (with a burst), write the
# report under reports/, stop the workers (SIGTERM: they drain).
#
# Environment (all optional):
#   LOADTEST_WORKERS      workers to start (default 1)
#   LOADTEST_MODEL        model folder or .onnx file (default models/all-MiniLM-L6-v2; built by `make model`)
#   LOADTEST_QUEUE        request queue (default loadtest; purged before the run)
#   LOADTEST_ARGS         extra `producer load-test` options, e.g. "--burst-rate-per-s 400 --rows 4"
#   LOADTEST_WORKER_ARGS  extra `worker run` options, e.g. "--max-batch 32"
#   LOADTEST_HTTP_PORT    HTTP port of the first worker (default 9100; the next ones count up)
#   LOADTEST_OUT          report folder (default reports/loadtest-<time>)
set -euo pipefail
bin="${BIN:-.venv/bin}"
workers="${LOADTEST_WORKERS:-1}"
model="${LOADTEST_MODEL:-models/all-MiniLM-L6-v2}"
queue="${LOADTEST_QUEUE:-loadtest}"
port="${LOADTEST_HTTP_PORT:-9100}"
out="${LOADTEST_OUT:-reports/loadtest-$(date +%Y%m%d-%H%M%S)}"
read -r -a load_args <<< "${LOADTEST_ARGS:-}"
read -r -a worker_args <<< "${LOADTEST_WORKER_ARGS:-}"

if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "load-test: LOADTEST_WORKERS is '$workers'; it must be a whole number of at least 1" >&2; exit 2
fi
scripts/ensure-broker.sh
if [[ ! -e "$model" ]]; then
  if [[ "$model" == "models/all-MiniLM-L6-v2" ]]; then
    echo "load-test: no model at $model; building it (make model)"
    "${MAKE:-make}" --no-print-directory model
  else
    echo "load-test: no model at $model; set LOADTEST_MODEL to a model folder or .onnx file" >&2; exit 2
  fi
fi

mkdir -p "$out"
pids=()
stop_workers() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_workers EXIT

echo "load-test: starting $workers worker(s) on $model, queue $queue; logs in $out/worker-*.log"
for ((i = 0; i < workers; i++)); do
  WORKER_LOG_FORMAT=json "$bin/worker" run --model "$model" --queue "$queue" --http-port $((port + i)) \
    "${worker_args[@]}" >"$out/worker-$((i + 1)).log" 2>&1 &
  pids+=("$!")
done

status=0
"$bin/producer" load-test --queue "$queue" --purge --wait-consumers "$workers" --out "$out" \
  --label "$workers worker(s) on $model; $(nproc) CPU(s); worker options: ${LOADTEST_WORKER_ARGS:-defaults}" \
  "${load_args[@]}" || status=$?

# What the workers counted, next to what the generator measured.
for ((i = 0; i < workers; i++)); do
  if command -v curl >/dev/null; then
    curl -sf "http://127.0.0.1:$((port + i))/metrics" >"$out/worker-$((i + 1)).metrics.txt" || true
  fi
done
stop_workers
trap - EXIT
echo "load-test: report in $out/ (report.md, report.json, report.png, samples.csv)"
exit "$status"
