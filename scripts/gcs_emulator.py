"""A Google Cloud Storage server on loopback, to try `gs://` paths without a bucket or credentials.

    python scripts/gcs_emulator.py --port 9023 --bucket my-bucket     # keeps running; Ctrl-C stops it

It prints the environment the storage clients read to reach it; paste those lines into the shell
that runs vlm_jax (docs/storage.md, "Trying it without a bucket"). The server keeps the objects in
memory (`--data DIR` keeps them on disk instead). Needs `gcp-storage-emulator` (in
requirements-test.txt). The tests start the same server in-process (fixture `gcs`, tests/conftest.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def sends_generation_headers() -> None:
    """GCS sends `x-goog-generation` with an object's data; the emulator does not, and tensorstore's
    conditional writes (orbax's OCDBT manifests) need it. Must run before the server module is
    imported (its route table holds the handler functions)."""
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "_with_generation", False):
        return
    real = objects.download

    def download(request, response, storage, *args, **kwargs):
        real(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the handler answered 404 already
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

    download._with_generation = True
    objects.download = download


def environment(url: str) -> dict[str, str]:
    """What each client reads to use the server at `url` (http://127.0.0.1:PORT) anonymously."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's arrays)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credentials lookup
        "GOOGLE_CLOUD_PROJECT": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: plain HTTP, no gRPC bucket-type probe
        "FSSPEC_GS_TOKEN": "anon",  # gcsfs through fsspec / etils: anonymous
        "FSSPEC_GCS_TOKEN": "anon",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/gcs_emulator.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9023)
    ap.add_argument("--bucket", default="my-bucket", help="a bucket created at start")
    ap.add_argument("--data", default="", help="keep objects in this folder (default: in memory)")
    args = ap.parse_args(argv)
    for name in ("gcp_storage_emulator", "gcp_storage_emulator.storage", "gcp_storage_emulator.server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sends_generation_headers()
    from gcp_storage_emulator.server import create_server

    server = create_server(args.host, args.port, in_memory=not args.data, default_bucket=args.bucket,
                           **({"data_dir": args.data} if args.data else {}))
    server.start()
    url = f"http://{args.host}:{server._api._httpd.server_address[1]}"
    print(f"# storage server for gs://{args.bucket} at {url}; in the shell that runs vlm_jax:")
    for k, v in environment(url).items():
        print(f"export {k}={v}")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
