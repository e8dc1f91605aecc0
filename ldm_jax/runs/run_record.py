"""A run's record in its workdir: the stored config (versioned, never overwritten), the changes
allowed on resume (`config_history.jsonl`), the lock that keeps a second trainer out, and which
stages have finished.

    <workdir>/config.json            the config the run was started with, plus "config_version"
    <workdir>/config_history.jsonl   one {"time", "key", "old", "new"} per change made on resume
    <workdir>/train.lock             held (flock) by the training process, with its pid
    <workdir>/progress.json          {"autoencoder": 1400, "ldm": 1600}: stages trained and evaluated

On resume (`check_resume`) the new config is compared with the stored one (plus its history).
Only the keys in `RESUMABLE` may differ: they change how long the run goes on, how it logs,
checkpoints, samples and evaluates, or where it runs, never what was trained. Any other
difference refuses before anything is written, naming each key with both values.

A stored config of an older `config_version` is brought to today's by `MIGRATIONS`: the keys that
configs/base.py gained since then, with the value that reproduces how such a run was trained, and
the values whose spelling changed (autoencoder.disc_start: -1 became None).
Anything else missing or unknown is an error naming the key (never today's default in silence).
"""
from __future__ import annotations

import datetime
import fcntl
import fnmatch
import json
import os
import socket

import ml_collections

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = "train.lock"
PROGRESS_FILE = "progress.json"

# Version 1: config.json as written until 2026-12 (no "config_version" key). Version 2 adds the key.
CONFIG_VERSION = 6


class Convert:
    """A migration that rewrites a stored value (the key exists in both versions, its meaning of
    a value changed): `convert(old value) -> new value`."""

    def __init__(self, convert, why: str):
        self.convert, self.why = convert, why


# MIGRATIONS[v]: what turns a config of version v into version v + 1: the keys version v lacks,
# with the value that reproduces how a version-v run was trained, and `Convert`s of values whose
# spelling changed (git log -p configs/base.py).
MIGRATIONS = {
    1: {
        # LPIPS was not implemented: lpips_weights had to be None, and the weight had no effect.
        "autoencoder.perceptual_weight": 1.0,
        # The token embedding table was trained with the rest of the text encoder.
        "text_encoder.train_token_embedding": True,
        # The step encoded each batch's images; there was no latent table.
        "train.cache_latents": False,
    },
    2: {
        "autoencoder.disc_start": Convert(lambda v: None if v == -1 else v, "-1 meant never; None says it now"),
    },
    3: {
        # The discrete schedule was the only process.
        "diffusion.process": "discrete",
        "diffusion.process_kwargs": {},
        "diffusion.timestep_kwargs": {},
        "diffusion.preconditioning": "none",
    },
    4: {
        # There was no LoRA: the UNet itself trained; and no prior-preservation weighting.
        "lora": {"enabled": False, "base": None, "rank": 4, "alpha": 4.0, "dropout": 0.0, "init": "kaiming",
                 "unet_targets": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": False,
                 "text_encoder_targets": ["q_proj", "k_proj", "v_proj", "out_proj"]},
        "dreambooth": {"class_prompt": None, "prior_loss_weight": 1.0},
    },
    5: {
        # AdamW's first moment was float32.
        "optim.mu_dtype": "float32",
    },
}

# Keys that may differ from the stored config when a run resumes (fnmatch patterns). They change
# how far the run goes, its logging, checkpointing, sampling and evaluation, or where it runs.
RESUMABLE = (
    "stages",  # e.g. add the diffusion stage to a run that trained the autoencoder only
    "train.steps", "train.log_every", "train.checkpoint_every", "train.sample_every",
    "train.keep_checkpoints", "train.max_nonfinite", "train.sample_prompts",
    "sampler.*",  # inference only: the sample grids and the end-of-run evaluation
    "eval.*",
    "data.num_workers", "data.data_dir",
    "mesh.*",
)


class RunConfigError(ValueError):
    """The stored config cannot be read, or the new one differs where it may not."""


class WorkdirInUseError(RuntimeError):
    """Another process holds the workdir's training lock."""


# ---------------------------------------------------------------------------------------------
# Flat views of configs


def _plain(tree):
    """JSON's view: tuples as lists (so stored and new configs compare)."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _has(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def config_as_json(config) -> dict:
    """The config as config.json stores it (plain dicts and lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return _plain(config)


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)


# ---------------------------------------------------------------------------------------------
# Reading and writing config.json


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # never a half-written file


def write_config(workdir: str, config) -> None:
    """Store `config` as the run's config.json (with the current config_version), atomically."""
    stored = {"config_version": CONFIG_VERSION, **config_as_json(config)}
    _write_atomic(os.path.join(workdir, CONFIG_FILE), json.dumps(stored, indent=1) + "\n")


def migrate(stored: dict, path: str, reference: dict, whole_groups) -> dict:
    """`stored` (config.json's dict, with its "config_version") as a config of today's version.

    Keys an older version lacks come from `MIGRATIONS`; any other key of `reference` (today's
    configs/base.py, as a dict) that is missing, or a key `reference` does not know, raises
    RunConfigError naming it. Groups in `whole_groups` (constructor arguments, free-form
    dicts) are taken as stored."""
    stored = dict(stored)
    version = stored.pop("config_version", 1)
    if not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise RunConfigError(f"{path}: config_version={version!r} is not one this ldm_jax reads "
                             f"(1 to {CONFIG_VERSION}); was the run written by a newer version?")
    for v in range(version, CONFIG_VERSION):
        for key, value in MIGRATIONS.get(v, {}).items():
            if isinstance(value, Convert):
                if _has(stored, key):
                    _set(stored, key, value.convert(_get(stored, key)))
            elif not _has(stored, key):
                _set(stored, key, value)
    _check_against(stored, reference, path, version, set(whole_groups), "")
    return stored


