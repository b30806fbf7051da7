"""Performance: the one-FFT Fourier loss, bench.py, and data.device_loader."""

import inspect
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from torchvision.transforms import v2

import a2mim
import bench
import data
from a2mim import frequency_loss, mask_blocks
from bench import time_steps
from data import DeviceLoader, device_loader, random_resized_crop_params, resized_crop

MEAN = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# The Fourier loss: one FFT of the batch-mean error equals the per-image-spectra definition


def per_image_spectra_frequency_loss(pred_bchw, target_bchw):
    """The straightforward definition (§5): FFT every image, average the complex spectra over the
    batch, D = |F̄(pred) − F̄(target)|², W = log(1 + √D) / max W (no gradient), loss = mean(W·D)."""
    spec_pred = torch.fft.fft2(pred_bchw, norm="ortho").mean(dim=0)
    spec_target = torch.fft.fft2(target_bchw, norm="ortho").mean(dim=0)
    dist = (spec_pred - spec_target).abs() ** 2
    weight = torch.log1p(dist.sqrt()).detach()
    weight = torch.nan_to_num(weight / weight.max(), nan=0.0).clamp(0, 1)
    return (weight * dist).mean()


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (5, 3, 28, 20), (1, 3, 7, 7)])
def test_one_fft_of_the_batch_mean_equals_averaging_per_image_spectra_value_and_gradient(shape):
    target = randn(*shape, seed=2)
    pred = randn(*shape, seed=1).requires_grad_()
    fast, slow = frequency_loss(pred, target), per_image_spectra_frequency_loss(pred, target)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-7)
    (grad_fast,) = torch.autograd.grad(fast, pred)
    (grad_slow,) = torch.autograd.grad(slow, pred)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# bench.py


# One thread: on a busy 2-core machine, two threads per op can wait on each other for ages.
# fmt: off
TINY_BENCH_ARGS = ["--arch", "resnet18", "--img-size", "32", "--width", "8", "--batch-size", "4", "--warmup", "1",
        "--repeats", "2", "--device", "cpu", "--threads", "1"]
# fmt: on


