"""Download one file into a volume (initContainer helper of the circuits chart).

Promise: after a zero exit, DEST exists, is complete (written to a temporary name, then renamed)
and, when --sha256 is given, matches it. An existing DEST that matches (or any existing DEST when
no checksum is given) is kept. Standard library only: runs in any circuits image.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.request


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--sha256", default="")
    args = parser.parse_args()
    want = args.sha256.lower()

    if os.path.exists(args.dest) and (not want or sha256_of(args.dest) == want):
        print(f"{args.dest} already present", flush=True)
        return 0

    partial = f"{args.dest}.partial"
    os.makedirs(os.path.dirname(os.path.abspath(args.dest)), exist_ok=True)
    print(f"downloading {args.url} -> {args.dest}", flush=True)
    try:
        with urllib.request.urlopen(args.url, timeout=60) as response, open(partial, "wb") as out:
            done = 0
            for block in iter(lambda: response.read(1 << 22), b""):
                out.write(block)
                done += len(block)
                if done % (1 << 30) < len(block):
                    print(f"  {done >> 20} MiB", flush=True)
    except OSError as exc:
        print(f"error: download of {args.url} failed: {exc}", file=sys.stderr)
        return 1
    if want and sha256_of(partial) != want:
        os.remove(partial)
        print(f"error: {args.url}: sha256 mismatch (expected {want})", file=sys.stderr)
        return 1
    os.replace(partial, args.dest)
    print(f"done: {os.path.getsize(args.dest)} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
