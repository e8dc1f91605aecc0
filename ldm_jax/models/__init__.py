"""Flax (linen) networks: autoencoder, text encoder, conditional UNet."""
