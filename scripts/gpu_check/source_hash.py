"""The sha256 of csrc/ (paths and bytes), which marks what a prebuilt prunedm._C was compiled from.
make gpu-prebuild records it in .gpu/BUILD.json; gpu-check.sh rebuilds on the device when the tree's differs."""

from __future__ import annotations

import hashlib
import os
import sys


def csrc_sha256(root: str) -> str:
    digest = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(os.path.join(root, "csrc"))):
        dirs.sort()  # os.walk visits in this order: the hash must not depend on the filesystem's
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest.update(os.path.relpath(path, root).encode() + b"\0" + f.read())
    return digest.hexdigest()


if __name__ == "__main__":
    print(csrc_sha256(sys.argv[1] if len(sys.argv) > 1 else os.getcwd()))
