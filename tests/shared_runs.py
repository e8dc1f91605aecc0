"""Runs shared by several tests (trained or written once by a module- or session-scoped fixture)
are read-only for those tests: a test that writes into a run (evaluates it into its eval/ folder,
appends to its metrics.jsonl, resumes it, deletes from it) works on its own copy, so that no test
sees another's side effects whatever order they run in."""
import os
import shutil


def own_copy(run: str, tmp_path) -> str:
    """A copy of the run folder `run` in `tmp_path` (a folder of the calling test's own)."""
    return shutil.copytree(run, os.path.join(str(tmp_path), "copy_of_" + os.path.basename(os.path.normpath(run))))
