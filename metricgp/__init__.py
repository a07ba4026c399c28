"""metricgp: discover and use pruning metrics for large language models."""

__version__ = "0.1.0"


def _register_pruned_checkpoints() -> None:
    """Let plain `AutoModelForCausalLM.from_pretrained` open pruned checkpoints (structured.saving).

    Importing metricgp must never fail: without transformers this is skipped quietly, and any
    other problem only warns (loading pruned checkpoints is then what breaks, with that warning)."""
    try:
        from metricgp.structured.saving import register

        register()
    except ImportError:
        return  # no (recent enough) transformers: nothing to register with
    except Exception as err:  # a broken install or a changed registration API
        import warnings

        warnings.warn(f"metricgp: pruned checkpoints not registered with transformers: {err}", stacklevel=2)


def __getattr__(name: str):
    if name == "load_pruned":
        from metricgp.structured.saving import load_pruned

        return load_pruned
    raise AttributeError(f"module 'metricgp' has no attribute '{name}'")


_register_pruned_checkpoints()
