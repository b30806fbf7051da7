"""Tests of pre-training (train.py): presets, distributed equivalence, accumulation, resume.

All on CPU with the gloo backend and the synthetic `fake` dataset; a few seconds each.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import runtime
import train
from a2mim import A2MIM, mask_blocks
from models import build_encoder

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--data", "fake", "--batch-size", "16", "--workers", "0", "--vis-every", "0", "--log-every", "4"]


def resolved(*argv, world=1):
    args = train.get_parser().parse_args(list(argv))
    return train.resolve_config(args, world)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path):
    return train.load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------------------------------------
# The official recipes (PAPER.md §6)
# ---------------------------------------------------------------------------------------------


def test_official_resnet50_preset_matches_paper_at_8_gpus():
    cfg = resolved("--arch", "resnet50", "--preset", "official", world=8)
    assert cfg["global_batch"] == 2048 and cfg["batch_size"] == 256
    assert cfg["lr"] == pytest.approx(1.2e-3)
    assert (cfg["schedule"], cfg["warmup_epochs"], cfg["min_lr"]) == ("cosine", 10, 1e-5)
    assert (cfg["weight_decay"], cfg["token_lr_scale"], cfg["clip_grad"]) == (0.05, 0.1, None)
    assert (cfg["img_size"], cfg["mask_patch_size"], cfg["mask_ratio"]) == (224, 32, 0.6)
    assert (cfg["epochs"], cfg["data"], cfg["width"]) == (300, "imagenet", 64)


def test_official_vit_base_preset_matches_paper_at_8_gpus():
    cfg = resolved("--arch", "vit_base", "--preset", "official", world=8)
    assert (cfg["batch_size"], cfg["accum_steps"], cfg["global_batch"]) == (128, 2, 2048)
    assert cfg["lr"] == pytest.approx(4e-4)
    assert (cfg["schedule"], cfg["step_epoch"], cfg["epochs"], cfg["warmup_epochs"]) == ("step", 700, 800, 10)
    assert (cfg["clip_grad"], cfg["drop_path"], cfg["weight_decay"]) == (5.0, 0.1, 0.05)


def test_command_line_flags_override_the_preset():
    cfg = resolved("--arch", "resnet50", "--preset", "official", "--batch-size", "64", "--epochs", "100", world=8)
    assert cfg["global_batch"] == 512 and cfg["lr"] == pytest.approx(3e-4) and cfg["epochs"] == 100


def test_print_config_prints_resolved_json():
    out = subprocess.run([sys.executable, "train.py", "--arch", "vit_base", "--preset", "official",
                          "--print-config", "--assume-world-size", "8"], cwd=HERE, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["lr"] == pytest.approx(4e-4)


def test_no_weight_decay_on_norm_bias_token_and_token_lr_scaled():
    model = A2MIM(build_encoder("resnet18", 32, width=8), mask_patch_size=4)
    groups = train.param_groups(model, weight_decay=0.05, token_lr_scale=0.1)
    name_of = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        names = [name_of[id(p)] for p in g["params"]]
        for n in names:
            decayed = not (n.endswith(".bias") or "bn" in n or "mask_token" in n or "downsample.1" in n)
            assert (g["weight_decay"] > 0) == decayed, n
            assert g["lr_scale"] == (0.1 if "mask_token" in n else 1.0), n
    vit = A2MIM(build_encoder("vit_tiny", 32), mask_patch_size=4)
    no_wd = {n for n, p in vit.named_parameters() if runtime.no_weight_decay(n, p)}
    assert {"encoder.pos_embed", "encoder.cls_token", "encoder.blocks.0.gamma_1",
            "encoder.blocks.0.rel_pos_bias.table", "mask_token.token"} <= no_wd
    assert "encoder.blocks.0.qkv.weight" not in no_wd


def test_lr_schedule_warms_up_then_follows_cosine_or_step():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.0)
    assert train.lr_at(0, **kw) == pytest.approx(0.1) and train.lr_at(9, **kw) == pytest.approx(1.0)
    assert train.lr_at(55, **kw) == pytest.approx(0.5) and train.lr_at(100, **kw) == pytest.approx(0.0)
    step = dict(kw, schedule="step", step_at=[70])
    assert train.lr_at(69, **step) == 1.0 and train.lr_at(70, **step) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Distributed: same result on 2 ranks as on 1 process with the whole batch
# ---------------------------------------------------------------------------------------------


def _tiny_vit_model():
    """A ViT has no BatchNorm, so a split batch gives exactly the whole batch's gradient.
    The Fourier term is off: its spectra are averaged over each process's own batch (as in the
    released code), which is *not* additive over a split batch."""
    torch.manual_seed(0)
    return A2MIM(build_encoder("vit_tiny", 32, drop_path=0.0), mask_patch_size=4, fft_weight=0.0)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), mask_blocks(8, 32, 4, generator=g)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_grad_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = runtime.setup_distributed(device="cpu")
    model = torch.nn.parallel.DistributedDataParallel(_tiny_vit_model())
    img, mask = _batch()
    half = slice(4 * rank, 4 * rank + 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.forward_backward(model, img[half], env, "fp32", scaler, mask=mask[half])
    torch.save(_grads(model.module), os.path.join(out_dir, f"grads{rank}.pt"))
    runtime.cleanup_distributed()


def test_two_rank_vit_gradient_equals_single_process_batch(tmp_path):
    mp.spawn(_ddp_grad_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    model, (img, mask) = _tiny_vit_model(), _batch()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train.forward_backward(model, img, runtime.Dist(), "fp32", scaler, mask=mask)
    whole = _grads(model)
    for rank in range(2):
        split = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert split.keys() == whole.keys()
        for k in whole:
            torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-6, msg=k)


def test_accumulating_two_half_batches_equals_the_whole_batch():
    img, mask = _batch()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    whole_model, accum_model = _tiny_vit_model(), _tiny_vit_model()
    train.forward_backward(whole_model, img, runtime.Dist(), "fp32", scaler, mask=mask)
    for half in (slice(0, 4), slice(4, 8)):
        train.forward_backward(accum_model, img[half], runtime.Dist(), "fp32", scaler, accum=2, mask=mask[half])
    whole, accum = _grads(whole_model), _grads(accum_model)
    for k in whole:
        torch.testing.assert_close(accum[k], whole[k], rtol=1e-4, atol=1e-6, msg=k)


TORCHRUN_SCRIPT = """
import sys, torch, runtime, train
args = train.get_parser().parse_args(sys.argv[2:])
env = runtime.setup_distributed()
cfg = train.resolve_config(args, env.world_size)
model = train.run(cfg, args, env)
torch.save(model.state_dict(), f"{sys.argv[1]}/rank{env.rank}.pt")
runtime.cleanup_distributed()
"""


def test_torchrun_two_process_gloo_run_finishes_with_identical_weights_on_both_ranks(tmp_path):
    script = tmp_path / "run_and_dump.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           str(script), str(tmp_path), *TINY, "--max-steps", "3", "--out-dir", str(tmp_path / "out")]
    out = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert_same_weights(r0, r1)
    ckpt = train.load_checkpoint(tmp_path / "out" / "a2mim_resnet18_fake" / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["global_batch"] == 32
    assert_same_weights(ckpt["model"], r0)


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_after", [10, 32])  # mid-epoch, and exactly at the epoch boundary
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, stop_after):
    common = [*TINY, "--epochs", "2", "--arch", "resnet18", "--width", "8"]
    assert train.main([*common, "--out-dir", str(tmp_path / "a")]) == 0
    assert train.main([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", str(stop_after)]) == 0
    stopped = train.load_checkpoint(tmp_path / "b" / "a2mim_resnet18_fake" / "checkpoint.pt")
    assert stopped["step"] == stop_after
    assert train.main([*common, "--out-dir", str(tmp_path / "b")]) == 0  # same command: resumes itself
    a = weights(tmp_path / "a" / "a2mim_resnet18_fake" / "checkpoint.pt")
    b = weights(tmp_path / "b" / "a2mim_resnet18_fake" / "checkpoint.pt")
    assert_same_weights(a, b)


def test_run_folder_writes_checkpoint_log_and_reconstructions(tmp_path, capsys):
    argv = [*TINY, "--max-steps", "4", "--vis-every", "2", "--out-dir", str(tmp_path)]
    assert train.main(argv) == 0
    run = tmp_path / "a2mim_resnet18_fake"
    assert {"checkpoint.pt", "config.json", "log.jsonl", "recon_step000002.png", "recon_step000004.png"} <= set(os.listdir(run))
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "loss_spatial", "loss_freq", "lr", "img_per_s"} <= rec.keys()
    assert "python eval_linear.py --checkpoint" in capsys.readouterr().out
    assert not list(run.glob("*.tmp"))  # the atomic write left no temporary file


def test_folder_of_another_run_is_refused_and_left_untouched(tmp_path, capsys):
    assert train.main([*TINY, "--max-steps", "2", "--out-dir", str(tmp_path)]) == 0
    ckpt = tmp_path / "a2mim_resnet18_fake" / "checkpoint.pt"
    before = ckpt.read_bytes()
    assert train.main([*TINY, "--max-steps", "2", "--out-dir", str(tmp_path), "--mask-ratio", "0.5"]) == 2
    assert "holds a different run" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_resume_refuses_a_checkpoint_of_another_arch(tmp_path, capsys):
    assert train.main([*TINY, "--max-steps", "1", "--out-dir", str(tmp_path)]) == 0
    ckpt = str(tmp_path / "a2mim_resnet18_fake" / "checkpoint.pt")
    code = train.main([*TINY, "--arch", "vit_tiny", "--out-dir", str(tmp_path / "v"), "--resume", ckpt])
    assert code == 2 and "holds a resnet18 model, but --arch is vit_tiny" in capsys.readouterr().err


def test_non_checkpoint_file_is_refused_with_one_sentence(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointError, match="not a readable PyTorch checkpoint"):
        train.load_checkpoint(bad)
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(train.CheckpointError, match="not an A²MIM checkpoint"):
        train.load_checkpoint(bad)


def test_ablation_flags_reach_the_model_and_the_rest_keep_the_family_defaults():
    cfg = resolved("--data", "fake", "--fill", "zero", "--token-at", "stem", "--token-mode", "add", "--fft-weight", "0")
    model = train.build_model(cfg, runtime.Dist())
    assert (model.cfg["fill"], model.token_at, model.cfg["token_mode"], model.cfg["fft_weight"]) == ("zero", "layer1", "add", 0.0)
    assert (model.cfg["spatial"], model.cfg["fft_unmask_weight"]) == ("focal_l1", 1e-3)  # untouched CNN defaults


def test_device_resident_data_resumes_exactly_like_the_loader(tmp_path):
    """--device-data on (the GPU default for small datasets) keeps the resume guarantee."""
    common = [*TINY, "--epochs", "2", "--width", "8", "--device-data", "on"]
    assert train.main([*common, "--out-dir", str(tmp_path / "a")]) == 0
    assert train.main([*common, "--out-dir", str(tmp_path / "b"), "--max-steps", "10"]) == 0
    assert train.main([*common, "--out-dir", str(tmp_path / "b")]) == 0
    assert_same_weights(weights(tmp_path / "a" / "a2mim_resnet18_fake" / "checkpoint.pt"),
                        weights(tmp_path / "b" / "a2mim_resnet18_fake" / "checkpoint.pt"))
