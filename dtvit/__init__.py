"""dtvit: spiking vision transformers whose modules learn how many time steps they need (JAX/Flax)."""

__version__ = "0.1.0"
