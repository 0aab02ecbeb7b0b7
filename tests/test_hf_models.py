"""Hugging Face ``transformers`` vision models (``hf:NAME``): every family built from a small config with random
weights (``save_pretrained`` folders and a hub-cache layout), class and channel targets through the API and the
CLI, batched equal to one at a time, and one-line errors for what is not on the machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra")

import vital_fast as vf  # noqa: E402
from vital_fast.cli.main import main  # noqa: E402
from vital_fast.models import default_layers, load_model  # noqa: E402
from vital_fast.references.images import offline_photo_path  # noqa: E402

T = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
         patch_size=8)
LABELS = dict(num_labels=5, id2label={i: f"thing {i}" for i in range(5)}, label2id={f"thing {i}": i for i in range(5)})


def _families():
    t = transformers
    return {
        "vit": (t.ViTForImageClassification, t.ViTConfig(**T, **LABELS), "vit.layers.2"),
        "deit": (t.DeiTForImageClassificationWithTeacher, t.DeiTConfig(**T, **LABELS), "deit.layers.2"),
        "dinov2-registers": (t.Dinov2WithRegistersModel, t.Dinov2WithRegistersConfig(**T, num_register_tokens=4),
                             "encoder.layer.2"),
        "clip": (t.CLIPModel, t.CLIPConfig(vision_config=dict(T), text_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64), projection_dim=16),
            "vision_model.encoder.layers.2"),
        "siglip": (t.SiglipVisionModel, t.SiglipVisionConfig(**T), "encoder.layers.2"),
        "swin": (t.SwinForImageClassification, t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                             num_heads=[2, 2], window_size=4, **LABELS),
                 "swin.encoder.layers.1.blocks.0"),
        "convnext": (t.ConvNextForImageClassification, t.ConvNextConfig(hidden_sizes=[8, 16, 24, 32],
                                                                         depths=[1, 1, 1, 1], **LABELS),
                     "convnext.encoder.stages.2"),
    }


FAMILIES = _families()
HAS_CLASSES = {"vit", "deit", "swin", "convnext"}


def _save(folder, family, processor=True):
    cls, cfg, _ = FAMILIES[family]
    torch.manual_seed(0)
    cls(cfg).save_pretrained(folder)
    if processor:
        side = 64 if family == "convnext" else 32
        transformers.ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3, resample=3).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: _save(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def photos():
    return [offline_photo_path("coffee"), offline_photo_path("chelsea")]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_loads_with_its_preprocessing_layers_and_targets(family, folders, photos):
    lm = load_model("hf:" + folders[family])
    assert lm.family == ("convnext" if family == "convnext" else "vit")
    assert lm.mean == (0.5, 0.5, 0.5) and lm.interpolation == "bicubic"
    assert lm.input_size == (64 if family == "convnext" else 32)
    if family in HAS_CLASSES:
        assert lm.num_classes == 5 and lm.class_names[3] == "thing 3"
    else:
        assert lm.num_classes is None
    layers = default_layers(lm)
    assert len(layers) >= 3 and all(isinstance(w, float) for _, w in layers)
    unit = f"channel:{FAMILIES[family][2]}:3"
    targets = ([f"class:3"] if family in HAS_CLASSES else []) + [unit]
    r = vf.visualize(lm, targets, {t: photos for t in targets}, settings=vf.get_preset("fast").with_steps(2),
                     size=lm.input_size)
    assert r.images.shape == (len(targets), 3, lm.input_size, lm.input_size)
    assert torch.isfinite(r.losses).all()
    # the output is one tensor at any input size (position embeddings interpolated)
    out = lm.model(torch.rand(1, 3, 48, 48) if family != "convnext" else torch.rand(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.dim() == 2


def test_random_weights_build_from_the_config_alone(tmp_path):
    folder = tmp_path / "vit"
    _save(folder, "vit")
    for f in os.listdir(folder):
        if f.endswith((".safetensors", ".bin")):
            os.unlink(folder / f)
    with pytest.raises(FileNotFoundError, match="--random-weights builds the architecture"):
        load_model(f"hf:{folder}")
    lm = load_model(f"hf:{folder}", weights="random")
    assert lm.weights == "random" and lm.num_classes == 5


def test_a_module_passed_in_is_recognized_by_its_class(photos):
    cls, cfg, layer = FAMILIES["vit"]
    lm = load_model(cls(cfg))
    assert lm.family == "vit" and lm.num_classes == 5
    assert isinstance(lm.model(torch.rand(1, 3, 32, 32)), torch.Tensor)
    r = vf.visualize(lm, "class:1", photos, steps=2, size=32)
    assert r.images.shape == (1, 3, 32, 32)


def test_batched_equals_one_at_a_time(folders, photos):
    lm = load_model("hf:" + folders["vit"])
    targets = ["class:1", "channel:vit.layers.2:3", "class:4"]
    s = vf.get_preset("fast").with_steps(3)
    both = vf.visualize(lm, targets, {t: photos for t in targets}, settings=s, size=32)
    for i, t in enumerate(targets):
        one = vf.visualize(lm, [t], {t: photos}, settings=s, size=32)
        assert torch.allclose(one.images[0], both.images[i], atol=2e-5), t


def test_class_target_on_an_embedding_model_is_one_line(folders, photos):
    lm = load_model("hf:" + folders["clip"])
    with pytest.raises(ValueError, match="has no classifier"):
        vf.visualize(lm, "class:1", photos, steps=1, size=32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_images")
    (root / "1").mkdir()
    for n in ("coffee", "chelsea", "rocket"):
        shutil.copy(offline_photo_path(n), root / "1" / f"{n}.png")
    return root


def test_cli_visualize_and_layers(folders, images, tmp_path, capsys):
    spec = "hf:" + folders["vit"]
    assert main(["layers", spec]) == 0
    assert "vit.layers.3" in capsys.readouterr().out
    code = main(["visualize", "--model", spec, "--target", "class:1", "--target", "channel:vit.layers.2:3",
                 "--images", str(images), "--out", str(tmp_path / "run"), "--steps", "2", "--cache",
                 str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["model"]["name"] == spec and len(m["targets"]) == 2


@pytest.mark.parametrize("args, fragment", [
    (["--model", "hf:nobody/nothing-here"], "is not in the local Hugging Face cache"),
    (["--model", "HF", "--target", "channel:vit.layerz.2:3"], "vit.layers.2"),
    (["--model", "CLIP", "--target", "class:1"], "has no classifier"),
])
def test_cli_bad_input_is_one_line(args, fragment, folders, images, tmp_path, capsys):
    args = ["hf:" + folders["vit"] if a == "HF" else "hf:" + folders["clip"] if a == "CLIP" else a for a in args]
    if "--target" not in args:
        args += ["--target", "class:1"]
    code = main(["visualize", *args, "--images", str(images), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err


def test_hub_id_from_the_local_cache_only(tmp_path, images):
    """The hub-cache layout (models--org--name/snapshots/<rev>/, refs/main), read offline in a fresh process."""
    repo = tmp_path / "hub" / "models--tiny--vit"
    rev = "0" * 40
    _save(repo / "snapshots" / rev, "vit")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = ("import sys; from vital_fast.models import load_model; lm = load_model('hf:tiny/vit'); "
            "print(lm.name, lm.num_classes, lm.input_size)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "hf:tiny/vit 5 32" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("family", ["vit", "dinov2-registers", "clip", "siglip"])
def test_transformer_rules_conserve_relevance_on_the_hf_families(family):
    """With biases and position embeddings zeroed, the conservative rules keep the whole start relevance at every
    earlier block (CLIP's QuickGELU, written with tensor ops, is gated as a module)."""
    from vital_fast.references.relevance import relevance_maps

    cls, cfg, _ = FAMILIES[family]
    torch.manual_seed(0)
    if family == "clip":  # the image tower, whose hidden_act is quick_gelu
        cls, cfg = transformers.CLIPVisionModelWithProjection, cfg.vision_config
        assert cfg.hidden_act == "quick_gelu"
    lm = load_model(cls(cfg))
    m = lm.model
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or any(k in n for k in ("position_embedding", "cls_token", "register_tokens",
                                                          "class_embedding", "mask_token")):
                p.zero_()
    blocks = [n for n, _ in m.named_modules() if n.rsplit(".", 1)[0].endswith(("layers", "layer"))
              and n.rsplit(".", 1)[-1].isdigit() and "text" not in n]
    target, rec = blocks[2], blocks[:2]
    x = lm.normalize(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    seen = {}
    h = dict(m.named_modules())[target].register_forward_hook(lambda mod, a, o: seen.__setitem__("a", o))
    with torch.no_grad():
        m(x)
    h.remove()
    start = seen["a"][..., 5].flatten(1).sum(1)
    rel = relevance_maps(m, x, target, torch.tensor([5, 5]), rec, family="vit")
    for layer in rec:
        assert torch.allclose(rel[layer].flatten(1).sum(1), start, rtol=1e-3, atol=1e-4), (family, layer)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cli_class_and_channel_targets_for_each_family(family, folders, images, tmp_path, capsys):
    spec = "hf:" + folders[family]
    unit = f"channel:{FAMILIES[family][2]}:3"
    targets = (["--target", "class:1"] if family in HAS_CLASSES else []) + ["--target", unit]
    code = main(["visualize", "--model", spec, *targets, "--images", str(images), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--set", "n_refs=2", "--cache", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert len(m["targets"]) == len(targets) // 2


@pytest.mark.parametrize("family, prefix", [("vit", 1), ("deit", 2), ("dinov2-registers", 5), ("siglip", 0)])
def test_prefix_tokens_and_the_patches_layer(family, prefix, folders):
    """LAYER.patches: the patch tokens alone (CLS, distillation and register tokens left out), values unchanged."""
    from vital_fast.models import FeatureTaps
    from vital_fast.models.tokens import patches_layer, prefix_tokens

    lm = load_model("hf:" + folders[family])
    assert prefix_tokens(lm) == prefix
    layer = FAMILIES[family][2]
    name = patches_layer(lm, layer)
    x = lm.normalize(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        f = FeatureTaps(lm.model, [layer, name], detach=True).run(x)
    assert torch.equal(f[name], f[layer][:, prefix:]) and lm.channel_dim_of(name) == -1


def test_adapted_models_still_pickle(folders, tmp_path):
    """The hooks vital_fast adds (one tensor out, position interpolation, the output, heads and patches taps, the
    text tower) are module-level functions and plain objects: a user's model still saves whole."""
    import io

    from vital_fast.models.heads import head_layer
    from vital_fast.models.tokens import patches_layer

    cls, cfg, layer = FAMILIES["vit"]
    module = cls(cfg)
    lm = load_model(module)
    head_layer(lm, "vit.layers.1")
    patches_layer(lm, "vit.layers.1")
    buf = io.BytesIO()
    torch.save(module, buf)
    clip = load_model("hf:" + folders["clip"])
    torch.save(clip.model, io.BytesIO())
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(again(x), module(x))


def test_convnext_processor_crop_pct(tmp_path):
    """ConvNeXt's image processor resizes the short side to size / crop_pct and center-crops size."""
    folder = _save(tmp_path / "cnx", "convnext", processor=False)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(folder)
    lm = load_model("hf:" + folder)
    assert (lm.input_size, lm.resize_size) == (224, 256)


def test_token_locations_move_with_the_patch_grid(folders, photos):
    """head:BLOCK:H:T on a 4x4 patch grid + CLS: the CLS token stays at every size, a patch token moves with its
    grid cell; a token past the last is one line before any work."""
    from vital_fast.optim.targets import resolve_model_targets

    lm = load_model("hf:" + folders["vit"])
    cls_t, patch = resolve_model_targets(lm, ["head:vit.layers.2:0:0", "head:vit.layers.2:0:16"])
    assert cls_t.tokens == (1, 4) and cls_t.at_size(16, 32).loc == (0, 0) and cls_t.at_size(64, 32).loc == (0, 0)
    assert patch.at_size(16, 32).loc == (1 + 1 * 2 + 1, 0)   # row 3, col 3 of 4x4 -> row 1, col 1 of 2x2
    assert patch.at_size(64, 32).loc == (1 + 7 * 8 + 7, 0)   # -> row 7, col 7 of 8x8
    with pytest.raises(ValueError, match=r"location \(17, 0\) is outside"):
        vf.visualize(lm, ["head:vit.layers.2:0:17"], pool=photos, steps=1, size=32)
