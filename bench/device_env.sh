# Sourced by the bench/device_*.sh scripts (repo root): $OUT, the packages the device machine lacks
# (wheels carried in .whl/, installed into /tmp/site), the repo on PYTHONPATH, a kernel build cache,
# and NVLink multicast kept off on multi-GPU hosts.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 VISION_RWKV_CACHE=${VISION_RWKV_CACHE:-/tmp/vrcache}
