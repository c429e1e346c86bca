"""Continual learning: ZSCL for CLIP-style dual encoders (:mod:`jaxeff.cl.zscl`)."""
