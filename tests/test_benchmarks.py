"""Smoke tests of the benchmark scripts in benchmarks/: each runs end to end at its smallest setting
(the 1-level `micro` UNet, batch 1-2, one or two timed repetitions) and writes the results file
it should. They measure nothing: the numbers only have to be positive and well-formed.

What can fail beyond "it ran": the two sides of a comparison must hold the same architecture
(equal parameter counts) and compute the same thing from the same weights and inputs (the training
step's first losses and gradient norms, the sampler's images); the warm compile run must find the
cold run's programs in the persistent cache; gpu.py must exit 0 without writing on a machine with
no GPU; bad flags fail naming the flag.

The scripts' worker processes compile with XLA's cheapest settings (see `cheap_xla`); compilation,
not the measurement, is what these tests spend their time on. base_run.py is the exception: its
training command takes minutes even at 2 steps, so only its reading of a finished run is tested,
on the files and log lines such a run leaves.
"""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")  # the side-by-side scripts need the parity extra
pytest.importorskip("diffusers")

import benchmarks.compile as compile_benchmark  # noqa: E402
from benchmarks import base_run, common, gpu, memory, pod_plan, sampling, train_step  # noqa: E402

CHEAP_XLA = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
             "--xla_cpu_use_fusion_emitters=false")


@pytest.fixture
def cheap_xla(monkeypatch):
    """Worker processes (they inherit the environment) skip XLA's expensive backend passes, which
    halves compile times; this process's backend is already up, so it is not affected."""
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_XLA}".strip())


def read(path):
    """A results file, after checking it says where it came from: the machine, the versions and the
    command that wrote it (every smoke test passes --out, so the command must show it)."""
    data = json.loads(path.read_text())
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["versions"]["jax"] and machine["date"]
    assert machine["memory_bytes"] > 0 and set(data["git"]) == {"commit", "dirty"}
    assert data["command"].startswith(f"python benchmarks/{data['benchmark']}.py ")
    assert f"--out {path.parent}" in data["command"]
    return data


def test_train_step_smoke(tmp_path, cheap_xla):
    from benchmarks import flops

    train_step.main(["--sizes", "micro", "--steps", "2", "--warmup", "1", "--matmul_sizes", "256",
                     "--out", str(tmp_path)])
    data = read(tmp_path / "train_step.json")
    assert data["benchmark"] == "train_step" and data["settings"]["steps"] == 2
    assert data["settings"]["matmul_sizes"] == [256]
    (row,) = data["rows"]
    assert (row["size"], row["batch"], row["latents"]) == ("micro", 2, [8, 8, 4])
    ours, ref = row["ldm_jax"], row["diffusers"]
    assert "error" not in ours and "error" not in ref
    assert ours["unet_params"] == ref["unet_params"] > 0  # one architecture on both sides
    # Same weights, batch, t and noise: both sides' first three steps (the third after an update at
    # the warm-up's learning rate) give the same losses and gradient norms. Measured: <= 2e-7
    # relative; a 10% larger learning rate on one side moves the third loss by 5e-5.
    assert len(ours["parity_loss"]) == len(ref["parity_loss"]) == train_step.PARITY_STEPS == 3
    for key in ("parity_loss", "parity_grad_norm"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=0)
    assert all(0.5 < v < 5 for v in ours["parity_loss"])  # eps-MSE of a random UNet, 1 + E[pred^2]: not 0
    assert all(v > 0.1 for v in ours["parity_grad_norm"])
    assert len(set(ours["parity_loss"])) == 3  # three different steps, not one value repeated
    assert max(row["parity_rel_diff"].values()) < 1e-5
    for r in (ours, ref):
        assert r["step_s"] > 0 and r["peak_rss_mib"] > 0
    assert ours["finite"] and ours["compile_s"] > 0 and ours["compiled_flops"] > 0
    assert row["time_ratio"] == pytest.approx(ours["step_s"] / ref["step_s"])
    # FLOPs: the analytic count is the lowered step's dots and convolutions exactly; XLA's whole count
    # adds the elementwise ops. Each side's rate is read against its own library's matmul peak.
    assert row["model_flops"] == flops.train_step_flops(common.size_config("micro")) == ours["xla_matmul_flops"]
    assert row["xla_over_model"] == 1.0 and row["model_flops"] < ours["lowered_flops"]
    peaks = data["matmul_peak_flops_per_s"]
    for side, r in (("ldm_jax", ours), ("diffusers", ref)):
        assert peaks[side] > 0 and r["matmul_peak_flops_per_s"] == peaks[side]
        assert r["flops_per_s"] == pytest.approx(row["model_flops"] / r["step_s"])
        assert r["peak_fraction"] == pytest.approx(r["flops_per_s"] / peaks[side])
        assert r["cpu_peak_fraction"] == pytest.approx(r["flops_per_s"] / max(peaks.values()))


