"""The decoder shapes the estimator works from; defined in `peftkit.core.shapes` (the methods' memory hooks receive
them too, and methods import only core). Re-exported here, where the estimator's users have always found them."""

from peftkit.core.shapes import Linear, ModelShape, model_shape

__all__ = ["Linear", "ModelShape", "model_shape"]
