"""Print every figure the GPU collector reads from the real NVML on this machine, twice, a
second apart (GPM needs two samples). Needs only prometheus-client, psutil and nvidia-ml-py:

    python bench/nvml_probe.py          # or: python -m exporter.collectors.gpu
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.collectors.gpu import main

if __name__ == "__main__":
    raise SystemExit(main())
