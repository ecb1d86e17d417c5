"""xlsr-jax: fine-tune XLSR-Wav2Vec2 speech recognition with JAX/Flax."""

__version__ = "0.1.0"
