"""fusion-convert: Hugging Face Llama 4 text checkpoints in and out.

    fusion-convert from-hf HF_DIR OUT_DIR        # then fusion.load_model(OUT_DIR)
    fusion-convert to-hf RUN_OR_CKPT OUT_DIR     # then Llama4ForCausalLM.from_pretrained(OUT_DIR)
    python -m fusion.convert ...                 # the same command

Modules, one concern each:
    cli.py           the two directions (`from_hf`, `to_hf`) and the command line (`main`)
    hf_config.py     config.json both ways: Llama 4 text config <-> fusion `model.*` values
    weights.py       tensor names both ways (the weight layout) and counting routed experts
    tensor_files.py  safetensors read lazily (`SafeTensorsDir`) and written one tensor at a time
    errors.py        ConvertError, what every step raises
"""

from fusion.convert.cli import DTYPES, from_hf, main, parse_args, to_hf
from fusion.convert.errors import ConvertError
from fusion.convert.hf_config import ARCHITECTURES, CONFIG, hf_config_from_model, model_overrides_from_hf
from fusion.convert.tensor_files import INDEX, WEIGHTS, Entry, SafeTensorsDir, write_safetensors
from fusion.convert.weights import count_experts, entries_from_hf, entries_to_hf

__all__ = [
    "ARCHITECTURES",
    "CONFIG",
    "DTYPES",
    "INDEX",
    "WEIGHTS",
    "ConvertError",
    "Entry",
    "SafeTensorsDir",
    "count_experts",
    "entries_from_hf",
    "entries_to_hf",
    "from_hf",
    "hf_config_from_model",
    "main",
    "model_overrides_from_hf",
    "parse_args",
    "to_hf",
    "write_safetensors",
]
