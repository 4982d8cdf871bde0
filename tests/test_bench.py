"""`mae bench`: analytic FLOPs against torch's FlopCounterMode, the paper's Table 1c ratio, the peer model's weight
mapping, memory measurement, and seconds-long smoke runs of every suite. Real measurements stay out of CI
(benchmarks/ and docs/benchmarks.md)."""

import json

import pytest
import torch

from mae.bench.flops import counted_flops, mae_flops, table1c_ratio
from mae.bench.measure import PeakMemory, matmul_peak
from mae.cli import main
from mae.config import load_config
from mae.errors import ConfigError
from mae.models import MaskedAutoencoderViT, build_model, model_config
from mae.recipes.bench import BenchConfig

MICRO = "mae_vit_micro_patch4_28"


def test_analytic_flops_equal_flop_counter_on_a_real_forward_backward():
    """On real CPU tensors (attention through the CPU flash kernel), the analytic count equals FlopCounterMode's
    forward count and is within 1% of its forward + backward count (the patch conv needs no input gradient)."""
    model = build_model(MICRO)
    counted = counted_flops(model, torch.randn(3, 1, 28, 28))
    analytic = mae_flops(model.config)
    assert counted["forward"] == pytest.approx(analytic.forward, rel=1e-3)
    assert counted["train"] == pytest.approx(analytic.train, rel=0.01)
    assert any("flash_attention" in op or "bmm" in op for op in counted["by_op"]), "attention was not counted"


@pytest.mark.parametrize("overrides", [{}, {"mask_in_encoder": True}, {"decoder_depth": 1, "mask_ratio": 0.5}])
def test_analytic_flops_match_flop_counter_for_vit_large_on_meta(overrides):
    """ViT-L/16 on the meta device (no memory, no compute): analytic and counted FLOPs agree within a few %."""
    with torch.device("meta"):
        model = build_model("mae_vit_large_patch16", **overrides)
    counted = counted_flops(model, torch.empty(2, 3, 224, 224, device="meta"))
    analytic = mae_flops(model.config)
    assert counted["forward"] == pytest.approx(analytic.forward, rel=0.01)
    assert counted["train"] == pytest.approx(analytic.train, rel=0.03)


def test_table1c_ratio_for_vit_large_is_the_papers_3_3x():
    """Paper Table 1c: the encoder with mask tokens costs 3.3x the FLOPs of the MAE (ViT-L, decoder 8 x 512)."""
    ratio = table1c_ratio(model_config("mae_vit_large_patch16"))["ratio"]
    assert ratio == pytest.approx(3.3, abs=0.3)


def test_mask_tokens_in_encoder_make_the_encoder_see_every_patch():
    """With mask tokens in the encoder it runs on 1 + L tokens; the MAE encoder on 1 + 25% of L."""
    cfg = model_config("mae_vit_base_patch16")
    assert mae_flops(cfg).encoder_tokens == 1 + 49
    assert mae_flops(cfg.replace(mask_in_encoder=True)).encoder_tokens == 1 + 196
    assert mae_flops(cfg).train == pytest.approx(3 * mae_flops(cfg).forward)


def test_peak_memory_sees_a_large_cpu_allocation():
    """The CPU meter (VmHWM reset through /proc/self/clear_refs) reports at least the bytes a tensor touched."""
    meter = PeakMemory(torch.device("cpu")).start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    peak = meter.stop()
    if peak is None:
        pytest.skip("no /proc/self/clear_refs on this system")
    assert peak >= 60 * 2**20


def test_matmul_peak_is_positive():
    """The MFU denominator: a measured FLOP/s of a square matmul."""
    peak = matmul_peak(torch.device("cpu"), torch.float32, size=128, repeats=2)
    assert peak["flops_per_s"] > 0 and peak["size"] == 128


def test_hugging_face_peer_has_the_same_weights_and_loss():
    """The peer is the identical architecture: with our weights mapped in and the same noise, the losses match."""
    pytest.importorskip("transformers")
    from mae.bench.step import hf_from_ours

    for name, overrides in ((MICRO, {}), ("mae_vit_base_patch16", {"img_size": 32, "depth": 2, "decoder_depth": 1})):
        torch.manual_seed(0)
        ours = MaskedAutoencoderViT(model_config(name, **overrides)).eval()
        hf = hf_from_ours(ours).eval()
        c = ours.config
        imgs, noise = torch.randn(2, c.in_chans, *c.image_hw), torch.rand(2, c.grid_size[0] * c.grid_size[1])
        with torch.no_grad():
            assert ours(imgs, noise=noise)[0].item() == pytest.approx(hf(pixel_values=imgs, noise=noise).loss.item(),
                                                                       rel=1e-5)


def test_bench_config_rejects_unknown_suites_and_optimizers():
    """Bad settings fail at start-up with the valid choices named."""
    with pytest.raises(ConfigError, match="unknown suite"):
        load_config(BenchConfig, None, ["suite=tabel2"])
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(BenchConfig, None, ["optimizer=sgd"])
    assert load_config(BenchConfig, None, ["suite=all"]).suites()[0] == "step"


def _bench(tmp_path, *args) -> dict:
    code = main(["-q", "bench", "--output-dir", str(tmp_path), "--device", "cpu", "--model", MICRO,
                 "warmup=1", "steps=1", "peak_matmul_size=128", *args])
    assert code == 0
    return json.loads((tmp_path / "bench.json").read_text())


