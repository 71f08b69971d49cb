"""dtvit: spiking vision transformers whose modules learn how many time steps they need (JAX/Flax)."""

__version__ = "0.1.0"
from dtvit.loader import load  # noqa: E402,F401  (stdlib-only at import; JAX loads on the first call)
