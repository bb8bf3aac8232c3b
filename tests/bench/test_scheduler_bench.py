"""The null-model scheduler benchmark's overlap comparison against an emulated device."""

from __future__ import annotations

from radixlm.bench.scheduler import main, measure_overlap


def test_overlap_hides_host_work_behind_the_emulated_device():
    serial = measure_overlap(64, 64, 25, 1, device_ms=20.0, overlap=False)
    overlap = measure_overlap(64, 64, 25, 1, device_ms=20.0, overlap=True)
    assert serial["steps"] == overlap["steps"] == 25
    # Serially every step costs device time plus host time; overlapped, only the larger.
    assert serial["ms_per_step"] >= 20.0 + 0.5 * serial["host_cpu_ms_per_step"]
    assert overlap["ms_per_step"] < serial["ms_per_step"]
    assert 0.0 <= overlap["device_idle"] < serial["device_idle"] <= 1.0


def test_cli_prints_both_loops(capsys):
    main(["--batch-sizes", "2", "--prompt-len", "16", "--steps", "5", "--device-ms", "1"])
    out = capsys.readouterr().out
    assert "overlap" in out and "serial" in out and "device idle" in out
    assert "build µs" in out
