"""python -m ldm_jax.train --config configs/base.py --workdir runs/base [--config.optim.lr=1e-4 ...]

Trains the configured stages (autoencoder, then latent diffusion) in --workdir; rerunning with the
same workdir resumes. Multi-host: run the same command on every host (jax.distributed is
initialised from the cluster environment, or from --coordinator/--num_processes/--process_id).
"""
import logging

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, samples); reused to resume")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    if FLAGS.coordinator:
        if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts talk over gloo
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    logging.getLogger("ldm_jax").setLevel(logging.INFO)
    logging.getLogger("ldm_jax").info("%d devices over %d processes (this is process %d)",
                                      jax.device_count(), jax.process_count(), jax.process_index())
    from ldm_jax.training.loop import train_and_evaluate

    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    logging.getLogger("ldm_jax").info("finished: %s", summary)


if __name__ == "__main__":
    app.run(main)
