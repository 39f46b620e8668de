import pytest
import yaml
from pydantic import ValidationError

from moesim.errors import InputError
from moesim.hardware import HardwareProfile, get_profile, list_profiles
from moesim.paths import hardware_dir

REQUIRED = [
    "H100-SXM",
    "H800",
    "H200",
    "A100-80GB",
    "B200",
    "GB200-NVL72",
    "MI300X",
    "TPU-v5p",
    "TPU-v6e",
]


def test_required_profiles_exist_and_validate():
    assert set(REQUIRED) <= set(list_profiles())
    for name in list_profiles():
        p = get_profile(name)
        assert p.name == name
        assert all(p.sources[f].strip() for f in p.figure_paths())


def test_h100_figures():
    p = get_profile("H100-SXM")
    assert p.compute.bf16_dense_tflops == pytest.approx(989.4)
    assert p.scale_up.domain_size == 8
    assert p.peak_tflops("fp8") == pytest.approx(1978.9)


def _raw(name: str) -> dict:
    return yaml.safe_load((hardware_dir() / f"{name}.yaml").read_text())


def test_unsourced_figure_rejected():
    data = _raw("H100-SXM")
    del data["sources"]["memory.hbm_bandwidth_gbps"]
    with pytest.raises(ValidationError, match=r"memory\.hbm_bandwidth_gbps"):
        HardwareProfile.model_validate(data)


def test_negative_figure_rejected():
    data = _raw("H100-SXM")
    data["memory"]["hbm_bandwidth_gbps"] = -1
    with pytest.raises(ValidationError, match=r"greater than or equal to 0\.001"):
        HardwareProfile.model_validate(data)


def test_unknown_field_rejected():
    data = _raw("H100-SXM")
    data["compute"]["fp4_tflops"] = 1
    with pytest.raises(ValidationError, match="Extra inputs"):
        HardwareProfile.model_validate(data)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(InputError, match=r"valid names: .*H100-SXM"):
        get_profile("H1000")
