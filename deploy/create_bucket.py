"""Create the sarcube bucket on an S3-compatible endpoint (idempotent); the compose stack's
bucket-init step.

Waits for the object store to answer (it may still be starting), then creates the bucket unless it
exists. Everything comes from the environment, the same variables every sarcube process reads:

    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   credentials (the compose env file, deploy/.env)
    AWS_ENDPOINT_URL                           endpoint, e.g. http://s3:8333 (SeaweedFS in compose)
    SARCUBE_BUCKET                             bucket name (default: sarcube)

    python deploy/create_bucket.py [BUCKET] [--timeout SECONDS]

Exit status 0 when the bucket exists at the end, 1 otherwise (one line saying why; the
credentials are never printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


def ensure_bucket(bucket: str, endpoint: str | None = None, timeout_s: float = 120.0) -> str:
    """Create ``bucket`` unless it exists; retry until the endpoint answers or ``timeout_s``.

    Returns ``"created"`` or ``"exists"``. Raises the last error after the timeout.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            try:
                client.head_bucket(Bucket=bucket)
                return "exists"
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            try:
                client.create_bucket(Bucket=bucket)
            except ClientError as e:  # a concurrent init got there first
                if e.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                ):
                    raise
                return "exists"
            return "created"
        except (BotoCoreError, ClientError) as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                raise  # wrong credentials do not get better by waiting
            if time.monotonic() >= deadline:
                raise
            time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bucket", nargs="?", default=os.environ.get("SARCUBE_BUCKET") or "sarcube")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the endpoint")
    args = p.parse_args(argv)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("AWS_SECRET_ACCESS_KEY"):
        print(
            "create_bucket: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set (deploy/.env)",
            file=sys.stderr,
        )
        return 1
    try:
        state = ensure_bucket(args.bucket, endpoint, args.timeout)
    except Exception as e:  # one line, no traceback: this is a set-up step
        print(
            f"create_bucket: s3://{args.bucket} at {endpoint or 'AWS'}: {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1
    print(f"create_bucket: s3://{args.bucket} {state} at {endpoint or 'AWS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
