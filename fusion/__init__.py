"""fusion: native multimodal early-fusion MoE pretraining in the style of Llama 4."""

__version__ = "0.1.0"
