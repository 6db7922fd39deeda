"""resnet_jax: `resnet_jax.load(workdir)` gives a trained run's net (resnet_jax/trained.py)."""


def __getattr__(name):
    # Imported on first use: `import resnet_jax` (the CLI's --help) needs no JAX.
    if name == "load":
        from resnet_jax.trained import load

        return load
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")
