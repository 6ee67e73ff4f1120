"""fusion: native multimodal early-fusion MoE pretraining in the style of Llama 4."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """The model of a run dir or checkpoint dir; `model(input_ids)` returns logits (B, T, V)."""
    from fusion.checkpoint import load_model as _load

    return _load(path, device)
