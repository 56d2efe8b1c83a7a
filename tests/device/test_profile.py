"""DeviceProfile files, budgets and CPU-info parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from toco_core.device import (
    DeviceProfile,
    has_fast_int8,
    load_profile,
    parse_cpuinfo,
    save_profile,
    usable_memory,
    usable_storage,
    with_budgets,
)
from toco_core.errors import ConfigError, DeviceError

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""
X86_CPUINFO = """processor\t: 0
model name\t: Intel(R) Core(TM) i5-1135G7 @ 2.40GHz
flags\t\t: fpu vme sse sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx_vnni sha_ni
"""


def test_parse_cpuinfo_arm_and_x86():
    model, flags = parse_cpuinfo(ARM_CPUINFO)
    assert model == "" and flags == ["asimd", "asimddp"]
    model, flags = parse_cpuinfo(X86_CPUINFO)
    assert model.startswith("Intel(R) Core(TM) i5")
    assert {"avx2", "avx512_vnni", "avx_vnni"} <= set(flags) and "sha_ni" not in flags


def test_save_load_round_trip(probed, tmp_path):
    path = save_profile(with_budgets(probed, memory=64_000_000, latency_s=0.005), tmp_path / "sub" / "p.json")
    back = load_profile(path)
    assert back == with_budgets(probed, memory=64_000_000, latency_s=0.005)


def test_budgets_cap_usable_memory_and_storage(probed):
    capped = with_budgets(probed, memory=64 * 10**6, storage=2 * 10**6)
    assert usable_memory(capped) == 64 * 10**6 and usable_storage(capped) == 2 * 10**6
    assert usable_memory(probed) == probed.available_memory  # the original is untouched
    huge = with_budgets(probed, memory=10**15)
    assert usable_memory(huge) == probed.available_memory  # a budget never adds memory
    with pytest.raises(ConfigError, match="memory budget"):
        with_budgets(probed, memory=0)


def test_example_profiles_load_and_differ():
    profiles = {p.stem: load_profile(p) for p in sorted(PROFILES.glob("*.json"))}
    assert set(profiles) == {"line-pc", "camera-box", "handheld"}
    pc, cam, hand = profiles["line-pc"], profiles["camera-box"], profiles["handheld"]
    assert usable_memory(pc) > usable_memory(cam) > usable_memory(hand) == 64 * 10**6
    assert pc.physical_cores == 8 and cam.physical_cores == 2 and hand.logical_cores == 1
    assert cam.total_memory == 256 * 10**6
    assert hand.benchmark.fp32_gflops < cam.benchmark.fp32_gflops < pc.benchmark.fp32_gflops
    assert has_fast_int8(pc) and not has_fast_int8(hand)


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture()
def good() -> dict:
    return json.loads((PROFILES / "camera-box.json").read_text())


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.update(total_memory="lots"), "total_memory"),
        (lambda d: d.pop("ort_version"), "ort_version"),
        (lambda d: d.update(ram=5), "ram"),
        (lambda d: d.update(formats=["fp32", "fp8"]), "formats.1"),
        (lambda d: d["benchmark"].update(fp32_gflops=-1), "benchmark.fp32_gflops"),
        (lambda d: d.update(memory_budget=0), "memory_budget"),
        (lambda d: d.update(available_memory=d["total_memory"] + 1), "available_memory"),
    ],
)
def test_wrong_fields_are_named(tmp_path, good, change, field):
    change(good)
    with pytest.raises(DeviceError, match="not a valid device profile") as info:
        load_profile(_write(tmp_path, good))
    assert field in str(info.value)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(DeviceError, match="does not exist"):
        load_profile(tmp_path / "nope.json")
    with pytest.raises(DeviceError, match="not valid JSON.*line 1"):
        load_profile(_write(tmp_path, '{"device_id": "x",'))
    with pytest.raises(DeviceError, match="field 'profile'|valid dictionary"):
        load_profile(_write(tmp_path, "[1, 2]"))


def test_schema_version_from_the_future_is_refused(tmp_path, good):
    good["schema_version"] = 2
    with pytest.raises(DeviceError, match="schema_version"):
        load_profile(_write(tmp_path, good))


def test_profile_model_checks_consistency():
    with pytest.raises(ValidationError, match="exceeds total_memory"):
        DeviceProfile(total_memory=1, available_memory=2, free_storage=0, physical_cores=1,
                      logical_cores=1, ort_version="1")
