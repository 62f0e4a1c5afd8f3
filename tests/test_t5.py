"""T5 / umT5 encoder: parity with transformers, converter round trip and errors, tokenizer."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.convert.t5 import abstract_t5_params, convert_t5_state_dict, load_t5_encoder, load_t5_tokenizer
from sora_jax.models.text.t5 import T5Config, T5Encoder, relative_position_buckets
from sora_jax.parallel.rules import LOGICAL_AXES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on CPU; observed errors are ~1e-6, the bound leaves room for XLA vs torch reductions.
ATOL = 1e-4
LENGTHS = (20, 13)  # two sequences; the second is right-padded to 20 with a zero mask
TINY = dict(
    vocab_size=100,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    # Few buckets and a short max_distance so 20 tokens reach the exact, log and clamped buckets.
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
)
VARIANTS = {
    "umt5": ("UMT5Config", "UMT5EncoderModel", "gated-gelu"),
    "t5": ("T5Config", "T5EncoderModel", "gated-gelu"),
    "t5-relu": ("T5Config", "T5EncoderModel", "relu"),
}


def _hf_model(variant: str):
    """A tiny random transformers encoder with every weight moved off its init."""
    cfg_cls, model_cls, ffn = VARIANTS[variant]
    torch.manual_seed({"umt5": 0, "t5": 1, "t5-relu": 2}[variant])
    cfg = getattr(transformers, cfg_cls)(**TINY, feed_forward_proj=ffn)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf(request):
    return request.param, _hf_model(request.param)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY["vocab_size"], size=(len(LENGTHS), max(LENGTHS))).astype(np.int32)
    mask = (np.arange(max(LENGTHS))[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    return ids, mask


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _reference(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy()


def _max_err_unpadded(ours, ref, mask) -> float:
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(ours)[keep] - ref[keep]).max())


def _config_for(model) -> T5Config:
    return T5Config.from_hf(model.config.to_dict())


def test_from_hf_reads_variant_and_ffn(hf):
    variant, model = hf
    config = _config_for(model)
    assert config.per_layer_position_bias == (variant == "umt5")
    assert config.is_gated == (VARIANTS[variant][2] == "gated-gelu")
    assert config.activation == ("gelu_new" if config.is_gated else "relu")
    assert (config.d_model, config.d_kv, config.d_ff, config.num_layers, config.num_heads) == (32, 8, 48, 2, 4)


def test_buckets_match_transformers():
    # umT5-xxl's bucket settings over Wan's 512 text tokens, against transformers' own function.
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(512)[None, :] - torch.arange(512)[:, None]
    for nb, md in ((32, 128), (8, 16)):
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(relative_position_buckets(512, 512, nb, md), ref.numpy())


def test_parity_with_transformers(hf, batch):
    variant, model = hf
    ids, mask = batch
    config = _config_for(model)
    params = convert_t5_state_dict(_state_dict(model), config)
    apply = jax.jit(T5Encoder(config).apply)
    ours = apply(params, jnp.asarray(ids), jnp.asarray(mask))
    ref = _reference(model, ids, mask)
    assert ours.shape == ref.shape == (len(LENGTHS), max(LENGTHS), TINY["d_model"])
    err = _max_err_unpadded(ours, ref, mask)
    assert err <= ATOL, f"{variant}: max abs error {err:.3g} > {ATOL}"
    # The short sequence must not see its padding: changing padded ids leaves its real tokens alone.
    ids2 = np.where(mask == 1, ids, 7).astype(np.int32)
    ours2 = apply(params, jnp.asarray(ids2), jnp.asarray(mask))
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours2)[keep], np.asarray(ours)[keep], atol=1e-6)


def test_params_carry_logical_axes(hf):
    _, model = hf
    config = _config_for(model)
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    boxed = jax.eval_shape(T5Encoder(config).init, jax.random.key(0), ids, ids)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    names = {n for x in leaves for n in x.names}
    assert {"layers", "vocab", "embed", "heads", "mlp", "norm"} <= names
    assert names - {None} <= set(LOGICAL_AXES)


def test_round_trip_save_pretrained(hf, batch, tmp_path):
    variant, model = hf
    ids, mask = batch
    model.save_pretrained(str(tmp_path))
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    config, params = load_t5_encoder(tmp_path)
    assert config == _config_for(model)
    ours = T5Encoder(config).apply(params, jnp.asarray(ids), jnp.asarray(mask))
    err = _max_err_unpadded(ours, _reference(model, ids, mask), mask)
    assert err <= ATOL, f"{variant} after save_pretrained: max abs error {err:.3g} > {ATOL}"


def _umt5_tensors():
    model = _hf_model("umt5")
    return _state_dict(model), _config_for(model)


def test_missing_tensor_is_named():
    tensors, config = _umt5_tensors()
    name = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    del tensors[name]
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        convert_t5_state_dict(tensors, config)


def test_shape_and_variant_mismatch_are_named():
    tensors, config = _umt5_tensors()
    with pytest.raises(ValueError, match=r"encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight.*shape"):
        convert_t5_state_dict(tensors, dataclasses.replace(config, d_kv=4))
    # A umT5 checkpoint read as T5 leaves the per-layer bias tables of layers >= 1 unused.
    with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.block\.1\..*relative_attention_bias"):
        convert_t5_state_dict(tensors, dataclasses.replace(config, per_layer_position_bias=False))


def test_converted_tree_matches_module(hf):
    _, model = hf
    config = _config_for(model)
    params = convert_t5_state_dict(_state_dict(model), config)
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), abstract_t5_params(config))
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
    assert got == want


def _write_tokenizer(folder) -> None:
    """A tiny umT5-like tokenizer.json: Unigram over words, `</s>` appended, `<pad>` = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "▁two", "▁balls", "▁red", "▁and", "▁blue", "▁a", "▁ball"]
    vocab = [(w, 0.0 if w.startswith("<") else -float(i)) for i, w in enumerate(words)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}))


def test_tokenizer_pads_truncates_and_masks(tmp_path):
    _write_tokenizer(tmp_path)
    tok = load_t5_tokenizer(tmp_path, max_length=6)
    texts = ["two red balls", "a blue ball and a red ball and two", "zebra"]
    ids, mask = tok(texts)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (3, 6)
    np.testing.assert_array_equal(ids[0], [3, 5, 4, 1, 0, 0])  # </s> appended, then <pad>
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0])
    assert ids[1, -1] == 1 and mask[1].all()  # truncated, yet still ends with </s>
    np.testing.assert_array_equal(ids[2, :2], [2, 1])  # unknown word -> <unk>
    # Same ids and mask as transformers' fast tokenizer on the same file.
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )(texts, max_length=6, padding="max_length", truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    # A tokenizer.json path works too, and a missing file is a clear error.
    np.testing.assert_array_equal(load_t5_tokenizer(tmp_path / "tokenizer.json", max_length=6)(texts)[0], ids)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_t5_tokenizer(tmp_path / "nowhere")
