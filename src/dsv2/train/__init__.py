"""Training: data, losses, optimisation, the trainer and its distributed setup (`dsv2 train`)."""
