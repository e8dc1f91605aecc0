"""Test-wide setup: CPU only, four fake devices, no network, caches of the session's own; the test
order (pytest-randomly) and the rule that CI runs every test.

These variables must be set before jax is first imported, which is why they live at the top of
the conftest (pytest imports it before any test module).

Tests stand alone: none may depend on another's side effects or on the order they run in.
pytest-randomly shuffles the order (the README's command fixes the seed and the summary prints
it: `--randomly-seed=N` reproduces a run's order); fixtures shared by a module or the session
(trained runs, workdirs, datasets) are read-only for the tests that use them, and a test that
writes (evaluates into a run's eval/ folder, resumes it, deletes from it) first copies the run
into its own tmp_path.
"""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import shutil  # noqa: E402
import tempfile  # noqa: E402

_OWN_DIRS = []  # the session folders this process made (the controller's), removed at the end


def session_dir(variable: str, prefix: str) -> str:
    """A temporary folder for the whole test session, named by the environment variable
    `variable`: made by the controlling process, inherited by the xdist workers."""
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        _OWN_DIRS.append(os.environ[variable])
    return os.environ[variable]


# One persistent compilation cache per test session: a program compiled by several test files
# (the tiny models' steps and samplers) is compiled once. Never the user's cache, so that a local
# run costs what a clean CI run does.
os.environ["LDM_JAX_COMPILATION_CACHE"] = session_dir("_LDM_JAX_TEST_CACHE", "ldm_jax_test_jax_cache_")
# Likewise the evaluation networks' cache (LDM_JAX_CACHE: the digit classifier, the shapes feature
# network), never the user's ~/.cache/ldm_jax: a network trained by one test file is read by the
# others (its recipe is deterministic, its file written atomically, and no test depends on which
# test trained it first). Tests of the cache's behaviour pass a cache_dir of their own.
os.environ["LDM_JAX_CACHE"] = session_dir("_LDM_JAX_TEST_NETWORKS", "ldm_jax_test_networks_")

import jax  # noqa: E402

# Exact float32 matmuls on CPU so parity tests compare like with like.
jax.config.update("jax_default_matmul_precision", "highest")

from ldm_jax.runtime.compilation_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()  # reads LDM_JAX_COMPILATION_CACHE


import pytest  # noqa: E402


# Seconds each of the heaviest files took on the 2-core development machine (pytest --durations=0,
# summed per file; 2026-12-06, seed 12345, with --no-loadscope-reorder). Used only to order them, longest first.
HEAVY_FILES = {
    "tests/training/test_loop.py": 135,
    "tests/training/test_process_runs.py": 129,
    "tests/training/test_stage_paths.py": 112,
    "tests/training/test_cli.py": 108,
    "tests/test_experiments.py": 97,
    "tests/training/test_sd15_step.py": 96,
    "tests/training/test_soak.py": 88,
    "tests/test_evaluate.py": 75,
    "tests/training/test_autoencoder_stage.py": 73,
    "tests/test_pipeline.py": 70,
    "tests/diffusion/test_process_samplers.py": 66,
    "tests/test_sd_pipeline_parity.py": 65,
    "tests/ldm/test_model_processes.py": 63,
    "tests/test_benchmarks.py": 54,
    "tests/notebooks/test_quickstart.py": 48,
    "tests/diffusion/test_samplers.py": 48,
    "tests/test_convert.py": 42,
    "tests/training/test_lora_step.py": 42,
    "tests/notebooks/test_diffusion_math.py": 37,
    "tests/diffusion/test_process_convergence.py": 33,
    "tests/test_sample_cli.py": 33,
    "tests/diffusion/test_sd_schedulers.py": 33,
    "tests/test_bad_inputs.py": 32,
    "tests/notebooks/test_stable_diffusion.py": 29,
}


def pytest_collection_modifyitems(config, items):
    """The heaviest files run first, longest first, then files with slow tests, then the rest:
    with xdist handing out whole files (--dist loadfile), the longest ones start early instead of
    keeping one worker busy at the end (longest-processing-time-first scheduling).

    pytest-randomly shuffles first (its hook wraps this one): the order of the files and of the
    tests within each file comes from the seed. This stable sort then moves the heavy files to the
    front in the order of HEAVY_FILES and the other files with slow tests after them, keeping the
    shuffled order within each of the other groups (and within every file), so a run is
    reproducible from its seed. Every xdist worker collects and sorts the same way from the
    controller's seed, as xdist requires."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}

    def rank(item):
        path = item.nodeid.split("::")[0]
        return (-HEAVY_FILES.get(path, 0), path not in slow)

    items.sort(key=rank)


def pytest_unconfigure(config):
    for path in _OWN_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, config):
    """The seed of this run's order, to reproduce it (with -q pytest prints no header)."""
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize"):
        terminalreporter.write_line(f"test order: pytest-randomly --randomly-seed={config.getoption('randomly_seed')} "
                                    "(pass it to run the tests in this order again)")


# ---------------------------------------------------------------------------------------------
# CI runs every test: a skip there is a failure


def running_in_ci() -> bool:
    """The CI environment variable is set (CI=true: .ci/run and the usual CI services set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class SkipsFailCI:
    """CI installs every optional dependency ('.[test,parity]'), so a test that skips there has
    silently lost its coverage. This plugin (registered when running_in_ci()) records every
    skipped test or module, turns a passing exit status into a failing one if there are any, and
    lists them in the summary. Under xdist the workers' reports reach these hooks on the
    controller, whose exit status is the run's."""

    def __init__(self):
        self.skipped = []  # (node id, reason)

    def _record(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as a skip too
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            self.skipped.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report):
        self._record(report)

    def pytest_collectreport(self, report):  # a module-level pytest.importorskip
        self._record(report)

    def pytest_sessionfinish(self, session):
        if self.skipped and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.skipped:
            terminalreporter.write_sep("=", f"CI: {len(self.skipped)} skipped test(s) fail the run", red=True)
            for nodeid, reason in self.skipped:
                terminalreporter.write_line(f"SKIPPED {nodeid}: {reason}", red=True)
            terminalreporter.write_line("CI installs every optional dependency, so no test may skip there: fix "
                                        "the cause (a missing dependency, a skip condition).", red=True)


def pytest_configure(config):
    if running_in_ci() and not hasattr(config, "workerinput"):  # the xdist controller, or a run without xdist
        config.pluginmanager.register(SkipsFailCI(), "ldm_jax_skips_fail_ci")


from tests.sizes import SMALL_SHAPES  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes build shared by the data and evaluation tests (the full build's code, fewer images)."""
    from ldm_jax.data import builder

    data_dir = str(tmp_path_factory.mktemp("datasets"))
    builder.prepare("shapes", data_dir, **SMALL_SHAPES)
    return data_dir
