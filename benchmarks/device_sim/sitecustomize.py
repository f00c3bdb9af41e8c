"""The device runbook's dry run: packages the device image lacks are made unimportable (benchmarks/run_device.sh
puts this folder first on PYTHONPATH with --dry-run), so a CPU rehearsal fails where the device would.

The device has no package registry. Its image (the device README's KINDS.md, package list read 2026-11-17) has
torch, triton, transformers, numpy, scipy, matplotlib, pyyaml, tqdm, safetensors, pytest and pytest-benchmark, but
none of fastrm's dependencies below. ``sys.modules[name] = None`` makes ``import name`` raise ImportError and
``importlib.util.find_spec(name)`` return None, as for a package that is not installed (transformers' availability
probes see it as absent too).
"""

import sys

ABSENT_ON_DEVICE = ("datasets", "ray", "trl", "fastapi", "uvicorn", "flash_attn", "gguf")
for _name in ABSENT_ON_DEVICE:
    sys.modules.setdefault(_name, None)
