"""dkel: online knowledge distillation (DKEL and its baselines) on one engine."""
__version__ = "0.1.0"
