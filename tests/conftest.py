"""Identity tests run in float64; float32 behaviour is tested with explicit dtypes."""

import jax

jax.config.update("jax_enable_x64", True)
