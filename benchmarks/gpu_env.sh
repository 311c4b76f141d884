# Sourced by the GPU scripts: nothing comes from the network there. The lent GPU machine has CUDA
# torch, triton and CPU onnxruntime; the project's other pure-Python dependencies travel as wheels
# in .whl/ and are installed offline. Unbuffered output, and the card named first.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
