"""seqcls.dropout (Triton keep-masks, compile.dropout_masks); the kernels run in Triton's CPU interpreter
in a process of its own (tests/short_attention_cases.py)."""

import pytest
import torch

from seqcls.build import build_trainer
from seqcls.config import ConfigError
from tests.conftest import compose_cfg, synthetic_overrides
from tests.test_short_attention import run_case


def test_masks_keep_one_minus_p_in_every_lane_and_the_module_is_dropout():
    r = run_case("masks")
    for p in (0.1, 0.5):
        m = r[str(p)]
        assert m["shape"] == [100_003] and m["dtype"] == "torch.bool", m
        # 100k entries: the kept fraction's standard deviation is <= 0.0016; each lane's (12.5k) <= 0.0045
        assert abs(m["kept"] - (1 - p)) < 0.008, m
        assert 1 - p - 0.025 < m["lanes"][0] and m["lanes"][1] < 1 - p + 0.025, m
        assert abs(m["neighbour_corr"]) < 0.02, m
        assert abs(m["tail_kept"] - (1 - p)) < 0.08, m
    assert r["same_seed_same"] and not r["other_seed_same"] and not r["halves_same"], r
    assert not r["high_bits_seed_same"], r  # seeds take 62 bits: the key's high word matters
    mod = r["module"]  # 64 x 33 entries, p 0.25
    assert abs(mod["kept"] - 0.75) < 0.05 and mod["values"] < 1e-5 and mod["grad"] == 0.0, mod
    assert mod["eval_identity"], mod
    assert abs(r["compiled_kept"] - 0.75) < 0.05 and r["compiled_values"] < 1e-5, r
    assert r["opcheck"] == [], r


def test_packed_masks_hold_8_entries_a_byte_at_the_rate_asked_and_drop_like_dropout():
    r = run_case("mask_bits")
    assert r["layout"] == {"shape": [12_501], "dtype": "torch.uint8", "matches_numpy": True,
                           "is_the_bool_mask": True, "as_2d": True}, r  # the same mask as dropout_keep's, packed
    for p in (0.1, 0.5):
        m = r[str(p)]
        assert abs(m["kept"] - (1 - p)) < 0.008, m
        assert 1 - p - 0.025 < m["bits"][0] and m["bits"][1] < 1 - p + 0.025, m  # each bit position
        assert abs(m["neighbour_corr"]) < 0.02, m
        assert abs(m["tail_kept"] - (1 - p)) < 0.08, m
    assert r["same_seed_same"] and not r["other_seed_same"] and not r["high_bits_seed_same"], r
    mod = r["module"]
    assert abs(mod["kept"] - 0.75) < 0.05 and mod["values"] < 1e-5 and mod["grad"] == 0.0, mod
    assert abs(r["compiled_kept"] - 0.75) < 0.05 and r["compiled_values"] < 1e-5, r
    assert r["opcheck"] == [], r
    # AOT autograd keeps the packed bytes for the backward and unpacks them there again
    assert r["saved"] == {"False": [["torch.bool", [64, 32]]], "True": [["torch.uint8", [256]]]}, r["saved"]


def test_triton_masks_where_they_cannot_run_is_one_clear_error(tmp_path, synthetic_dir):
    for setting in ("triton", "triton_bits"):
        cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [f"compile.dropout_masks={setting}"])
        with pytest.raises(ConfigError, match=f"compile.dropout_masks={setting} needs Triton on an NVIDIA GPU; "
                                              "use compile.dropout_masks=inductor"):
            build_trainer(cfg, tmp_path)
        assert not (tmp_path / "metrics.jsonl").exists()


def test_auto_masks_come_from_the_triton_kernel_only_where_the_model_is_compiled_on_a_gpu(tmp_path, synthetic_dir):
    from omegaconf import OmegaConf
    from seqcls.build import use_triton_masks
    from seqcls.dropout import MaskDropout, supported
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_triton_masks(cfg, cuda, compiled=True) == supported(cuda)
    assert not use_triton_masks(cfg, cuda, compiled=False)
    assert not use_triton_masks(cfg, cpu, compiled=True)
    OmegaConf.update(cfg, "compile.dropout_masks", "inductor")
    assert not use_triton_masks(cfg, cuda, compiled=True)
    OmegaConf.update(cfg, "compile.dropout_masks", "auto")
    trainer = build_trainer(cfg, tmp_path)  # on CPU: torch's dropout
    assert any(isinstance(m, torch.nn.Dropout) for m in trainer.model.modules())
    assert not any(isinstance(m, MaskDropout) for m in trainer.model.modules())


@pytest.mark.parametrize("setting,packed", [("triton", False), ("triton_bits", True)])
def test_the_setting_reaches_every_dropout_of_the_built_model(tmp_path, synthetic_dir, monkeypatch, setting, packed):
    """build wires compile.dropout_masks into the model (Triton taken as present: no forward runs here)."""
    from seqcls import dropout
    from seqcls.dropout import MaskDropout
    monkeypatch.setattr(dropout, "supported", lambda device: True)
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [f"compile.dropout_masks={setting}",
                                                                      "compile.enabled=true"])  # compiles lazily
    trainer = build_trainer(cfg, tmp_path)
    masked = [m for m in trainer.model.modules() if isinstance(m, MaskDropout)]
    assert masked and not any(type(m) is torch.nn.Dropout for m in trainer.model.modules())
    assert all(m.packed_mask == packed for m in masked)
