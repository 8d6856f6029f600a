"""Test setup: 8 simulated CPU devices, so sharding and expert parallelism run for real."""

import os

# The simulated devices are threads that meet at every collective, and XLA ends the process when they have not
# all arrived within 40 s ("Termination timeout ... of 40 seconds exceeded"): a loaded 2-core machine reached that
# in the long fuzz run. A real hang still ends, after 10 minutes.
FLAGS = {"--xla_force_host_platform_device_count": "8", "--xla_cpu_collective_call_terminate_timeout_seconds": "600"}
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in FLAGS]
    + [f"{k}={v}" for k, v in FLAGS.items()]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
