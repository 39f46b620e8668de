import pytest

from moesim.errors import InputError
from moesim.model.shapes import ModelShape, get_preset, list_presets

REQUIRED = [
    "Switch-C-2048",
    "Mixtral-8x7B",
    "Mixtral-8x22B",
    "Grok-1",
    "DBRX",
    "Qwen2-57B-A14B",
    "DeepSeekMoE-16B",
    "DeepSeek-V2",
    "DeepSeek-V3",
    "OLMoE-1B-7B",
    "FLAME-MoE-290M",
]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(list_presets())


@pytest.mark.parametrize("name", REQUIRED)
def test_computed_params_match_published_within_3_percent(name):
    m = get_preset(name)
    assert m.source
    assert m.published_total_params is not None
    assert m.total_params() == pytest.approx(m.published_total_params, rel=0.03)
    if m.published_active_params is not None:
        assert m.active_params() == pytest.approx(m.published_active_params, rel=0.03)


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        ("Mixtral-8x7B", 46.7e9, 12.9e9),  # Jiang et al. 2024
        ("DeepSeek-V3", 671e9, 37e9),  # DeepSeek-V3 technical report
    ],
)
def test_headline_figures(name, total, active):
    m = get_preset(name)
    assert m.total_params() == pytest.approx(total, rel=0.03)
    assert m.active_params() == pytest.approx(active, rel=0.03)


def test_mixtral_hand_count():
    m = get_preset("Mixtral-8x7B")
    attn = 4096 * 4096 * 2 + 4096 * 1024 * 2
    expert = 3 * 4096 * 14336
    layer = attn + 8 * expert + 4096 * 8 + 2 * 4096
    assert m.total_params() == 32 * layer + 4096 + 2 * 32000 * 4096


def test_moe_layer_indices():
    assert get_preset("DeepSeek-V3").moe_layer_indices() == list(range(3, 61))
    assert get_preset("FLAME-MoE-290M").moe_layer_indices() == list(range(1, 9))
    assert get_preset("Mixtral-8x7B").num_moe_layers == 32


def test_unknown_preset_lists_valid_names():
    with pytest.raises(InputError, match=r"valid names: .*DeepSeek-V3"):
        get_preset("nope")


def test_inconsistent_shape_rejected():
    with pytest.raises(ValueError, match="top_k"):
        ModelShape.model_validate(
            {
                "name": "x",
                "num_layers": 1,
                "d_model": 8,
                "expert_d_ff": 8,
                "num_experts": 2,
                "top_k": 3,
                "attention": {"num_heads": 1},
                "vocab_size": 10,
                "source": "t",
            }
        )
