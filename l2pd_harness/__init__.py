"""l2pd-harness: a decoding backend and evaluation harness for diffusion LLMs (LLaDA) with learned parallel decoding."""

__version__ = "0.1.0"
