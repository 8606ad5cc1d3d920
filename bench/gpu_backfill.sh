#!/usr/bin/env bash
# bench/backfill.py on a GPU machine: the real worker (bench/worker_api.py around runpod_worker.handler)
# on the GPU, thumbnails served by the embedded storage on the same machine, the engine and embedded
# Postgres beside them; then the loopback bench and the worker's bytes-only figure, in the same call.
#
#   run from the repo root, with the pipeline's wheels for the machine's Python in .whl/ (see
#   /work/.library/device/README.md); prints everything and copies it to $OUT/gpu_backfill.log.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log=${OUT:-/tmp}/gpu_backfill.log
work=$(mktemp -d /tmp/hxg-XXXX)
chmod 755 "$work"
{
nvidia-smi -L
python3 - "$work/vit-b-32-random.safetensors" <<'PY'
import sys, open_clip, torch
from safetensors.torch import save_file
torch.manual_seed(0)
model = open_clip.create_model("ViT-B-32", pretrained=None)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
PY
export CLIP_MODEL_NAME=ViT-B-32 CLIP_PRETRAINED="$work/vit-b-32-random.safetensors"
export EMBEDDING_HMAC_SECRET=gpu-bench-secret CLIP_DEVICE=cuda IMAGE_ALLOW_PRIVATE_HOSTS=true
export IMAGE_HOST_ALLOWLIST= WORKER_CONCURRENCY=${WORKER_CONCURRENCY:-4} IMAGE_DOWNLOAD_CONCURRENCY=64
# One storage process serves ~3,000 thumbnails/s (bench/fetch.py): 4 for the 5,000 img/s goal.
export HEIMDEX_STORAGE_WORKERS=${HEIMDEX_STORAGE_WORKERS:-4}
python3 bench/worker_api.py --port-file "$work/port" > "$work/worker.log" 2>&1 &
worker=$!
for _ in $(seq 300); do [ -s "$work/port" ] && break; sleep 0.2; done
[ -s "$work/port" ] || { echo "worker did not start"; cat "$work/worker.log"; exit 1; }
echo "== engine -> real worker on the GPU (thumbnails 480x270 from the embedded storage, every URL fetched)"
timeout 300 python3 bench/backfill.py --endpoint "http://127.0.0.1:$(cat "$work/port")" \
  --in-flight "${IN_FLIGHT:-4}" --write-threads "${WRITE_THREADS:-12}" --today-videos 40
echo "worker: $(python3 -c "import httpx,sys; print(httpx.get('http://127.0.0.1:'+sys.argv[1]+'/stats').text)" "$(cat "$work/port")")"
kill $worker
echo "== engine -> loopback endpoint (200 ms per job), same machine"
timeout 200 python3 bench/backfill.py --write-threads "${WRITE_THREADS:-12}"
echo "== the worker's downloads from the embedded storage: its fetcher vs bare httpx GETs"
timeout 120 python3 bench/fetch.py --concurrency 16 64 256
echo "== the worker's bytes-only figure (480x270 thumbnails)"
timeout 120 python3 bench/worker.py --device cuda --size 480x270 --checkpoint "$CLIP_PRETRAINED"
} 2>&1 | tee "$log"