def test_sampling_smoke(tmp_path):
    sampling.main(["--sizes", "micro", "--samplers", "dpm_solver++", "--num_steps", "2", "--repeats", "1",
                   "--out", str(tmp_path)])
    data = read(tmp_path / "sampling.json")
    rows = data["rows"]
    assert [(r["size"], r["sampler"], r["steps"], r["batch"]) for r in rows] == [("micro", "dpm_solver++", 2, 1)]
    for r in rows:
        # Same weights (through a diffusers folder), same latents, matched schedulers: same images.
        assert r["max_abs_image_diff"] < 1e-3
        for side in ("ldm_jax", "diffusers"):
            s = r[side]
            assert s["images_per_s"] > 0 and s["overhead"] > 0 and s["unet_forward_s"] > 0 and s["decode_s"] > 0
            assert s["images_per_s"] == pytest.approx(r["batch"] / s["sample_s"])
        assert r["img_s_ratio"] == pytest.approx(r["ldm_jax"]["images_per_s"] / r["diffusers"]["images_per_s"])


def test_compile_smoke(tmp_path, cheap_xla):
    # Every program is cached (--min_compile_time_s 0), so the warm process must read each one back
    # however fast this machine compiles: a check of the cache, not of timings.
    compile_benchmark.main(["--sizes", "micro", "--min_compile_time_s", "0", "--out", str(tmp_path)])
    (row,) = read(tmp_path / "compile.json")["rows"]
    assert row["size"] == "micro" and row["batch"] == 2
    cold, warm = row["cold"], row["warm"]
    for program in compile_benchmark.PROGRAMS:
        assert cold[program]["lower_s"] > 0 and cold[program]["compile_s"] > 0
        assert cold[program]["cache_hits"] == 0  # a fresh cache folder
        assert warm[program]["cache_hits"] == 1
    assert cold["cache_files"] >= len(compile_benchmark.PROGRAMS)


def test_memory_smoke(tmp_path):
    memory.main(["--sizes", "micro", "--out", str(tmp_path)])
    data = read(tmp_path / "memory.json")
    (row,) = data["rows"]
    assert (row["size"], row["batch"], row["latents"]) == ("micro", 2, [8, 8, 4])
    # The state is parameters + EMA + two AdamW moments in float32 (plus a few counters), and the
    # new state reuses the donated buffers.
    assert 16 * row["unet_params"] <= row["state_bytes"] < 16 * row["unet_params"] + 16384
    assert row["alias_bytes"] >= 16 * row["unet_params"]
    assert row["temp_bytes"] > 4 * row["unet_params"]  # at least the gradients
    assert row["peak_bytes"] == row["state_bytes"] + row["temp_bytes"]
    assert row["floor_bytes"] == 20 * row["unet_params"]
    assert (row["update"], row["xla_options"]) == ("flat", [])  # replicated parameters: one raveled vector


