"""Model building by reference: timm names, safetensors checkpoints, the zoo; preprocessing from config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Attention

from shared.errors import ModelError
from shared.models import (
    LoadedModel,
    Preprocess,
    VitArch,
    build_model,
    load_checkpoint,
    save_checkpoint,
)


def test_timm_name_builds_with_preprocessing_from_its_config() -> None:
    loaded = build_model("timm:deit_tiny_patch16_224", pretrained=False)
    assert loaded.grid == (14, 14) and loaded.num_patches == 196 and loaded.patch_size == 16
    # DeiT's timm config: bicubic, crop_pct 0.9 → resize floor(224 / 0.9) = 248, crop 224, ImageNet mean/std
    assert loaded.preprocess.input_size == 224
    assert loaded.preprocess.crop_pct == pytest.approx(0.9)
    assert loaded.preprocess.resize_size == 248
    assert loaded.preprocess.interpolation == "bicubic"
    assert loaded.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))


def test_only_the_edge_role_gives_up_fused_attention() -> None:
    edge = build_model("timm:deit_tiny_patch16_224", role="edge")
    server = build_model("timm:deit_tiny_patch16_224", role="server")
    fused = [m.fused_attn for m in edge.model.modules() if isinstance(m, Attention)]
    assert len(fused) == len(edge.model.blocks) and not any(fused)
    assert all(m.fused_attn for m in server.model.modules() if isinstance(m, Attention))


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = VitArch(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    loaded = LoadedModel(arch.build().eval(), "tiny", Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                         [f"c{i}" for i in range(10)])
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, loaded, arch=arch)
    again = build_model(f"file:{path}")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), again.model(x))
    assert again.preprocess == loaded.preprocess
    assert again.class_names == loaded.class_names
    assert build_model(str(path)).name == "tiny"  # bare path works too


def test_specialist_class_ids_round_trip_and_are_validated(tmp_path: Path) -> None:
    arch = VitArch(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    loaded = LoadedModel(arch.build().eval(), "expert", pre, ["c7", "c2", "c9"], class_ids=[7, 2, 9])
    assert [loaded.global_class(i) for i in range(3)] == [7, 2, 9]
    save_checkpoint(tmp_path / "expert.safetensors", loaded, arch=arch)
    assert build_model(f"file:{tmp_path / 'expert.safetensors'}").class_ids == [7, 2, 9]
    everyone = LoadedModel(arch.build().eval(), "general", pre)
    assert everyone.class_ids == [] and everyone.global_class(2) == 2
    for bad in ([7, 2], [7, 7, 9], [7, -2, 9]):
        with pytest.raises(ModelError):
            LoadedModel(arch.build().eval(), "expert", pre, class_ids=bad)


def test_timm_named_checkpoint(tmp_path: Path) -> None:
    loaded = build_model("timm:deit_tiny_patch16_224")
    path = tmp_path / "deit.safetensors"
    save_checkpoint(path, loaded, timm_name="deit_tiny_patch16_224")
    again = load_checkpoint(path)
    assert again.num_classes == 1000 and again.preprocess == loaded.preprocess


@pytest.mark.parametrize(("ref", "message"), [
    ("zoo:no-such-model", "unknown zoo model"),
    ("timm:no_such_model_name", "timm model"),
    ("file:/nonexistent/x.safetensors", "not found"),
    ("file:/tmp/model.pth", "only .safetensors"),
    ("timm:resnet18", "needs a timm VisionTransformer"),
    ("bogus:thing", "expected timm:NAME"),
])
def test_bad_references_raise_model_error(ref: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(ref)


def test_corrupt_checkpoint_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_checkpoint(path)


def test_vit_arch_validation() -> None:
    with pytest.raises(ModelError):
        VitArch(img_size=30, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ModelError):
        VitArch(img_size=32, patch_size=4, embed_dim=30, depth=2, num_heads=4)


def test_register_tokens_on_the_edge_only(tmp_path: Path) -> None:
    from shared.attention import edge_forward
    from shared.scores import scores_from_output

    torch.manual_seed(0)
    arch = VitArch(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, reg_tokens=3)
    loaded = LoadedModel(arch.build().eval(), "reg", Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                         [f"c{i}" for i in range(10)])
    path = tmp_path / "reg.safetensors"
    save_checkpoint(path, loaded, arch=arch)
    edge = build_model(f"file:{path}", role="edge")
    assert edge.model.num_prefix_tokens == 4 and edge.num_patches == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = edge_forward(edge.model, x, all_layers=True)
        # unfused (edge) vs fused SDPA (as saved): same weights, float32 rounding only
        assert torch.allclose(out.logits, loaded.model(x), atol=1e-5)
    # CLS → patches only: the registers' share of the attention is not a patch score
    assert out.cls_attention.shape == (2, 2, 16)
    for kind in ("attention", "rollout"):
        scores = scores_from_output(out, kind)
        assert scores.shape == (2, 16) and torch.allclose(scores.sum(-1), torch.ones(2))
    with pytest.raises(ModelError, match="register tokens"):
        build_model(f"file:{path}", role="server")  # the server's subset forward is CLS + patches
    with pytest.raises(ModelError):
        VitArch(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, reg_tokens=-1)
