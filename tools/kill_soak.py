"""Random-kill soak: train a tiny config, SIGKILL the trainer at random moments (some of them while
a checkpoint is being written), resume each time, and check that the result equals an
uninterrupted run bit for bit.

    python tools/kill_soak.py --kills 10 --root /tmp/soak [--seed 0] [--ldm_steps 40] [--json out.json]

Two runs of the same tiny config (the one-level UNet of the tests, 4 autoencoder and 40
diffusion steps on a 600-image shapes build, a checkpoint every 2 steps, a metrics row every
step) through the `python -m ldm_jax.train` command line: a reference run left alone, and a run
killed `--kills` times and restarted after each kill until it finishes by itself. A kill waits
for one of: a random number of new metrics rows, the moment a checkpoint's temporary folder
appears (orbax writes there, then renames), or a random delay (also during start-up). Checked at
the end:

- the final checkpoints of both stages (parameters, EMA, optimiser state, step, rng, the data
  iterator's state) are equal to the reference's, bitwise;
- metrics.jsonl holds the same rows, bitwise, apart from the timing columns (images_per_s,
  step_time_s);
- after every kill, the next start resumed from the newest checkpoint on disk (no completed
  checkpoint was lost or skipped).

Prints a table of the kills and exits 1 if any check fails. The tests run it with 2 kills (tests/training/test_soak.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("images_per_s", "step_time_s")

# The tests' tiny config (tests/training/tiny.py: tiny_config, on configs/base_discrete.py, with the
# one-level UNet), without the latent table.
CONFIG = '''"""The kill soak's tiny config (written by tools/kill_soak.py)."""
import importlib.util

