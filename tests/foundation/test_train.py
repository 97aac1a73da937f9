"""The trainer learns, writes a loadable checkpoint + model card, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from patchcast.augment import CodecRoundTrip, augment, glances, pick_tokens
from patchcast.train import TrainConfig, lr_at, train
from shared.errors import ConfigError
from shared.models import VitArch, build_model


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes told apart by colour, which survives the crop + flip augmentation (position would not:
    a one-layer toy model overfits to the shifted crops)."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for label, channel in (("a", 0), ("b", 1)):
        (root / label).mkdir()
        for i in range(24):
            img = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
            img[..., channel] += 100
            Image.fromarray(img).save(root / label / f"{i}.png")
    return root


def _cfg(data: Path, out: Path, epochs: int = 3, arch: VitArch | None = None, **kw: object) -> TrainConfig:
    arch = arch or VitArch(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
    settings: dict[str, object] = {"batch_size": 8, "lr": 3e-3, "warmup_epochs": 0.5, "name": "toy", "command": "test",
                                   **kw}
    return TrainConfig(data=str(data), test_data=str(data), out=str(out), arch=arch, epochs=epochs,
                       **settings)  # type: ignore[arg-type]


def test_training_learns_and_writes_card(toy_data: Path, tmp_path: Path) -> None:
    card = train(_cfg(toy_data, tmp_path / "run", epochs=4, token_dropout=0.5))
    assert card["test_accuracy"] >= 0.9  # separable toy task
    saved = json.loads((tmp_path / "run" / "toy.json").read_text())
    assert saved["test_accuracy"] == card["test_accuracy"] and saved["epochs"] == 4
    assert saved["data"]["train_images"] == 48 and "Test accuracy" in (tmp_path / "run" / "toy.md").read_text()
    loaded = build_model(f"file:{tmp_path / 'run' / 'model.safetensors'}")
    assert loaded.class_names == ["a", "b"] and loaded.preprocess.input_size == 32


def test_resume_after_interruption_is_exact(toy_data: Path, tmp_path: Path) -> None:
    train(_cfg(toy_data, tmp_path / "straight"))

    class Stop(Exception):
        pass

    def stop_after_first_epoch(kind: str, done: int, total: int, info: dict[str, float]) -> None:
        if kind == "epoch" and done == 1:
            raise Stop

    with pytest.raises(Stop):
        train(_cfg(toy_data, tmp_path / "resumed"), stop_after_first_epoch)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    train(_cfg(toy_data, tmp_path / "resumed"))
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    base = 1e-3
    assert lr_at(0, 100, 10, base) == pytest.approx(1e-4)
    assert lr_at(9, 100, 10, base) == pytest.approx(base)
    assert lr_at(10, 100, 10, base) == pytest.approx(base)
    assert lr_at(55, 100, 10, base) == pytest.approx(base / 2)
    assert lr_at(100, 100, 10, base) == pytest.approx(0.0, abs=1e-12)


def test_augment_keeps_shape_and_pixels() -> None:
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    out = augment(pixels, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_pick_tokens_takes_the_selector_top_k_or_a_random_subset() -> None:
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]])
    picked = pick_tokens("attention", 2, scores, 2, 4, torch.Generator().manual_seed(0))
    assert picked[0].tolist() == [1, 3] and picked[1, 0].item() == 0
    random_pick = pick_tokens("random", 3, None, 2, 4, torch.Generator().manual_seed(0))
    assert random_pick.shape == (2, 3) and all(len(set(row)) == 3 for row in random_pick.tolist())
    # both kinds advance the generator alike, so resume is exact whichever kind a batch drew
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    pick_tokens("attention", 2, scores, 2, 4, g1)
    pick_tokens("random", 2, None, 2, 4, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    with pytest.raises(ValueError):
        pick_tokens("attention", 2, None, 2, 4, torch.Generator())


def test_pick_tokens_in_the_spread_order() -> None:
    """``spread``: the selector's picks are the device's ``selection.spread`` selection (2×2 cells of a 4×4
    grid: the top 4 patches all in one cell, the spread picks one per cell)."""
    from shared.selection import SelectionRule, select

    scores = torch.tensor([[0.20, 0.15, 0.01, 0.02, 0.18, 0.16, 0.03, 0.04,
                            0.05, 0.06, 0.01, 0.02, 0.03, 0.01, 0.02, 0.01]])
    picked = pick_tokens("attention", 4, scores, 1, 16, torch.Generator().manual_seed(0), spread=2)
    assert sorted(picked[0].tolist()) == select(scores[0].double(), SelectionRule("topk", 4, spread=2)).indices.tolist()
    assert sorted(picked[0].tolist()) == [0, 7, 9, 11]
    assert sorted(pick_tokens("attention", 4, scores, 1, 16, torch.Generator())[0].tolist()) == [0, 1, 4, 5]


def test_attention_guided_token_dropout_and_fine_tuning(toy_data: Path, tmp_path: Path) -> None:
    edge = train(_cfg(toy_data, tmp_path / "edge", epochs=2))
    assert edge["machine"]["device"] == "cpu"
    selector = f"file:{tmp_path / 'edge' / 'model.safetensors'}"
    card = train(_cfg(toy_data, tmp_path / "server", epochs=3, token_dropout=1.0, token_selector=selector,
                      token_attention_share=0.5))
    assert card["test_accuracy"] >= 0.9 and card["training"]["token_selector"] == selector
    # fine-tuning starts from the given weights (a vanishing learning rate leaves them as they were)
    tuned = train(_cfg(toy_data, tmp_path / "tuned", epochs=1, lr=1e-12, init=selector))
    a = load_file(str(tmp_path / "edge" / "model.safetensors"))
    b = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and tuned["test_accuracy"] >= 0.5
    with pytest.raises(ConfigError):
        train(_cfg(toy_data, tmp_path / "bad", epochs=1, init="zoo:cifar10-edge"))  # another architecture
    with pytest.raises(ConfigError):
            _cfg(toy_data, tmp_path / "bad2", device="tpu")


def test_distilled_edge_with_register_tokens(toy_data: Path, tmp_path: Path) -> None:
    teacher = train(_cfg(toy_data, tmp_path / "teacher", epochs=3))
    ref = f"file:{tmp_path / 'teacher' / 'model.safetensors'}"
    arch = VitArch(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2, reg_tokens=2)
    card = train(_cfg(toy_data, tmp_path / "student", epochs=3, arch=arch, teacher=ref, distill_weight=0.7))
    assert teacher["test_accuracy"] >= 0.9 and card["test_accuracy"] >= 0.9
    assert card["architecture"]["reg_tokens"] == 2 and card["training"]["teacher"] == ref
    assert card["training"]["distill_weight"] == 0.7
    student = build_model(f"file:{tmp_path / 'student' / 'model.safetensors'}", role="edge")
    assert student.model.num_prefix_tokens == 3
    with pytest.raises(ConfigError):
        _cfg(toy_data, tmp_path / "bad", teacher=ref, distill_weight=1.5)


def test_fine_tuned_card_names_its_starting_point(toy_data: Path, tmp_path: Path) -> None:
    train(_cfg(toy_data, tmp_path / "base", epochs=1))
    card = train(_cfg(toy_data, tmp_path / "tuned", epochs=1, init=f"file:{tmp_path / 'base' / 'model.safetensors'}"))
    assert card["init_from"]["command"] == "test" and card["init_from"]["epochs"] == 1
    assert "Started from `file:" in (tmp_path / "tuned" / "toy.md").read_text()


def test_fine_tuning_at_another_input_size_resamples_the_position_embedding(toy_data: Path, tmp_path: Path) -> None:
    """``init`` from a model on a 4×4 grid into one on a 6×6 grid: the CLS and register rows are carried
    over as they are, the patch rows resampled as timm resamples them; anything else must still fit."""
    from timm.layers import resample_abs_pos_embed

    arch = VitArch(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2, reg_tokens=2)
    train(_cfg(toy_data, tmp_path / "base", epochs=1, arch=arch))
    ref = f"file:{tmp_path / 'base' / 'model.safetensors'}"
    base = build_model(ref, role="edge").model
    bigger = VitArch(img_size=48, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2, reg_tokens=2)
    # lr ~0 and weight decay off: the fine-tuned weights are the starting ones
    card = train(_cfg(toy_data, tmp_path / "tuned", epochs=1, arch=bigger, init=ref, lr=1e-12, weight_decay=0.0))
    tuned = build_model(f"file:{tmp_path / 'tuned' / 'model.safetensors'}", role="edge").model
    assert card["architecture"]["img_size"] == 48
    before, after = base.state_dict(), tuned.state_dict()
    assert after["pos_embed"].shape == (1, 3 + 36, 32)
    want = resample_abs_pos_embed(before["pos_embed"], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=3)
    torch.testing.assert_close(after["pos_embed"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(after["pos_embed"][:, :3], before["pos_embed"][:, :3], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"], rtol=0, atol=1e-6)
    wider = VitArch(img_size=48, patch_size=8, embed_dim=48, depth=1, num_heads=2, num_classes=2, reg_tokens=2)
    with pytest.raises(ConfigError, match="do not fit"):
        train(_cfg(toy_data, tmp_path / "bad", epochs=1, arch=wider, init=ref))


def test_training_precision_auto_follows_the_measured_cpu_choice() -> None:
    from shared.precision import cpu_has_native_bf16, decide, probe_once, resolve

    assert resolve("bf16", "cpu") == "bf16" and resolve("fp32", "cpu") == "fp32"
    assert resolve("auto", "cuda") == "bf16"  # no device needed: nothing runs on it
    assert resolve("auto", "cpu") == decide(cpu_has_native_bf16(), probe_once())
    with pytest.raises(ConfigError, match="unknown precision"):
        resolve("fp16", "cpu")


def test_train_command_records_the_precision_it_trained_in(toy_data: Path, tmp_path: Path) -> None:
    from patchcast.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "--data", str(toy_data), "--out", str(out), "--name", "toy", "--epochs", "1",
               "--img-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "1", "--heads", "2",
               "--batch-size", "8", "--device", "cpu", "--precision", "fp32"])
    assert rc == 0
    card = json.loads((out / "toy.json").read_text())
    assert card["training"]["bf16"] is False
    with pytest.raises(SystemExit) as refused:  # argparse: usage + one line, exit status 2
        main(["train", "--data", str(toy_data), "--out", str(tmp_path / "bad"), "--precision", "fp16"])
    assert refused.value.code == 2


def test_specialist_trains_on_its_classes_and_maps_outputs_back(tmp_path: Path) -> None:
    """``classes``: an expert for routing learns only those classes, relabelled in the given order,
    and its checkpoint says which global class each output stands for."""
    rng = np.random.default_rng(1)
    for label, channel in (("a", 0), ("b", 1), ("c", 2)):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(24):
            img = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
            img[..., channel] += 100
            Image.fromarray(img).save(tmp_path / "data" / label / f"{i}.png")
    card = train(_cfg(tmp_path / "data", tmp_path / "run", epochs=4, classes=(2, 0)))
    assert card["class_ids"] == [2, 0] and card["class_names"] == ["c", "a"]
    assert card["data"]["train_images"] == 48 and card["test_accuracy"] >= 0.9
    assert "Specialist (expert) on classes [2, 0]" in (tmp_path / "run" / "toy.md").read_text()
    loaded = build_model(f"file:{tmp_path / 'run' / 'model.safetensors'}")
    assert loaded.class_ids == [2, 0] and loaded.num_classes == 2
    assert [loaded.global_class(i) for i in range(2)] == [2, 0]
    with pytest.raises(ConfigError, match="num_classes"):
        _cfg(tmp_path / "data", tmp_path / "bad", arch=VitArch(img_size=32, patch_size=8, embed_dim=32, depth=1,
                                                               num_heads=2, num_classes=3), classes=(2, 0))
    with pytest.raises(ConfigError, match="distinct"):
        _cfg(tmp_path / "data", tmp_path / "bad", classes=(1, 1))


def test_specialist_head_starts_from_the_general_rows() -> None:
    from patchcast.train import specialist_head

    state = {"head.weight": torch.arange(12.0).reshape(4, 3), "head.bias": torch.arange(4.0), "x": torch.ones(1)}
    out = specialist_head(state, (3, 1), "general")
    assert out["head.weight"].tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]
    assert out["head.bias"].tolist() == [3.0, 1.0] and out["x"] is state["x"]
    with pytest.raises(ConfigError, match="no rows"):
        specialist_head(state, (4,), "general")


def test_glances_are_what_a_worker_sees_and_hybrids_keep_one_full_resolution_window() -> None:
    from shared.region import downsample, upsample

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    unit = pixels.permute(0, 3, 1, 2).float() / 255.0
    glance = glances(unit, 2, 4, 0.5, gen, hybrid=False)
    # the worker's glance (uint8 box mean, Pillow bilinear) up to uint8 rounding and Pillow's fixed point
    served = torch.from_numpy(np.stack([upsample(downsample(p.numpy(), 2), 2) for p in pixels]))
    assert (glance.permute(0, 2, 3, 1) * 255 - served.float()).abs().max() <= 3.0
    hybrid = glances(unit, 2, 4, 0.5, gen, hybrid=True)
    for img, hyb, gl in zip(unit, hybrid, glance, strict=True):
        full = (hyb == img).all(0)  # (H, W): pixels taken at full resolution
        rows, cols = full.any(1).nonzero().flatten(), full.any(0).nonzero().flatten()
        assert full.sum() == 16 * 16 and len(rows) == len(cols) == 16  # one 16×16 window (4×4 patches)
        assert int(rows[0]) % 4 == 0 and int(cols[0]) % 4 == 0  # on the patch grid
        assert torch.equal(hyb[:, ~full], gl[:, ~full])


def test_glances_through_a_codec_are_what_the_worker_decodes() -> None:
    """With a codec in the loop, a glance is the service's decode_global of the encoded glance (up to
    the upsampling's rounding), and a hybrid's window is that window sent as its own payload."""
    from shared.codecs import get_codec
    from shared.region import downsample, from_patches, upsample

    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    unit = pixels.permute(0, 3, 1, 2).float() / 255.0
    wire = CodecRoundTrip("jpeg-mosaic", 50)
    codec, all_small = get_codec("jpeg-mosaic"), np.arange(64)

    def served(img: np.ndarray) -> np.ndarray:
        small = downsample(img, 2)
        back = codec.decode(codec.encode(small, all_small, 2, {"q": 50}), (16, 16), all_small, 2, {"q": 50})
        return upsample(from_patches(back, (8, 8)), 2)

    glance = glances(unit, 2, 4, 0.5, gen, hybrid=False, wire=wire)
    want = torch.from_numpy(np.stack([served(p.numpy()) for p in pixels])).float()
    lossless = glances(unit, 2, 4, 0.5, torch.Generator().manual_seed(1), hybrid=False)
    # within the bilinear and box-mean rounding of the exact path, and clearly away from the lossless glance
    assert (glance.permute(0, 2, 3, 1) * 255 - want).abs().max() <= 3.0  # Pillow vs torch bilinear, as above
    assert (glance - lossless).abs().max() * 255 > 8.0
    hybrid = glances(unit, 2, 4, 0.5, gen, hybrid=True, wire=wire)
    for img, hyb in zip(pixels.numpy(), hybrid, strict=True):
        exact_glance = torch.from_numpy(served(img).copy()).float() / 255
        differs = (hyb.permute(1, 2, 0) - exact_glance).abs().amax(-1) > 5 / 255  # (H, W): the window, roughly
        rows, cols = differs.any(1).nonzero().flatten(), differs.any(0).nonzero().flatten()
        top, left = int(rows[0]) // 4 * 4, int(cols[0]) // 4 * 4
        idx = np.array([(top // 4 + r) * 8 + left // 4 + c for r in range(4) for c in range(4)])
        sent = codec.decode(codec.encode(img, idx, 4, {"q": 50}), (32, 32), idx, 4, {"q": 50})
        window = (hyb.permute(1, 2, 0)[top:top + 16, left:left + 16] * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(window, from_patches(sent, (4, 4)))


def test_glance_codec_settings_are_checked(toy_data: Path, tmp_path: Path) -> None:
    card = train(_cfg(toy_data, tmp_path / "run", epochs=1, glance_mix=1.0, glance_codec="jpeg-mosaic",
                      glance_quality=75))
    assert card["training"]["glance_codec"] == "jpeg-mosaic" and card["training"]["glance_quality"] == 75
    with pytest.raises(ConfigError, match="glance_codec"):
        _cfg(toy_data, tmp_path / "x", glance_mix=0.5, glance_codec="gif")
    with pytest.raises(ConfigError, match="glance_quality"):
        _cfg(toy_data, tmp_path / "x", glance_mix=0.5, glance_codec="jpeg-mosaic", glance_quality=0)


def test_glance_mix_trains_and_checks_its_settings(toy_data: Path, tmp_path: Path) -> None:
    card = train(_cfg(toy_data, tmp_path / "run", epochs=4, glance_mix=0.75, glance_downscale=2))
    assert card["test_accuracy"] >= 0.9 and card["training"]["glance_mix"] == 0.75
    with pytest.raises(ConfigError, match="divide the patch size"):
        _cfg(toy_data, tmp_path / "x", glance_mix=0.5, glance_downscale=3)
    with pytest.raises(ConfigError, match="glance_mix"):
        _cfg(toy_data, tmp_path / "x", glance_mix=1.5)


def test_cnn_teacher_trains_saves_and_distils_into_a_vit(toy_data: Path, tmp_path: Path) -> None:
    """``cnn``: a timm CNN from random init, saved as a teacher checkpoint that distillation loads, while
    the edge and server roles still refuse it (PatchCast needs patch tokens)."""
    from shared.errors import ModelError
    from shared.models import load_checkpoint, load_teacher

    card = train(_cfg(toy_data, tmp_path / "cnn", epochs=3, cnn="test_resnet", aug="rrc", mixup=0.2))
    assert card["test_accuracy"] >= 0.9 and card["architecture"]["timm_name"] == "test_resnet"
    assert "CNN" in (tmp_path / "cnn" / "toy.md").read_text()
    ref = f"file:{tmp_path / 'cnn' / 'model.safetensors'}"
    teacher = load_teacher(ref)
    from timm.models.vision_transformer import VisionTransformer

    assert not isinstance(teacher.model, VisionTransformer) and teacher.preprocess.input_size == 32
    for role in ("edge", "server"):
        with pytest.raises(ModelError, match="VisionTransformer"):
            build_model(ref, role=role)
    with pytest.raises(ModelError, match="VisionTransformer"):
        load_checkpoint(tmp_path / "cnn" / "model.safetensors")
    student = train(_cfg(toy_data, tmp_path / "student", epochs=3, teacher=ref, cutmix=1.0, mixup=0.2))
    assert student["test_accuracy"] >= 0.9 and student["training"]["teacher"] == ref
    with pytest.raises(ConfigError, match="CNN"):
        _cfg(toy_data, tmp_path / "bad", cnn="test_resnet", token_dropout=0.5)
    with pytest.raises(ConfigError, match="is a ViT"):
        train(_cfg(toy_data, tmp_path / "bad2", epochs=1, cnn="test_vit"))


def test_resized_crop_and_mixing_are_batched_and_seeded() -> None:
    from patchcast.augment import mix_batch, resized_crop

    pixels = torch.randint(0, 256, (6, 48, 48, 3), dtype=torch.uint8)
    a = resized_crop(pixels, 32, torch.Generator().manual_seed(3), 0.35)
    b = resized_crop(pixels, 32, torch.Generator().manual_seed(3), 0.35)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    flat = torch.full((2, 48, 48, 3), 200, dtype=torch.uint8)  # crops of a flat image are that flat image
    assert torch.allclose(resized_crop(flat, 32, torch.Generator().manual_seed(0), 0.35), torch.tensor(200 / 255))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        images, target = mix_batch(a, y, 6, mixup, cutmix, torch.Generator().manual_seed(1))
        assert images.shape == a.shape and target.shape == (6, 6)
        assert torch.allclose(target.sum(1), torch.ones(6))
        lam = float(target[0, 0])  # image 0 mixes with the last one (the batch reversed)
        assert 0.0 <= lam <= 1.0 and float(target[0, 5]) == pytest.approx(1 - lam, abs=1e-6)
