"""Matrix-free analysis of maps `F: R^n -> R^n` at image scale: their Jacobians
touched only through JVPs and VJPs (docs/matrix_free.md)."""
