"""Built-in models, their seeded training scripts, checkpoints and recipes."""
