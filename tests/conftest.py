"""Every test runs on 8 emulated CPU devices, so each sharding path is exercised."""

import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
  "HF_HUB_OFFLINE", "1"
)  # timm must never wait on a model hub (none is reachable)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
