"""benchmarks/throughput.py end to end on the smallest case (no speed is asserted: that is the
benchmark's job). It keeps the worker processes, their round protocol and the report in working
order."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_writes_a_row_with_both_frameworks(tmp_path):
    """--prestart 2: the sides are launched, all awaited READY, then timed (the GPU default path)."""
    out = tmp_path / "RESULTS.md"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--quick",
                        "--models", "simple_cnn", "--batch-sizes", "8", "--precisions", "fp32",
                        "--no-torch-compile", "--no-memory", "--devices", "--prestart", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "starting 2 processes for 1 cases" in p.stdout, p.stdout
    text = out.read_text()
    row = next(l for l in text.splitlines() if l.startswith("| simple_cnn | 32 | 8 | fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    number = re.compile(r"^[\d,]+\.\d$")
    # compile s, train jaxcnn, plain ops, PyTorch eager: measured; PyTorch compiled: skipped
    assert all(number.match(c) for c in (cells[5], cells[6], cells[7])), cells
    assert cells[8] == "—" and re.match(r"^\d+\.\d\d$", cells[9]), cells
    assert "failed" not in text
    # Arithmetic rate: the model's GFLOP per image (XLA's count: train ~3x the forward pass) times
    # the images/s of the table above, for both frameworks; and the GEMM reference was measured.
    rate = next(l for l in text.splitlines() if l.startswith("| simple_cnn | 8 | fp32 |"))
    rc = [c.strip() for c in rate.strip("|").split("|")]
    train_g, infer_g = float(rc[3]), float(rc[4])
    assert 0.01 < infer_g < 0.03 and 2 < train_g / infer_g < 4, rc
    for got, img_s, g in ((rc[5], cells[5], train_g), (rc[6], cells[7], train_g), (rc[7], cells[11], infer_g),
                          (rc[8], cells[12], infer_g)):
        want = float(img_s.replace(",", "")) * g  # GFLOP/img rounded to 3 decimals in the table
        assert abs(float(got.replace(",", "")) - want) <= 1 + 0.03 * want, (rc, cells)
    assert re.search(r"a 1024\^3 matrix multiply on random data in this run: XLA \(jnp.dot\) fp32 [\d,]+, "
                     r"bf16 [\d,]+; PyTorch \(torch.mm\) fp32 [\d,]+", text), text  # --quick: 1024
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    import jaxcnn
    if head.returncode == 0 and os.path.dirname(os.path.dirname(os.path.abspath(jaxcnn.__file__))) == ROOT:
        # the commit measured: that of the checkout jaxcnn is imported from
        assert re.search(rf"^Commit: {head.stdout.strip()}( with uncommitted changes)?  $", text, re.M), text[:600]


def test_conv_kernel_benchmark_writes_both_frameworks(tmp_path):
    out = tmp_path / "conv.md"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "conv_kernels.py"), "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"^Commit: \S+", out.read_text(), re.M)
    row = next(l for l in out.read_text().splitlines() if l.startswith("| densenet_bc_100_12 | 48->12 | 8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # infer jaxcnn, XLA, PyTorch, ratio, train jaxcnn, XLA, PyTorch, ratio: all measured numbers
    assert all(re.match(r"^\d+\.\d\d$", c) for c in cells[4:12]), cells
    # GFLOP/s of jaxcnn's inference: 2 x batch 128 x 8 x 8 pixels x 12 x 48 x 9 flops over its time
    # (the table's time is rounded to 0.01 ms)
    want = 2 * 128 * 8 * 8 * 12 * 48 * 9 / float(cells[4]) / 1e6
    assert abs(int(cells[12]) - want) <= 1 + 0.03 * want, cells


def test_step_breakdown_times_the_real_and_the_stand_in_step():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_breakdown.py"), "--quick"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {l.split("|")[1].strip(): l for l in p.stdout.splitlines() if l.startswith("| real") or l.startswith("| stand-in")}
    assert set(rows) == {"real", "stand-in"}, p.stdout
    assert "convolutions (real - stand-in, medians)" in p.stdout


def test_profile_step_lists_the_step_operations():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--model",
                        "simple_cnn", "--batch", "8", "--steps", "2", "--top", "5", "--per-step"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [l.split("|")[1:3] for l in p.stdout.splitlines() if l.startswith("| ") and "---" not in l]
    ops = {name.strip(): float(ms) for name, ms in rows if name.strip() not in ("operation", "kind")}
    # the convolutions (oneDNN's where it applies, else XLA's) show up with measured times
    assert any("conv" in name for name in ops), p.stdout
    assert all(ms >= 0 for ms in ops.values()) and sum(ops.values()) > 0, p.stdout
    assert "step ms: " in p.stdout and "slowest step" in p.stdout, p.stdout


def test_device_overhead_is_the_median_of_same_pass_ratios(monkeypatch, tmp_path):
    """The devices table: each pass's overhead against that pass's 1-device run, medians over
    passes (the workers are stood in for by a table of rates: their own code runs in
    test_train's multi-device tests)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import throughput
    # 3 passes x (1, 2, 4 devices at batch 128; then 1 device at batch 64 and at 32)
    rates = iter([100.0, 80.0, 50.0, 70.0, 60.0, 90.0, 60.0, 45.0, 72.0, 45.0, 110.0, 100.0, 100.0, 80.0, 55.0])
    calls = []

    def worker(args, env=None):
        calls.append((args[2], args[6], (env or {}).get("XLA_FLAGS", "")))
        return {"devices": int(args[2]), "train_img_s": next(rates)}

    monkeypatch.setattr(throughput, "_run_worker", worker)
    a = throughput.argparse.Namespace(devices=[1, 2, 4], device_passes=3, devices_model="simple_cnn")
    rows = throughput._device_rows(a, [])
    # passes alternate over the device counts, then the per-device batches on one device
    assert [c[:2] for c in calls] == [("1", "128"), ("2", "128"), ("4", "128"), ("1", "64"), ("1", "32")] * 3
    assert calls[2][2].endswith("--xla_force_host_platform_device_count=4")
    four = rows[2]
    assert four["rates"] == [50.0, 45.0, 100.0] and four["train_img_s"] == 50.0
    # per pass: 100/50 - 1 = 100%, 90/45 - 1 = 100%, 110/100 - 1 = 10%; median 100%
    assert [round(o, 2) for o in four["overheads"]] == [1.0, 1.0, 0.1] and four["overhead"] == 1.0
    # batch 32 alone: 100/60 - 1 = 67%, 90/45 - 1 = 100%, 110/55 - 1 = 100%; median 100%
    assert four["alone_img_s"] == 55.0 and [round(o, 2) for o in four["alone_overheads"]] == [0.67, 1.0, 1.0]
    assert "alone_img_s" not in rows[0]
    out = tmp_path / "r.md"
    throughput.write_report(str(out), "cmd", {"cpu": "x"}, [], [], rows, {}, 1.0)
    assert "| 4 | 50.0 | 100% | 100%, 100%, 10% | 55.0 | 100% (67%, 100%, 100%) |" in out.read_text()
    assert "| 1 | 100.0 | 0% | 0%, 0%, 0% | — | — |" in out.read_text()


def test_passes_reverse_the_order_and_take_medians_of_same_pass_ratios(monkeypatch, tmp_path):
    """--passes: a case's side processes run once per pass, their order reversed every other pass;
    images/s are medians over passes and each ratio the median of the passes' own ratios, not the
    ratio of the medians (the sides are stood in for: their code runs in the first test)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import throughput
    # training jaxcnn / PyTorch eager per pass: 100/50, 90/100, 200/250 -> 2.0, 0.9, 0.8 (median 0.9;
    # the medians' ratio would be 100/100 = 1.0)
    rates = iter([(100.0, 50.0), (90.0, 100.0), (200.0, 250.0)])
    orders, reports = [], []

    def run_sides(sides, rounds, alternate=False, ready=None):
        orders.append([s[s.index("--framework") + 1] for s in sides])
        j, t = next(rates)
        return {"jax_train": j, "torch_train": t, "jax_infer": 3 * j, "compile_s": 5.0}

    monkeypatch.setattr(throughput, "_run_sides", run_sides)
    monkeypatch.setattr(throughput, "_run_worker", lambda *args, **kw: {})
    monkeypatch.setattr(throughput, "_fresh_memory", lambda **kw: None)
    monkeypatch.setattr(throughput, "write_report", lambda *args, **kw: reports.append(args))
    assert throughput.main(["--models", "simple_cnn", "--batch-sizes", "8", "--precisions", "fp32",
                            "--no-torch-compile", "--no-memory", "--devices", "--passes", "3"]) == 0
    assert orders == [["jax", "torch"], ["torch", "jax"], ["jax", "torch"]]
    row = reports[-1][3][0]
    assert row["jax_train"] == 100.0 and row["torch_train"] == 100.0 and row["jax_infer"] == 300.0
    assert abs(row["ratio_train"] - 0.9) < 1e-9 and "ratio_infer" not in row  # no PyTorch inference figure
    assert [round(p["ratio_train"], 2) for p in row["pass_ratios"]] == [2.0, 0.9, 0.8]
    out = tmp_path / "r.md"
    monkeypatch.undo()
    throughput.write_report(str(out), "cmd --passes 3", {"cpu": "x"}, [row], [], [], {}, 1.0)
    text = out.read_text()
    assert "| simple_cnn | 32 | 8 | fp32 | 5.0 | 100.0 | — | 100.0 | — | 0.90 | 0.90 | 300.0 | — | — | — | — |" in text
    assert "simple_cnn b8 fp32 training 2.00, 0.90, 0.80, inference —." in text
    with pytest.raises(SystemExit):
        throughput.main(["--passes", "0"])


def test_gpu_report_has_device_memory_and_gpu_batches(monkeypatch, tmp_path):
    """On a GPU the sides' own peak device memory becomes a table (one row per case), batch sizes
    default to the GPU's, and the commit can be stated by JAXCNN_COMMIT (a copy without a fitting
    .git). Rows stood in: the GPU code paths run only on a lent machine."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import throughput
    assert throughput.default_batches(32, gpu=True) == [128, 512]
    assert throughput.default_batches(224, gpu=True) == [32, 128]
    assert throughput.default_batches(32) == [32, 128]
    rows = [dict(model="simple_cnn", size=32, batch=128, precision="bf16", jax_train=10.0, torch_train=5.0,
                 jax_peak_mb=300.0, torch_peak_mb=400.0, xla_step_bytes=250 * 2**20),
            dict(model="simple_cnn", size=32, batch=512, precision="bf16", jax_train=20.0, torch_train=8.0)]
    mem = throughput._gpu_memory_rows(rows)
    assert mem == [dict(model="simple_cnn", batch=128, precision="bf16", jax=300.0, torch=400.0, kind="device",
                        xla_mb=250.0)]
    out = tmp_path / "r.md"
    throughput.write_report(str(out), "cmd", {"cpu": "x", "gpu": "Some GPU", "cuda": "CUDA 1", "tf32": "t"},
                            rows, mem, [], {}, 0.3)
    text = out.read_text()
    assert "| simple_cnn | 128 | bf16 | 300 | 400 | 0.75 | 250 |" in text, text
    assert "| simple_cnn | 32 | 512 | bf16 |" in text and "| 2.50 |" in text
    assert "GPU: Some GPU; CUDA 1" in text
    monkeypatch.setenv("JAXCNN_COMMIT", "abc1234")
    assert throughput._commit() == "abc1234 (as stated by JAXCNN_COMMIT)"


