"""Test setup: 8 fake CPU devices and fp32-exact matmuls, before JAX is imported anywhere; a
session-private VLM_JAX_HOME (default data directory and compilation cache)."""

import os
import tempfile

# The one default data directory / compilation cache (vlm_jax.paths) of this test session, never ~;
# each pytest-xdist worker its own (workers inherit the controller's environment).
if os.environ.get("PYTEST_XDIST_WORKER") or "VLM_JAX_HOME" not in os.environ:
    os.environ["VLM_JAX_HOME"] = tempfile.mkdtemp(prefix="vlm_jax_home_")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the planner tests beside another libtpu user
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")  # quiets libtpu (installed for the planner)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
