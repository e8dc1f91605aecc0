"""recon: the autoencoder's reconstructions of held-out images (PSNR, SSIM, latent std)."""
from __future__ import annotations

from ldm_jax.evaluation.run import Evaluator, Run, jsonable


def _recon_unavailable(run: Run):
    if run.config.autoencoder.kind == "identity":
        return "recon measures the autoencoder; this run is pixel-space (autoencoder.kind='identity')"
    return None


def compute_recon(run: Run) -> dict:
    """The autoencoder on held-out images: PSNR and SSIM of its reconstructions, the std of the
    scaled latents (the LDM wants ~1), and codebook usage / perplexity for a VQ model."""
    from ldm_jax.evaluation import recon

    pipe, result = run.pipe, {}
    for split in run.splits:
        images = run.examples(split, run.options.num_samples)["image"]
        metrics = recon.reconstruction_metrics(pipe.autoencoder, pipe.params["autoencoder"], images,
                                               scale_factor=pipe.scale_factor, batch_size=run.options.batch_size)
        result[split] = jsonable(metrics)
        result[split]["num_images"] = len(images)
    return result


EVALUATOR = Evaluator("recon", compute_recon, _recon_unavailable, samples=False)