def test_native_ab_device_overhead_per_handler(monkeypatch, capsys):
    """native_ab.py with several --devices counts: per pass, each handler's N-device step time over
    its own fewest-device one; handler and device order alternate between passes (the worker
    processes are stood in for by a table of ms per step)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import native_ab
    ms = {(True, 1): iter([100.0, 200.0]), (True, 4): iter([110.0, 260.0]),
          (False, 1): iter([100.0, 100.0]), (False, 4): iter([150.0, 120.0])}
    calls = []

    def one(a, model, batch, native, devices, sharded):
        calls.append((native, devices, sharded))
        return next(ms[native, devices])

    monkeypatch.setattr(native_ab, "_one", one)
    assert native_ab.main(["--models", "simple_cnn", "--batches", "32", "--devices", "4", "1", "--pairs", "2"]) == 0
    assert calls == [(True, 1, True), (True, 4, True), (False, 1, True), (False, 4, True),
                     (False, 4, True), (False, 1, True), (True, 4, True), (True, 1, True)]
    out = capsys.readouterr().out
    # compiled: 110/100 - 1 = 10%, 260/200 - 1 = 30% (median 20%); Python: 50%, 20% (median 35%)
    assert "| simple_cnn | 32 | compiled | 4 vs 1 | 110, 260 vs 100, 200 | 10%, 30% | 20% |" in out, out
    assert "| simple_cnn | 32 | Python | 4 vs 1 | 150, 120 vs 100, 100 | 50%, 20% | 35% |" in out, out