def get_config():
    spec = importlib.util.spec_from_file_location("base", {base!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.data_dir = {data_dir!r}
    c.data.batch_size = 8
    c.data.options = dict(image_size=32, train_size=600, test_size=200, heldout_size=120)
    c.autoencoder.model = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                               norm_num_groups=8, mid_block_add_attention=False)
    c.autoencoder.steps = {ae_steps}
    c.autoencoder.batch_size = 8
    c.autoencoder.optim.warmup_steps = 0
    c.text_encoder.model = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu")
    c.unet = dict(block_out_channels=(16,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), num_attention_heads=2, cross_attention_dim=16,
                  norm_num_groups=8, dropout=0.0)
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.sampler.num_steps = 3
    c.train.steps = {ldm_steps}
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 3
    c.train.sample_every = 1000
    c.train.cache_latents = False  # every start would encode the split again (seconds, under the tests' cheap XLA)
    c.train.sample_prompts = ("a red circle on the left", "a blue square at the top")
    c.eval.splits = ()
    return c
'''


def write_config(root: str, ae_steps: int, ldm_steps: int, data_dir: str | None = None) -> str:
    path = os.path.join(root, "soak_config.py")
    with open(path, "w") as f:
        f.write(CONFIG.format(base=os.path.join(ROOT, "configs", "base_discrete.py"),
                              data_dir=data_dir or os.path.join(root, "datasets"), ae_steps=ae_steps,
                              ldm_steps=ldm_steps))
    return path


def start(config: str, workdir: str, env: dict, log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "ldm_jax.train", "--config", config, "--workdir", workdir],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def metric_rows(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


def tmp_folders(workdir: str) -> set[str]:
    """orbax's temporary step folders (a checkpoint being written, or left by an earlier kill)."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return set()
    return {os.path.join(stage, name) for stage in os.listdir(folder) if os.path.isdir(os.path.join(folder, stage))
            for name in os.listdir(os.path.join(folder, stage)) if "tmp" in name}


def latest_complete(workdir: str) -> dict:
    """{stage: newest step whose checkpoint is complete} (what a resume must start from)."""
    from ldm_jax.runs.checkpoint import DamagedCheckpointError, step_folders, verify

    out = {}
    for stage in ("autoencoder", "ldm"):
        folder = os.path.join(workdir, "checkpoints", stage)
        for step in reversed(step_folders(folder)):
            try:
                verify(os.path.join(folder, str(step)))
            except DamagedCheckpointError:
                continue
            out[stage] = step
            break
    return out


def kill_when(proc: subprocess.Popen, workdir: str, mode: str, rng: random.Random, timeout: float) -> str | None:
    """Wait for the moment `mode` picks, then SIGKILL; None if the run ended first."""
    deadline = time.time() + timeout
    rows0 = metric_rows(workdir)
    wait_rows, wait_saves = rng.randint(1, 5), rng.randint(1, 3)
    delay = time.time() + rng.uniform(0.5, 8.0)
    saves, was_saving = 0, False
    leftover = tmp_folders(workdir)  # from an earlier kill; this start removes them

    def saving() -> bool:
        return bool(tmp_folders(workdir) - leftover)

    while time.time() < deadline:
        if proc.poll() is not None:
            return None
        if mode == "rows" and metric_rows(workdir) >= rows0 + wait_rows:
            break
        if mode == "save":
            now_saving = saving()
            saves += now_saving and not was_saving
            was_saving = now_saving
            if now_saving and saves >= wait_saves:
                break
        if mode == "time" and time.time() >= delay:
            break
        time.sleep(0.001 if mode == "save" else 0.02)
    else:
        proc.kill()
        raise RuntimeError(f"no {mode!r} moment within {timeout} s")
    during_save = saving()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "during a checkpoint write" if during_save else mode


def read_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if not k.endswith(TIMING)} for row in rows]


def final_states(workdir: str) -> dict:
    from ldm_jax.runs.checkpoint import StageCheckpoints

    out = {}
    for stage in ("autoencoder", "ldm"):
        ckpt = StageCheckpoints(workdir, stage)
        out[stage] = ckpt.restore_raw()
        ckpt.close()
    return out


def compare_states(a: dict, b: dict) -> list[str]:
    import jax

    problems = []
    for stage in a:
        (sa, da, ma), (sb, db, mb) = a[stage], b[stage]
        la, lb = jax.tree_util.tree_flatten_with_path(sa)[0], jax.tree_util.tree_flatten_with_path(sb)[0]
        if [p for p, _ in la] != [p for p, _ in lb]:
            problems.append(f"{stage}: the state trees differ")
            continue
        for (path, x), (_, y) in zip(la, lb):
            x, y = np.asarray(x), np.asarray(y)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                problems.append(f"{stage}: {jax.tree_util.keystr(path)} differs")
        if da != db:
            problems.append(f"{stage}: the data iterator states differ")
        if ma != mb:
            problems.append(f"{stage}: the checkpoint metadata differ")
    return problems


def soak(root: str, kills: int, seed: int = 0, env: dict | None = None, ae_steps: int = 4, ldm_steps: int = 12,
         timeout: float = 600.0, data_dir: str | None = None) -> dict:
    """Run the soak in `root` (see the module docstring); returns the report dict. `data_dir`:
    where the shapes build is (or goes; default `root`/datasets)."""
    os.makedirs(root, exist_ok=True)
    env = dict(env or os.environ)
    config = write_config(root, ae_steps, ldm_steps, data_dir)
    reference, soaked = os.path.join(root, "reference"), os.path.join(root, "soaked")
    t0 = time.time()
    proc = start(config, reference, env, os.path.join(root, "reference.log"))
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"the reference run failed: see {os.path.join(root, 'reference.log')}")
    reference_s = time.time() - t0

    rng = random.Random(seed)
    # At least a third of the kills wait for a checkpoint write; the rest for rows or time.
    modes = ["save"] * max(1, kills // 3) + rng.choices(["rows", "time"], weights=[4, 1], k=kills - max(1, kills // 3))
    rng.shuffle(modes)
    events, attempt, expected = [], 0, None
    while True:
        log_path = os.path.join(root, f"soaked_{attempt}.log")
        proc = start(config, soaked, env, log_path)
        killed = None
        if attempt < len(modes):
            killed = kill_when(proc, soaked, modes[attempt], rng, timeout)
        else:
            proc.wait(timeout=timeout)
        with open(log_path) as f:
            out = f.read()
        resumed = {m.group(1): int(m.group(2)) for m in re.finditer(r"(autoencoder|ldm): resumed from step (\d+)", out)}
        if events:
            events[-1]["next_start_resumed"] = resumed
        if expected is not None:  # this start resumed each stage from the newest checkpoint on disk
            for stage, step in expected.items():
                if stage in resumed and resumed[stage] != step:
                    events[-1]["lost"] = f"{stage}: resumed from {resumed[stage]}, the newest complete was {step}"
                if killed is None and stage not in resumed:
                    events[-1]["lost"] = f"{stage}: the last start did not resume from step {step}"
        if killed is None:
            if proc.returncode != 0:
                raise RuntimeError(f"the soaked run failed after {attempt} kills: see {log_path}")
            break
        expected = latest_complete(soaked)
        events.append({"kill": attempt + 1, "moment": killed, "rows": metric_rows(soaked),
                       "checkpoints": dict(expected)})
        attempt += 1

    problems = compare_states(final_states(reference), final_states(soaked))
    if read_rows(reference) != read_rows(soaked):
        problems.append("metrics.jsonl rows differ")
    problems += [e["lost"] for e in events if "lost" in e]
    return {"kills": len(events), "during_checkpoint_writes": sum(e["moment"] == "during a checkpoint write"
                                                                 for e in events),
            "restarts": attempt, "events": events, "problems": problems, "bitwise_equal": not problems,
            "reference_s": reference_s, "total_s": time.time() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--root", required=True, help="a new folder for the two runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ldm_steps", type=int, default=40, help="diffusion steps (enough to outlast the kills)")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    if os.path.exists(args.root) and os.listdir(args.root):
        parser.error(f"--root {args.root} is not empty")
    report = soak(args.root, args.kills, args.seed, ldm_steps=args.ldm_steps)
    print(f"{'kill':>4}  {'moment':<26} {'rows':>4}  {'complete checkpoints':<34} the next start resumed from")
    for e in report["events"]:
        print(f"{e['kill']:>4}  {e['moment']:<26} {e['rows']:>4}  {str(e['checkpoints']):<34} "
              f"{e.get('next_start_resumed')}")
    print(f"{report['kills']} kills ({report['during_checkpoint_writes']} during checkpoint writes); "
          f"bitwise equal to the uninterrupted run: {report['bitwise_equal']}; "
          f"{report['total_s']:.0f} s (reference run {report['reference_s']:.0f} s)")
    for p in report["problems"]:
        print("problem:", p)
    if args.json:
        import platform

        import jax

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        record = {"command": " ".join([sys.executable, *sys.argv]), "commit": commit.stdout.strip(),
                  "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
                  "versions": {"jax": jax.__version__, "python": platform.python_version()}, **report}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if report["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
