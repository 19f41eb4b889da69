"""GemmaConfig: presets, parameter counts without allocating memory, HF round trip."""

import pytest

from gemma_jax import ConfigError, GemmaConfig, gemma2_2b, gemma2_9b, gemma2_27b
from gemma_jax.model import param_count


@pytest.mark.parametrize("preset,count", [(gemma2_2b, 2_614_341_888), (gemma2_9b, 9_241_705_984),
                                          (gemma2_27b, 27_227_128_320)])
def test_parameter_counts_with_eval_shape(preset, count):
    assert param_count(preset()) == count   # jax.eval_shape: no parameter is allocated


def test_presets_alternate_local_and_global():
    config = gemma2_2b()
    assert config.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    assert (config.query_pre_attn_scalar, gemma2_27b().query_pre_attn_scalar) == (256, 144)


@pytest.mark.parametrize("preset", [gemma2_2b, gemma2_9b, gemma2_27b])
def test_hf_round_trip(preset):
    config = preset()
    assert GemmaConfig.from_hf(config.to_hf()) == config
    assert GemmaConfig.from_dict(config.to_dict()) == config


def test_lists_are_accepted_as_tuples():
    config = gemma2_2b()
    fields = config.to_dict()
    assert isinstance(fields["layer_types"], list) and isinstance(fields["eos_token_ids"], list)
    from_lists = GemmaConfig(**fields)
    assert from_lists == config and hash(from_lists) == hash(config)
    assert isinstance(from_lists.layer_types, tuple) and isinstance(from_lists.eos_token_ids, tuple)


def test_jpn_it_scalar_comes_from_the_config():
    hf = gemma2_2b().to_hf()
    hf["query_pre_attn_scalar"] = 224
    hf["eos_token_id"] = 1
    config = GemmaConfig.from_hf(hf)
    assert config.query_pre_attn_scalar == 224 and config.eos_token_ids == (1,)


def test_refuses_other_families():
    hf = gemma2_2b().to_hf()
    hf["model_type"] = "gemma3"
    with pytest.raises(ConfigError, match="gemma3"):
        GemmaConfig.from_hf(hf)
