"""Text encoder: Flax BERT parity with transformers, tokenizer parity, converter errors, prompts."""

from __future__ import annotations

import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sora_jax.convert.bert import (
    abstract_bert_params,
    convert_bert_state_dict,
    default_minilm_folder,
    load_bert,
    load_text_encoder,
)
from sora_jax.models.text.bert import BertConfig, BertEncoder
from sora_jax.parallel.rules import LOGICAL_AXES

MAX_LENGTH = 32
SENTENCES = [
    "two balls, red and blue",
    "A small red ball bounces off the left wall, then rolls slowly to the right.",
    "hi",
    # Longer than MAX_LENGTH tokens, to exercise truncation.
    "a very long prompt " + " ".join(f"word{i}" for i in range(40)),
]


@pytest.fixture(scope="module")
def folder():
    return default_minilm_folder()


@pytest.fixture(scope="module")
def encoder(folder):
    return load_text_encoder(folder, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_tokenizer_matches_transformers(encoder, hf_tokenizer):
    ids, mask = encoder.tokenizer(SENTENCES)
    ref = hf_tokenizer(SENTENCES, max_length=MAX_LENGTH, padding="max_length", truncation=True, return_tensors="np")
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (len(SENTENCES), MAX_LENGTH)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert mask[-1].all() and not mask[2].all()  # one truncated, one padded


def test_parity_with_transformers_bert(folder, encoder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    ids, mask = encoder.tokenizer(SENTENCES)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    emb, emb_mask = encoder.encode(SENTENCES)
    emb, emb_mask = np.asarray(emb), np.asarray(emb_mask)
    assert emb.dtype == np.float32 and emb.shape == (len(SENTENCES), MAX_LENGTH, encoder.hidden_size)
    assert emb_mask.dtype == bool
    np.testing.assert_array_equal(emb_mask, mask.astype(bool))
    err = float(np.abs(emb - ref)[emb_mask].max())
    assert err <= 1e-4, f"max abs error vs transformers.BertModel over unmasked tokens: {err:.3e}"
    assert not emb[~emb_mask].any()  # padded positions are zeroed


def test_params_match_module_and_carry_logical_names(encoder):
    abstract = abstract_bert_params(encoder.config)
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), encoder.params)
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), abstract)
    assert got == want
    ids = jax.ShapeDtypeStruct((1, 1), np.int32)
    boxed = jax.eval_shape(BertEncoder(encoder.config).init, jax.random.key(0), ids, ids)
    specs = jax.tree_util.tree_leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    names = {n for spec in specs for n in spec}
    assert len(specs) == len(jax.tree_util.tree_leaves(abstract))
    assert "layers" in names and names - {None} <= set(LOGICAL_AXES)


def test_bert_prefix_is_accepted(encoder, tensors):
    prefixed = {"bert." + k: v for k, v in tensors.items()}
    params = convert_bert_state_dict(prefixed, encoder.config)
    leaf = params["params"]["layers"]["query"]["kernel"]
    np.testing.assert_array_equal(leaf, np.asarray(encoder.params["params"]["layers"]["query"]["kernel"]))


def _corrupt_copy(folder, tmp_path, tensors):
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_raises_clear_error(folder, tensors, tmp_path):
    name = "encoder.layer.3.attention.self.key.weight"
    broken = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(ValueError, match=rf"missing tensor '{name}'.*re-download") as info:
        load_bert(_corrupt_copy(folder, tmp_path, broken))
    assert "\n" not in str(info.value)


def test_mismatched_tensor_raises_clear_error(encoder, tensors):
    name = "encoder.layer.0.intermediate.dense.bias"
    broken = dict(tensors, **{name: tensors[name][:10]})
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(10,\).*config.json"):
        convert_bert_state_dict(broken, encoder.config)


@pytest.mark.parametrize("prompts", [[""], ["   \n"], ["ok", ""], []])
def test_empty_prompt_raises(encoder, prompts):
    with pytest.raises(ValueError, match="empty prompt: pass a non-empty text prompt"):
        encoder.encode(prompts)


def test_pooled_and_single_string(encoder):
    pooled = np.asarray(encoder.pooled("two balls, red and blue"))
    assert pooled.shape == (1, encoder.hidden_size) and np.isfinite(pooled).all()


def test_config_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_hf_config({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="lacks key"):
        BertConfig.from_hf_config({"hidden_size": 8})