def test_bench_tiny_cpu_run_prints_both_rates_the_time_ratio_and_a_markdown_row(capsys):
    assert bench.main(TINY_BENCH_ARGS + ["--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "torch" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(bench.VARIANTS)]
    rates = {row[0]: float(row[3]) for row in rows}  # name, median ms, min ms, img/s
    assert rates.keys() == set(bench.VARIANTS) and all(r > 0 for r in rates.values())
    assert "ratio a2mim / supervised: step time" in out
    assert "| resnet18 w8 | 32 | 4 | fp32 | cpu |" in out


def test_bench_reports_the_peak_memory_of_each_step_and_their_ratio(capsys):
    assert bench.main(TINY_BENCH_ARGS + ["--arch", "vit_tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("supervised", "a2mim"))]
    assert len(rows) == 2 and all(row.endswith("MiB") for row in rows)
    assert float(out.split("peak memory ")[1].split()[0]) > 0.5  # the ratio


def resolved(*argv):
    return bench.resolve(bench.get_parser().parse_args(argv))


def tiny_cfg(*extra):
    return resolved(*TINY_BENCH_ARGS, *extra)


def test_cpu_peak_memory_grows_with_the_batch_as_activations_do():
    peaks = []
    for b in (4, 32):
        step, model = bench.make_step("supervised", tiny_cfg("--batch-size", str(b)))
        peaks.append(bench.peak_memory(step, model, torch.device("cpu")))
    assert 2 * peaks[0] < peaks[1]


def test_cpu_peak_memory_holds_weights_gradients_and_both_adamw_moments_at_least():
    step, model = bench.make_step("a2mim", tiny_cfg())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights, grads, exp_avg, exp_avg_sq
    assert bench.peak_memory(step, model, torch.device("cpu")) >= 4 * param_bytes


def test_cpu_peak_memory_counts_a_temporary_freed_inside_the_step_but_not_what_existed_before():
    model = torch.nn.Linear(1, 1, bias=False)  # 4 bytes of weights
    before = torch.zeros(8 * 2**20, dtype=torch.uint8)  # allocated before the steps: not counted

    def step():  # allocates 16 MiB, then 4 MiB more while the first is alive, then frees both
        a = torch.ones(16 * 2**20, dtype=torch.uint8)
        b = torch.ones(4 * 2**20, dtype=torch.uint8)
        del a, b

    peak = bench.peak_memory(step, model, torch.device("cpu"))
    assert 20 * 2**20 <= peak < 20 * 2**20 + 2**16
    del before


def test_bench_a2mim_step_draws_a_fresh_mask_inside_every_step_and_updates_the_weights(monkeypatch):
    drawn = []

    def recording_mask_blocks(*args, **kwargs):
        drawn.append(kwargs["device"])
        drawn.append(mask_blocks(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(a2mim, "mask_blocks", recording_mask_blocks)
    cfg = tiny_cfg()
    step, model = bench.make_step("a2mim", cfg)
    before = model.decoder.conv.weight.detach().clone()
    step()
    step()
    (device0, mask0), (device1, mask1) = drawn[:2], drawn[2:]
    assert device0 == device1 == cfg.device and not torch.equal(mask0, mask1)
    assert not torch.equal(before, model.decoder.conv.weight)
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none) ends the step


def test_both_variants_train_on_the_same_batch_from_the_same_encoder_weights():
    (sup_step, sup), (ours_step, ours) = (bench.make_step(v, tiny_cfg()) for v in bench.VARIANTS)
    sup_img, ours_img = (inspect.getclosurevars(s).nonlocals["img"] for s in (sup_step, ours_step))
    assert torch.equal(sup_img, ours_img)
    sup_weights = sup[0].state_dict()  # Sequential(encoder, pool, …)
    ours_weights = ours.encoder.state_dict()
    assert sup_weights.keys() == ours_weights.keys()
    assert all(torch.equal(sup_weights[k], ours_weights[k]) for k in sup_weights)


def test_bench_loader_timing_reports_the_dataloader_and_the_device_loader(capsys):
    assert bench.main(TINY_BENCH_ARGS + ["--no-memory", "--loader", "fake", "--workers", "0"]) == 0
    rates = [
        float(line.split("): ")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("loader fake (")
    ]
    assert len(rates) == 2 and all(r > 0 for r in rates)


@pytest.mark.parametrize(
    "flag,value,want",
    [
        ("--threads", "-1", "at least 1"),
        ("--threads", "0", "at least 1"),
        ("--warmup", "-3", "at least 0"),
        ("--width", "0", "at least 1"),
        ("--repeats", "0", "at least 1"),
        ("--batch-size", "0", "at least 1"),
        ("--img-size", "-32", "at least 1"),
        ("--workers", "-1", "at least 0"),
    ],
)
def test_bench_number_out_of_its_range_is_one_sentence_and_exit_2_before_anything_runs(
    capsys, flag, value, want
):
    threads = torch.get_num_threads()
    argv = TINY_BENCH_ARGS + ["--no-memory", "--loader", "fake", "--threads", str(threads + 1)]
    assert bench.main([*argv, flag, value]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {flag} must be {want}, got {value}\n"
    # no header printed, no thread count set
    assert out == "" and torch.get_num_threads() == threads


def test_bench_range_boundaries_are_accepted_and_an_unset_width_is_16_up_to_64_px():
    assert tiny_cfg("--warmup", "0", "--workers", "0", "--width", "1").width == 1
    widths = [resolved("--device", "cpu", "--img-size", px).width for px in ("64", "96")]
    assert widths == [16, None]


@pytest.mark.parametrize("arch", ["resnet50", "vit_base", "convnext_tiny"])
def test_bench_default_mask_block_fits_the_encoders_token_site_at_96_px(arch):
    # The earlier img_size / 8 (12 px) mapped onto none of their 6×6 or 3×3 token sites.
    assert resolved("--arch", arch, "--img-size", "96", "--device", "cpu").mask_patch_size == 16


def test_bench_size_the_encoder_refuses_names_the_sizes_it_takes_before_anything_runs(capsys):
    threads = torch.get_num_threads()
    argv = TINY_BENCH_ARGS + ["--no-memory", "--threads", str(threads + 1)]
    assert bench.main([*argv, "--arch", "vit_base", "--img-size", "100"]) == 2
    out, err = capsys.readouterr()
    assert err == (
        "error: image size 100 is not divisible by the vit_base patch size 16: vit_base takes multiples of 4 "
        "up to 64 px and of 16 above (…, 80, 96, 112, 128, …)\n"
    )
    # no header printed, no thread count set
    assert out == "" and torch.get_num_threads() == threads


def test_print_config_prints_each_resolved_setting_and_its_origin_and_runs_nothing(capsys):
    threads = torch.get_num_threads()
    assert bench.main(["--device", "cpu", "--threads", str(threads + 1), "--print-config"]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split(maxsplit=2)[1:] for line in out.splitlines()}
    assert set(table) == {s.name for s in bench.SETTINGS} | {"mask_patch_size"}
    assert table["device"] == ['"cpu"', "command line"]
    assert table["batch_size"] == ["32", "default"]
    assert table["width"] == ["16", "default (up to 64 px)"]  # what an unset width means at 32 px
    assert table["mask_patch_size"] == ["4", "train.py's default block (§2)"]
    # no header printed, no thread count set
    assert "bench:" not in out and torch.get_num_threads() == threads


def busy_children_of(parent):
    """Pids of the children of process `parent` that are bench's busy loops (read from Linux's /proc)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # it ended while we looked
            continue
        if ppid == str(parent) and bench.BUSY_LOOP.encode() in cmdline:
            pids.add(int(stat.parent.name))
    return pids


def busy_children():
    return busy_children_of(os.getpid())


def test_bench_busy_spins_that_many_processes_while_the_steps_are_timed_and_ends_them(
    monkeypatch, capsys
):
    seen = []

    def recording_time_steps(*args, **kwargs):
        seen.append(busy_children())
        return time_steps(*args, **kwargs)

    monkeypatch.setattr(bench, "time_steps", recording_time_steps)
    # named in the header: it decides how much the busy ones cost
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert bench.main(TINY_BENCH_ARGS + ["--no-memory", "--busy", "2"]) == 0
    assert len(seen) == 1 and len(seen[0]) == 2
    assert not busy_children()  # killed and reaped
    out = capsys.readouterr().out
    said = "OpenMP wait OMP_WAIT_POLICY=PASSIVE; busy-looping processes beside the timed steps: 2"
    assert said in out


def test_bench_busy_processes_end_when_a_timed_step_raises(monkeypatch):
    def bug():
        assert len(busy_children()) == 1
        raise RuntimeError("a bug in the step")

    with pytest.raises(RuntimeError, match="a bug in the step"):
        bench.time_steps_beside_busy_processes(1, {"step": bug}, torch.device("cpu"), 0, 1)
    assert not busy_children()


def running(pid):
    """Whether process `pid` exists and has not ended (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_busy_process_ends_when_bench_is_killed_without_a_chance_to_end_it():
    step_forever = (
        "import time, torch, bench\nstep = {'step': lambda: time.sleep(3600)}\n"
        "bench.time_steps_beside_busy_processes(1, step, torch.device('cpu'), 0, 1)"
    )
    bench_proc = subprocess.Popen(
        [sys.executable, "-c", step_forever], cwd=Path(bench.__file__).parent
    )
    hog = None
    while hog is None and bench_proc.poll() is None:  # until bench has started its busy process
        hog = next(iter(busy_children_of(bench_proc.pid)), None)
        time.sleep(0.1)
    assert hog is not None, "bench ended before it started its busy process"
    bench_proc.kill()
    bench_proc.wait()
    # It sees its parent gone at its next turn of the loop: up to a minute of a busy machine.
    for _ in range(600):
        if not running(hog):
            return
        time.sleep(0.1)
    os.kill(hog, 9)
    pytest.fail("the busy process outlived bench")


@pytest.mark.parametrize("script", ["bench", "train", "eval_linear", "reconstruct"])
@pytest.mark.parametrize(
    "user,seen",
    [
        ({}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "3000"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}),
        ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"}),
    ],
)
def test_torch_loads_with_short_openmp_spinning_unless_the_user_chose_how_threads_wait(
    openmp_probe, script, user, seen
):
    assert openmp_probe(script, user) == seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_on_cuda_without_a_gpu_is_one_sentence_and_exit_code_2(capsys):
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


# ----------------------------------------------------------------------------------------------
# data.device_loader: the pre-training pipeline on the device, for the small datasets


def write_fashion_idx(folder, n, seed=0):
    """Fashion-MNIST's IDX files (uncompressed) with random 28×28 images, label = i % 10."""
    images = torch.randint(
        0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    for name, array in (
        ("train-images-idx3-ubyte", images),
        ("train-labels-idx1-ubyte", torch.arange(n) % 10),
    ):
        array = array.to(torch.uint8)
        header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / name).write_bytes(header + array.numpy().tobytes())
    return images


def numbered_loader(n, batch_size, **kw):
    """A DeviceLoader over n blank 8×8 images whose label is their index."""
    return DeviceLoader(
        torch.zeros(n, 3, 8, 8, dtype=torch.uint8), torch.arange(n), batch_size, img_size=8, **kw
    )


def test_device_loader_yields_normalised_3_channel_float_batches_resized_from_28_to_32(tmp_path):
    write_fashion_idx(tmp_path, 40)
    loader = device_loader("fashion-mnist", "train", 16, "cpu", data_dir=tmp_path)
    batches = list(loader)
    assert len(loader) == len(batches) == 2  # 40 // 16, the last 8 dropped
    img, labels = batches[0]
    assert img.shape == (16, 3, 32, 32) and img.dtype == torch.float32
    assert labels.dtype == torch.long
    pixels = img * STD + MEAN  # back to 0..1
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2])  # grey replicated to three channels
    assert loader.num_classes == 10 and ((labels >= 0) & (labels < 10)).all()


def test_device_loader_is_the_same_for_the_same_seed_and_epoch_and_differs_for_another_epoch(
    tmp_path,
):
    write_fashion_idx(tmp_path, 32)

    def epoch(e, seed=0):
        loader = device_loader("fashion-mnist", "train", 8, "cpu", data_dir=tmp_path, seed=seed)
        data.set_epoch(loader, e)  # the DataLoader helper works for this loader too
        return [torch.cat(parts) for parts in zip(*loader, strict=True)]  # images, labels

    (img0, lab0), (img0b, lab0b), (img1, _) = epoch(0), epoch(0), epoch(1)
    assert torch.equal(img0, img0b) and torch.equal(lab0, lab0b)
    assert not torch.equal(img0, img1)
    assert not torch.equal(epoch(0, seed=1)[0], img0)


def test_device_loader_order_is_the_cpu_loaders_order_for_one_process():
    loader = numbered_loader(50, 10, seed=3)
    ds = torch.utils.data.TensorDataset(torch.zeros(50))
    cpu_loader = data.build_loader(ds, 10, workers=0, seed=3)
    for e in (0, 4):
        data.set_epoch(loader, e)
        data.set_epoch(cpu_loader, e)
        assert torch.cat([labels for _, labels in loader]).tolist() == list(cpu_loader.sampler)


def test_device_loader_shards_of_two_ranks_are_disjoint_cover_the_epoch_and_match_distributed_sampler():
    n, world = 41, 2
    shards = []
    for rank in range(world):
        loader = numbered_loader(n, 4, seed=7, world_size=world, rank=rank)
        loader.set_epoch(2)
        shards.append(torch.cat([labels for _, labels in loader]).tolist())
        sampler = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True
        )
        sampler.set_epoch(2)
        assert loader.indices().tolist() == list(sampler)
    assert len(shards[0]) == len(shards[1]) == 20  # 41 // 2 = 20 per rank, 5 full batches of 4
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 40  # all but the one sample drop_last leaves out
    # with the dataset divisible by world × batch, the two shards cover every sample
    seen = []
    for rank in range(2):
        seen += [i for _, labels in numbered_loader(48, 4, world_size=2, rank=rank) for i in labels]
    assert sorted(int(i) for i in seen) == list(range(48))


def test_crop_of_the_whole_image_without_flip_is_the_plain_bilinear_resize():
    img = torch.randint(0, 256, (3, 2, 28, 28), dtype=torch.uint8)
    whole = [torch.zeros(3, dtype=torch.long)] * 2 + [torch.full((3,), 28)] * 2
    for size in (32, 28, 20):  # up, same, down
        expected = F.interpolate(img.float(), size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(resized_crop(img, *whole, size), expected, rtol=0, atol=1e-3)
    flipped = resized_crop(img, *whole, 32, torch.tensor([True, False, True]))
    expected = F.interpolate(img.float(), size=32, mode="bilinear", align_corners=False)
    torch.testing.assert_close(flipped[[0, 2]], expected[[0, 2]].flip(-1), rtol=0, atol=1e-3)
    torch.testing.assert_close(flipped[1], expected[1], rtol=0, atol=1e-3)


def test_crop_of_a_box_is_the_bilinear_resize_of_that_box_alone_not_of_its_neighbours():
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    top, left = torch.tensor([3, 0]), torch.tensor([5, 9])
    h, w = torch.tensor([25, 32]), torch.tensor([27, 21])
    out = resized_crop(img, top, left, h, w, 32)
    for b in range(2):
        box = img[b : b + 1, :, top[b] : top[b] + h[b], left[b] : left[b] + w[b]].float()
        expected = F.interpolate(box, size=32, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-3)


def test_whole_image_crop_matches_the_cpu_pipelines_resize_to_within_uint8_rounding():
    grey = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    loader = DeviceLoader(grey, torch.zeros(1, dtype=torch.long), 1, img_size=32)
    whole = [torch.tensor([0]), torch.tensor([0]), torch.tensor([28]), torch.tensor([28])]
    ours = torch.addcmul(loader.add_13, resized_crop(grey, *whole, 32), loader.mul_13)[0]
    cpu = data.build_transform("none", 32)(grey[0].expand(3, -1, -1))  # what build_dataset does
    assert (ours - cpu).abs().max() <= 1.01 / 255 / min(data.IMAGENET_STD)


@pytest.mark.parametrize("family,scale", [("cnn", (0.8, 1.0)), ("vit", (0.67, 1.0))])
def test_crop_boxes_have_the_distribution_of_torchvisions_random_resized_crop(family, scale):
    torch.manual_seed(0)
    tv = v2.RandomResizedCrop(32, scale=scale)
    image = torch.zeros(1, 28, 28)
    # rows of (top, left, h, w)
    ref = torch.tensor([list(tv.make_params([image]).values()) for _ in range(4000)])
    generator = torch.Generator().manual_seed(1)
    ours = torch.stack(random_resized_crop_params(20000, 28, 28, scale, generator=generator), 1)
    assert ours.min() >= 0
    assert ((ours[:, 0] + ours[:, 2]) <= 28).all() and ((ours[:, 1] + ours[:, 3]) <= 28).all()
    for k in range(4):  # each coordinate's histogram within sampling noise of torchvision's
        hist_ref = torch.bincount(ref[:, k], minlength=29).float() / len(ref)
        hist_ours = torch.bincount(ours[:, k], minlength=29).float() / len(ours)
        assert (hist_ref - hist_ours).abs().max() < 0.03, k
    area = (ours[:, 2] * ours[:, 3]).float() / 28**2
    assert area.min() >= scale[0] - 0.05 and area.max() <= 1.0


def test_device_loader_flips_half_of_the_images():
    half = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    half[..., 14:] = 255  # right half white
    images, labels = half.expand(4000, -1, -1, -1), torch.zeros(4000, dtype=torch.long)
    loader = DeviceLoader(images, labels, 4000, img_size=32)
    img = loader.augment(loader.images_nchw, torch.Generator().manual_seed(0))
    left, right = img[:, 0, :, :16].mean(dim=(1, 2)), img[:, 0, :, 16:].mean(dim=(1, 2))
    assert 0.46 < (left > right).float().mean() < 0.54


def test_device_loader_generates_the_fake_dataset_and_refuses_large_datasets():
    img, labels = next(iter(device_loader("fake", "train", 8, "cpu", fake_size=16, crop="vit")))
    assert img.shape == (8, 3, 32, 32) and labels.shape == (8,)
    with pytest.raises(data.DataError, match="too large"):
        device_loader("imagenet", "train", 8, "cpu")
    with pytest.raises(ValueError, match="exceeds"):
        numbered_loader(10, 6, world_size=2)


# ----------------------------------------------------------------------------------------------
# gpu_check.sh: it cannot run without a GPU, but it must parse and call only real flags


TORCHRUN_FLAGS = {"--standalone", "--nproc_per_node"}


def script_of(code):
    """Which script a line of gpu_check.sh passes its flags to, by the names in it (None: no known one)."""
    if re.search(r"eval_linear|EVAL", code):
        return "eval_linear"
    if "bench.py" in code:
        return "bench"
    if re.search(r"\btrain\b|train\.py|SMALL=|args=\(", code):
        return "train"
    return None


def test_gpu_check_script_parses_and_every_flag_it_passes_exists_in_that_scripts_help():
    import eval_linear
    import train

    script = Path(__file__).with_name("gpu_check.sh")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    known = {
        name: {s for a in module.get_parser()._actions for s in a.option_strings}
        for name, module in (("train", train), ("eval_linear", eval_linear), ("bench", bench))
    }
    checked = {name: 0 for name in known}
    # logical lines (continuations joined), comments cut off
    for line in script.read_text().replace("\\\n", " ").splitlines():
        code = "" if line.lstrip().startswith("#") else line.split(" # ")[0]
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", code)) - TORCHRUN_FLAGS
        if not flags:
            continue
        owner = script_of(code)
        assert owner, f"flags {sorted(flags)} in a line of no known script: {code.strip()}"
        assert flags <= known[owner], (
            f"{owner}.py has no {sorted(flags - known[owner])}: {code.strip()}"
        )
        checked[owner] += len(flags)
    assert all(checked.values()), checked  # each script's flags were found and checked
