"""Hashes of every file under a folder: "nothing was changed" as an assertion."""
import hashlib
import os


def tree_digest(folder: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (symlinks followed)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out