def test_mae_bench_step_and_table1c_smoke(tmp_path, capsys):
    """`mae bench` times a tiny config, writes JSON + Markdown, and prints the headline numbers."""
    result = _bench(tmp_path, "--batch-size", "4", "--suite", "step,table1c", "--precision", "fp32")
    row = result["suites"]["step"]["rows"][0]
    assert row["images_per_s"] > 0 and row["batch_size"] == 4 and row["precision"] == "fp32"
    assert 0 < row["mfu"] < 5  # a tiny model is far from the peak; the bound only catches unit mistakes
    assert result["suites"]["step"]["flop_check"]["train_ratio"] == pytest.approx(1.0, abs=0.03)
    assert result["suites"]["table1c"]["ratio_large"] == pytest.approx(3.3, abs=0.3)
    assert result["machine"]["cpu"] and "mae bench" in result["command"] and "suite=step,table1c" in result["command"]
    assert (tmp_path / "bench.md").read_text().count("|") > 10
    out = capsys.readouterr().out
    assert "images_per_s" in out and "table1c_ratio_vit_large" in out


def test_mae_bench_peer_table2_scaling_and_data_smoke(tmp_path):
    """The other suites run end to end on tiny settings: ratios, speed-ups, plots and pipeline rows come out."""
    pytest.importorskip("transformers")
    result = _bench(tmp_path, "--batch-size", "2", "--suite", "peer,table2,scaling,data",
                    "peer.precisions=[fp32]", "table2.encoders=[tiny]", "table2.img_size=32", "table2.batch_size=2",
                    "scaling.batch_sizes=[1,2]", "scaling.mask_ratios=[0.5]", f"scaling.models=[{MICRO}]",
                    "scaling.batch_size=2", "data.num_images=3", "data.decoders=[pil,tensor]", "data.workers=[0]",
                    "data.batch_size=2", "data.batches=1", "data.img_size=32")
    suites = result["suites"]
    assert suites["peer"]["same_precision_ratio"]["fp32"] > 0
    assert suites["peer"]["weights_check"]["abs_diff"] < 1e-4
    assert suites["peer"]["reference_ratio"]["fp32"] > 0
    assert next(r["variant"] for r in suites["table2"]["rows"]).startswith("encoder w/ mask tokens")
    assert suites["table2"]["speedups"][0]["speedup_dec1"] > 0
    assert {r["axis"] for r in suites["scaling"]["rows"]} == {"batch_size", "mask_ratio", "model"}
    assert any(r["grad_checkpointing"] for r in suites["scaling"]["rows"])
    for png in suites["scaling"]["plots"] + suites["data"]["plots"]:
        assert (tmp_path / png.rsplit("/", 1)[-1]).stat().st_size > 1000
    assert {r["decoder"] for r in suites["data"]["rows"]} == {"pil", "tensor"}
    assert all(r["image_shape"] == [3, 32, 32] for r in suites["data"]["rows"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mae_bench_on_cuda_reports_memory_and_mfu(tmp_path):
    """On a GPU the step is timed with synchronisation, memory comes from the caching allocator, MFU is sane."""
    code = main(["-q", "bench", "--output-dir", str(tmp_path), "--device", "cuda", "--model", MICRO,
                 "--batch-size", "64", "warmup=2", "steps=3", "--precision", "bf16"])
    assert code == 0
    row = json.loads((tmp_path / "bench.json").read_text())["suites"]["step"]["rows"][0]
    assert row["peak_memory_mib"] > 0 and 0 < row["mfu"] < 1


def test_the_reference_step_trains_the_same_weights_to_the_same_loss():
    """`build_reference` (written-out attention, default AdamW) starts from `build_ours`'s weights and batch and
    trains them alike: the same masking noise gives the same loss at every step (1e-5) and, after 3 steps, the same
    weights (1e-5, measured 2e-6, where the steps moved them by up to 3e-4): the peer differs in speed only.

    The attention key biases are left out of the weight comparison: their gradient is analytically zero (softmax
    ignores a shift common to all keys), so AdamW turns the two attentions' different rounding noise into steps of
    up to lr (see test_distributed.py)."""
    from mae.bench.step import build_ours, build_reference
    from mae.models import model_config

    cfg = model_config(MICRO)
    ours = build_ours(cfg, 2, "fp32", torch.device("cpu"))
    ref = build_reference(cfg, 2, "fp32", torch.device("cpu"))
    assert type(ref.model.blocks[0].attn).__module__.startswith("timm")
    start = {k: v.clone() for k, v in ours.model.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in ref.model.state_dict().items())
    imgs = torch.randn(3, cfg.in_chans, *cfg.image_hw)
    noise = torch.rand(3, cfg.grid_size[0] * cfg.grid_size[1])
    with torch.no_grad():
        a, b = ours.model(imgs, noise=noise)[0], ref.model(imgs, noise=noise)[0]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for step in range(3):
        torch.manual_seed(step)  # the step's masking noise, the same for both
        loss_ours = ours.step()
        torch.manual_seed(step)
        loss_ref = ref.step()
        assert loss_ref == pytest.approx(loss_ours, rel=1e-5), step
    wa, wb = ours.model.state_dict(), ref.model.state_dict()
    moved, worst = 0.0, {}
    for k in wa:
        diff, step_size = (wa[k] - wb[k]).abs(), (wa[k] - start[k]).abs()
        if k.endswith("attn.qkv.bias"):
            dim = diff.numel() // 3
            diff, step_size = torch.cat([diff[:dim], diff[2 * dim:]]), torch.cat([step_size[:dim], step_size[2 * dim:]])
        moved, worst[k] = max(moved, step_size.max().item()), diff.max().item()
    assert moved > 1e-4 and max(worst.values()) < 1e-5, (moved, sorted(worst.items(), key=lambda kv: -kv[1])[:3])