def _check_against(stored: dict, reference: dict, path: str, version: int, whole: set, prefix: str) -> None:
    for key in stored:
        if key not in reference:
            raise RunConfigError(f"{path}: unknown key {prefix}{key} (config_version {version}); this "
                                 "ldm_jax does not know it and has no migration for it")
    for key, ref in reference.items():
        name = f"{prefix}{key}"
        if key not in stored:
            raise RunConfigError(f"{path}: key {name} is missing (config_version {version}), and no "
                                 "migration gives the value it was trained with")
        if isinstance(ref, dict) and name not in whole:
            if not isinstance(stored[key], dict):
                raise RunConfigError(f"{path}: {name} must be a group (dict), got {stored[key]!r}")
            _check_against(stored[key], ref, path, version, whole, name + ".")


def read_stored_config(workdir: str) -> dict:
    """config.json's dict as written (with "config_version" if any); RunConfigError if it is
    unreadable, naming the file."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunConfigError(f"{path}: not valid JSON ({e}); the run's config is damaged: restore it "
                             "from a backup, or start a new run in another workdir") from None
    if not isinstance(stored, dict):
        raise RunConfigError(f"{path}: expected a JSON object (the run's config), got {type(stored).__name__}")
    return stored


def read_history(workdir: str) -> list[dict]:
    """config_history.jsonl's entries, oldest first (a torn last line from a kill is ignored)."""
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, cut short by a kill while appending
                continue
            raise RunConfigError(f"{path} line {i + 1}: not valid JSON") from None
        if not isinstance(entry, dict) or "key" not in entry or "new" not in entry:
            raise RunConfigError(f"{path} line {i + 1}: expected {{\"time\", \"key\", \"old\", \"new\"}}")
        entries.append(entry)
    return entries


def effective_config(stored: dict, history: list[dict]) -> dict:
    """The stored (migrated) config with the resume-time changes applied in order."""
    out = json.loads(json.dumps(stored))
    for entry in history:
        _set(out, entry["key"], entry["new"])
    return out


def load(workdir: str) -> dict:
    """The run's effective config as a dict: config.json, migrated to today's version and
    checked against configs/base.py's keys, with config_history.jsonl applied."""
    from ldm_jax import config as config_lib

    whole = set(config_lib.MODEL_GROUPS) | set(config_lib.DELEGATED) | set(config_lib.FREE_FORM)
    stored = migrate(read_stored_config(workdir), os.path.join(workdir, CONFIG_FILE),
                     config_lib.reference_config().to_dict(), whole)
    return effective_config(stored, read_history(workdir))


# ---------------------------------------------------------------------------------------------
# Resuming


def config_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every dotted key whose value differs (absent on one side: "(absent)")."""
    a, b = _flatten(_plain(old)), _flatten(_plain(new))
    missing = "(absent)"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def check_resume(workdir: str, config, effective: dict, also: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """The differences between the run's effective stored config and `config` if all of them
    may change on resume (see RESUMABLE, plus the keys or fnmatch patterns in `also`); else
    RunConfigError naming each other one. Nothing is written."""
    diffs = config_differences(effective, config_as_json(config))
    refused = [d for d in diffs if not resumable(d[0]) and not any(fnmatch.fnmatchcase(d[0], p) for p in also)]
    if refused:
        listed = "; ".join(f"{k}: stored {o!r}, given {n!r}" for k, o, n in refused)
        raise RunConfigError(
            f"workdir {workdir} holds a run trained with another config ({listed}). These keys change "
            "what the run trains, so it cannot resume with them; nothing was written. Start a new run "
            "with another --workdir, or resume with the stored values (config.json). Keys that may "
            f"change on resume: {', '.join(RESUMABLE + tuple(also))}")
    return diffs


def append_history(workdir: str, diffs) -> None:
    """One line per (key, old, new) in config_history.jsonl, stamped with the time."""
    if not diffs:
        return
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
        for key, old, new in diffs:
            f.write(json.dumps({"time": now, "key": key, "old": old, "new": new}) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# The lock


class WorkdirLock:
    """An exclusive flock on <workdir>/train.lock for the life of a training process (released by
    the kernel if the process dies). A second process gets WorkdirInUseError naming the first's
    pid. Only process 0 of a multi-process run takes it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise WorkdirInUseError(
                f"workdir {os.path.dirname(self.path)} is in use by another training process ({holder}; "
                f"lock {self.path}); wait for it to finish, stop it, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------
# Progress


def read_progress(workdir: str) -> dict:
    path = os.path.join(workdir, PROGRESS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            progress = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # written atomically; unreadable only if damaged by hand: redo the evaluations
    return progress if isinstance(progress, dict) else {}


def mark_finished(workdir: str, stage: str, step: int) -> None:
    """Record that `stage` trained to `step` and its end-of-stage evaluation was written."""
    progress = read_progress(workdir)
    progress[stage] = int(step)
    _write_atomic(os.path.join(workdir, PROGRESS_FILE), json.dumps(progress) + "\n")


def is_finished(workdir: str, stage: str, step: int) -> bool:
    return read_progress(workdir).get(stage) == int(step)
