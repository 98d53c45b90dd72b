"""dkel: online knowledge distillation (DKEL and its baselines) on one engine.

    import dkel
    run = dkel.fit("dkel", model="torchvision:resnet18", data=(train, test), epochs=10)
    net = dkel.load(run.dir)            # the deployed network, with net.preprocessing

`fit`, `load`, `evaluate` and `Run` come from `dkel.api`; `register_model`, `register_dataset` and
`register_method` from `dkel.plugins`.  They are imported on first use, so `import dkel` stays light."""
__version__ = "0.2.0"

_LAZY = {"fit": "api", "load": "api", "evaluate": "api", "Run": "api",
         "register_model": "plugins", "register_dataset": "plugins", "register_method": "plugins"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dkel' has no attribute {name!r}")
