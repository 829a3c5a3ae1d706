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


import pytest  # noqa: E402


def _emulator_sends_generation_headers():
    """The emulator patch users get from `scripts/gcs_emulator.py` (tensorstore's conditional
    manifest writes need `x-goog-generation`, which the emulator does not send)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gcs_emulator.py"
    spec = importlib.util.spec_from_file_location("gcs_emulator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.sends_generation_headers()


@pytest.fixture(scope="session")
def gcs():
    """A Google Cloud Storage server on loopback for this session (`gcp-storage-emulator`, in
    memory, in this process) with a bucket; returns its `gs://` URL. Every client in use is pointed
    at it by its own setting: gcsfs and google-cloud-storage by `STORAGE_EMULATOR_HOST` (anonymous),
    tensorstore (orbax's arrays) by `TENSORSTORE_GCS_HTTP_URL` with a fixed test token. gcsfs's
    default filesystem first probes the bucket type over gRPC (60 s per probe against a server
    without gRPC), so its plain HTTP `GCSFileSystem` is registered for `gs://` instead."""
    import logging

    import fsspec
    import gcsfs.core

    _emulator_sends_generation_headers()  # before the server module binds the handlers in its routes
    from gcp_storage_emulator.server import create_server

    for name in ("gcp_storage_emulator", "gcp_storage_emulator.storage", "gcp_storage_emulator.server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket="vlm-test")
    server.start()
    url = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GOOGLE_CLOUD_PROJECT": "test"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            for protocol in ("gs", "gcs"):
                fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
                mp.setitem(fsspec.config.conf, protocol, {"token": "anon"})
            yield "gs://vlm-test"
    finally:
        server.stop()
