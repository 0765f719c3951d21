"""Latent-diffusion family: a cell VAE (set encoder, negative-binomial decoder) and a DiT over its latent tokens.

It shares the data layer, the DiT block, the adaLN-Zero conditioning and the condition embeddings with the
masked family (``ddsc.model``); the Composer wrappers are in ``ddsc.train.latent_models``.
"""