def test_memory_lora_smoke(tmp_path):
    """--lora: the donated state is the adapters' (parameters, EMA, two AdamW moments); the frozen
    UNet is an argument read whole and never written (not aliased)."""
    memory.main(["--sizes", "micro", "--lora", "2", "--lora_targets", "time_emb_proj", "--set", "unet.dropout=0.0",
                 "--out", str(tmp_path)])
    data = json.loads((tmp_path / "memory_lora.json").read_text())  # its own file: memory.json keeps the full step's
    assert data["command"].startswith("python benchmarks/memory.py ") and data["settings"]["lora"] == 2
    (row,) = data["rows"]
    n, u = row["lora_params"], row["unet_params"]
    assert (row["lora_rank"], row["lora_targets"], row["overrides"]) == (2, ["time_emb_proj"], ["unet.dropout=0.0"])
    assert 0 < n < u / 10
    assert 4 * u + 16 * n <= row["state_bytes"] < 4 * u + 16 * n + 16384
    assert 16 * n <= row["alias_bytes"] < 16 * n + 16384
    assert row["floor_bytes"] == 4 * u + 20 * n and row["peak_bytes"] == row["state_bytes"] + row["temp_bytes"]


def test_gpu_exits_cleanly_without_a_gpu(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, gpu.__file__, "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU visible to JAX" in proc.stdout
    assert not (tmp_path / "gpu.json").exists()


def test_pod_plan_smoke(tmp_path, cheap_xla):
    """The 8-device plan compiles (a worker with 8 fake CPU devices, data 2 x fsdp 4): each device
    holds a quarter of the state, and XLA gathers the parameters over fsdp (groups of 4) and sums
    the gradients across devices."""
    pod_plan.main(["--size", "micro", "--meshes", "2x4", "--image_size", "8", "--batch", "8", "--dtype", "float32",
                   "--no_remat", "--out", str(tmp_path)])
    data = read(tmp_path / "pod_plan.json")
    (row,) = data["rows"]
    assert (row["devices"], row["data"], row["fsdp"], row["per_device_batch"]) == (8, 2, 4, 1)
    p, c = row["unet_params"], row["collectives"]
    # parameters, EMA and two AdamW moments (16 bytes a parameter), split over fsdp: what no
    # dimension of 4 divides (a few small vectors) stays whole
    assert 16 * p / 4 <= row["state_bytes"] < 16 * p / 4 * 1.2
    assert c["all-gather"]["count"] > 0 and c["all-gather"]["groups"].get("4", 0) > 0
    assert c["all-gather"]["received_bytes"] >= 0.9 * row["zero3"]["param_all_gather"] / 2  # each one gathered
    assert c["all-reduce"]["count"] + c["reduce-scatter"]["count"] > 0
    assert row["zero3"]["param_all_gather"] == pytest.approx(2 * 4 * p * 3 / 4)  # forward and backward


def test_pod_plan_reads_xla_collectives():
    """The three spellings of replica groups XLA prints, and the bytes a device receives."""
    named = ("%ag = f32[16,8]{1,0} all-gather(%c), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=2], "
             "device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}")
    iota = "%ar = (f32[4]{0}, bf16[2,2]{1,0}) all-reduce(%a, %b), channel_id=3, replica_groups=[4,2]<=[8], to_apply=%s"
    listed = "%rs = f32[2]{0} reduce-scatter(%x), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}"
    out = pod_plan.collectives("\n".join([named, iota, listed, "%d = f32[4]{0} all-gather-done(%ag)"]), 8)
    assert out["all-gather"] == {"count": 1, "received_bytes": 16 * 8 * 4 * 3 / 4, "groups": {"4": 1}}
    assert out["all-reduce"] == {"count": 1, "received_bytes": 2 * (16 + 8) / 2, "groups": {"2": 1}}
    assert out["reduce-scatter"] == {"count": 1, "received_bytes": 8 * 3, "groups": {"4": 1}}


@pytest.mark.parametrize("script, argv, message", [
    (train_step, ["--sizes", "tiny,huge"], "--sizes: unknown value 'huge'; allowed: micro, tiny, small, sd15"),
    (train_step, ["--steps", "0"], "--steps=0 must be an integer >= 1"),
    (sampling, ["--samplers", "euler"], "--samplers: unknown value 'euler'; allowed: ddim, dpm_solver++"),
    (sampling, ["--num_steps", "20,x"], "--num_steps: 'x' is not an integer"),
    (compile_benchmark, ["--sizes", ""], "--sizes: empty list"),
    (gpu, ["--batch_sizes", "4,0"], "--batch_sizes: 0 must be a positive integer"),
    (memory, ["--sizes", "tiny,xl"], "--sizes: unknown value 'xl'; allowed: micro, tiny, small, sd15"),
    (memory, ["--xla", "xla_cpu_scheduler_type"], "--xla 'xla_cpu_scheduler_type': expected KEY=VALUE"),
    (pod_plan, ["--meshes", "2x3x1"], "--meshes entries are DATAxFSDP (e.g. 8x1, 2x4), got '2x3x1'"),
    (pod_plan, ["--devices", "8", "--batch", "12"], "--batch 12 does not split over 8 devices"),
    (base_run, ["--config.train.steps", "2"], "overrides must be written --config.key=value"),
])
def test_bad_flags_name_the_flag(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_size_config_rejects_unknown_sizes():
    with pytest.raises(ValueError, match="unknown benchmark size 'xl'; allowed: micro, tiny, small, sd15"):
        common.size_config("xl")


def test_base_run_reads_a_finished_run(tmp_path):
    """base_run.py's reading of a finished run (the training itself takes minutes even at 2 steps,
    so it is faked here: the files and log lines ldm_jax.train writes, with known times)."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 40}, "eval": {"num_samples": 256}}))
    (tmp_path / "eval" / "prompt_accuracy_40.json").write_text(json.dumps(
        {"test": {"colour_ok": 1.0, "shape_ok": 0.9, "position_ok": 0.95, "ok": 0.9}}))
    metrics = [{"step": 20, "autoencoder/images_per_s": 5.0}, {"step": 40, "autoencoder/images_per_s": 200.0},
               {"step": 60, "autoencoder/images_per_s": 220.0}, {"step": 60, "autoencoder/recon_ok": 0.98},
               {"step": 40, "ldm/images_per_s": 265.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    lines = [(1.0, "I1122 dataset_builder.py:711] Generating dataset shapes (/x)"),
             (13.0, "Dataset shapes downloaded and prepared to /x. Subsequent calls will reuse this data."),
             (230.0, "I1122 loop.py:173] autoencoder: done at step 1400"),
             (242.0, "I1122 loop.py:341] encoded the 20000 training images' latents in 11.0 s"),
             (700.0, "I1122 loop.py:173] ldm: done at step 1600"),
             (719.0, "I1122 loop.py:377] prompt accuracy: {'test': {'ok': 0.9}}"),
             (720.0, "I1122 train.py:35] finished: {'workdir': '/w', 'status': 'done', 'step': 1600, "
                     "'autoencoder_s': 229.0, 'ldm_s': 489.0}")]
    result = base_run.collect(tmp_path, lines, wall_s=721.0)
    assert result["stages"] == pytest.approx(dict(
        autoencoder_s=229.0, ldm_s=489.0, dataset_build_s=12.0, latent_table_s=11.0, ldm_training_s=458.0,
        samples_and_prompt_accuracy_s=19.0, startup_and_exit_s=3.0))
    # The first logging window holds the compilation: left out of the median.
    assert result["images_per_s"] == {"autoencoder": {"median": 210.0, "windows": 2},
                                      "ldm": {"median": 265.0, "windows": 1}}
    assert result["autoencoder_recon"] == {"ok": 0.98, "num_captions": 256}
    test = result["prompt_accuracy"]["test"]
    assert test["num_captions"] == 256
    low, high = test["ok_interval95"]
    assert low == pytest.approx(0.8571, abs=1e-4) and high == pytest.approx(0.9310, abs=1e-4)  # Wilson, 90% of 256
    assert result["summary"]["status"] == "done"


def test_base_run_refuses_a_used_workdir(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        base_run.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2
    assert "is not empty: a timed run starts from scratch" in capsys.readouterr().err
