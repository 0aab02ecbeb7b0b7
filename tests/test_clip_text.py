"""OpenCLIP image towers (``openclip:ARCH[:TAG]``) and text targets (``text:PROMPT``) on CLIP-like models: built
from small configs with random weights, through the API and the CLI; one-line errors for what cannot be."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="the openclip extra")

import vital_fast as vf  # noqa: E402
from vital_fast.cli.main import main  # noqa: E402
from vital_fast.models import load_model  # noqa: E402
from vital_fast.optim.targets import parse_target, text_target  # noqa: E402
from vital_fast.references.images import offline_photo_path  # noqa: E402

ARCH = "vf-tiny-vit"
TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("openclip_cfg")
    (d / f"{ARCH}.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(d))


@pytest.fixture(scope="module")
def clip():
    return load_model(f"openclip:{ARCH}", weights="random")


@pytest.fixture(scope="module")
def pool():
    return [offline_photo_path(n) for n in ("coffee", "chelsea", "rocket", "astronaut")]


def _settings(**kw):
    return vf.get_preset("fast").with_steps(2).replace(n_refs=2, **kw)


def test_openclip_tower_loads_with_its_preprocessing(clip):
    assert clip.name == f"openclip:{ARCH}" and clip.family == "vit" and clip.num_classes is None
    assert clip.input_size == 32 and clip.interpolation == "bicubic"
    assert clip.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert "output" in dict(clip.model.named_children())
    out = clip.model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 16)  # the embedding; the output layer taps it without changing it
    assert not any("text" in n or "token_embedding" in n for n, _ in clip.model.named_parameters())


def test_text_target_is_the_text_towers_unit_direction(clip):
    t = text_target(clip, 'text:"a photo of a dog"|a puppy')
    assert t.key == "text:a photo of a dog|a puppy" and t.layer == "output"
    assert t.label() == 'text "a photo of a dog" | "a puppy"'
    v = t.direction.vector
    assert v.shape == (16,) and abs(float(v.norm()) - 1) < 1e-5
    assert not torch.allclose(v, text_target(clip, "text:a photo of a dog").direction.vector)
    with pytest.raises(ValueError, match="read with the model"):
        parse_target("text:a dog")


def test_text_and_channel_targets_visualize_batched_as_one_at_a_time(clip, pool):
    targets = ["text:a photo of a dog", "channel:transformer.resblocks.2:3"]
    both = vf.visualize(clip, targets, pool=pool, settings=_settings())
    assert [t.key for t in both.targets] == targets and torch.isfinite(both.losses).all()
    for i, t in enumerate(targets):
        one = vf.visualize(clip, [t], pool=pool, settings=_settings())
        assert torch.allclose(one.images[0], both.images[i], atol=2e-5), t


def test_text_target_with_relevance_paper_recipe(clip, pool):
    r = vf.visualize(clip, "text:a dog", pool=pool, settings=vf.get_preset("paper").with_steps(2).replace(n_refs=2))
    assert torch.isfinite(r.losses).all()


def test_class_target_and_text_on_a_model_without_text_tower_are_refused(clip, pool):
    with pytest.raises(ValueError, match="has no classifier"):
        vf.visualize(clip, "class:1", pool, steps=1)
    lite = load_model("efficientnet-lite0")
    with pytest.raises(ValueError, match="text targets need a CLIP-like model"):
        vf.visualize(lite, "text:a dog", pool=pool, steps=1)


@pytest.mark.parametrize("spec, exc, fragment", [
    ("openclip:ViT-B-33", ValueError, "closest: openclip:ViT-B-32"),
    ("openclip:ViT-B-32:nope", ValueError, "has no pretrained tag 'nope'"),
    ("openclip:ViT-B-32", ValueError, "needs a pretrained tag"),
    ("openclip:ViT-B-32:openai", FileNotFoundError, "never downloads"),
])
def test_openclip_bad_specs_are_one_line(spec, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_images")
    for n in ("coffee", "chelsea", "rocket", "astronaut"):
        shutil.copy(offline_photo_path(n), root / f"{n}.png")
    return root


def test_cli_text_target_on_openclip(images, tmp_path, capsys):
    code = main(["visualize", "--model", f"openclip:{ARCH}", "--random-weights", "--target", "text:a photo of a dog",
                 "--target", "channel:transformer.resblocks.2:3", "--images", str(images), "--out",
                 str(tmp_path / "run"), "--steps", "2", "--set", "n_refs=2", "--cache", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [t["key"] for t in m["targets"]] == ["text:a photo of a dog", "channel:transformer.resblocks.2:3"]
    # a text target without a text tower: one line, exit 2
    code = main(["visualize", "--model", "efficientnet-lite0", "--target", "text:a dog", "--images", str(images),
                 "--out", str(tmp_path / "run2"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "text targets need a CLIP-like model" in err and "Traceback" not in err


def test_hf_clip_checkpoint_has_its_text_tower(tmp_path, pool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
    lm = load_model(f"hf:{tmp_path}")
    t = text_target(lm, "text:a dog")
    assert t.direction.vector.shape == (16,)
    r = vf.visualize(lm, "text:a dog", pool=pool, settings=_settings(), size=32)
    assert torch.isfinite(r.losses).all()


def _hf_clip_tower():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(0)
    return load_model(transformers.CLIPVisionModelWithProjection(cfg))


def test_head_targets_on_a_clip_vision_tower(pool):
    """head:BLOCK:H (every token) and head:BLOCK:H:T (one token): the head's mean output before the projection,
    batched as one at a time, with the paper's relevance too."""
    lm = _hf_clip_tower()
    targets = ["head:vision_model.encoder.layers.2:1", "head:vision_model.encoder.layers.2:0:0"]
    both = vf.visualize(lm, targets, pool=pool, settings=_settings(), size=32)
    assert [t.key for t in both.targets] == targets
    assert [t.label() for t in both.targets] == ["vision_model.encoder.layers.2 head 1",
                                                 "vision_model.encoder.layers.2 head 0 at token 0"]
    for i, t in enumerate(targets):
        one = vf.visualize(lm, [t], pool=pool, settings=_settings(), size=32)
        assert torch.allclose(one.images[0], both.images[i], atol=2e-5), t
    r = vf.visualize(lm, targets[:1], pool=pool, size=32,
                     settings=vf.get_preset("paper").with_steps(2).replace(n_refs=2))
    assert torch.isfinite(r.losses).all()
    assert "vision_model.encoder.layers.2.self_attn.heads" in dict(lm.model.named_modules())


@pytest.mark.parametrize("spec, fragment", [
    ("head:vision_model.encoder.layers.2:5", "has 2 heads (0-1)"),
    ("head:vision_model.encoder.layerz.2:1", "closest: vision_model.encoder.layers.2"),
    ("head:vision_model.encoder.layers.2", "expected head:BLOCK:H[:T]"),
    ("head:vision_model.encoder.layers.2.mlp:0", "no tappable attention heads"),
])
def test_bad_head_targets_are_one_line(spec, fragment, pool):
    lm = _hf_clip_tower()
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        vf.visualize(lm, [spec], pool=pool, settings=_settings(), size=32)


def test_heads_of_nn_multiheadattention_are_refused(pool):
    tv = load_model("torchvision:vit_b_16", weights="random")
    with pytest.raises(ValueError, match="nn.MultiheadAttention"):
        vf.visualize(tv, ["head:encoder.layers.encoder_layer_3:1"], pool=pool, settings=_settings())


def test_random_openclip_is_seeded_and_its_text_tower_built_on_demand(clip):
    """Random weights are seeded (two loads: one model), so the text tower built again for a text target belongs
    to the same model; nothing of it is held by the image tower between targets."""
    again = load_model(f"openclip:{ARCH}", weights="random")
    assert again.fingerprint == clip.fingerprint
    a = text_target(clip, "text:a red car").direction.vector
    b = text_target(again, "text:a red car").direction.vector
    assert torch.equal(a, b)
    held = [v for v in vars(again.model).values() if isinstance(v, torch.nn.Module)]
    assert not any(hasattr(v, "encode_text") for v in held)


def test_pretrained_openclip_takes_its_tags_preprocessing(monkeypatch, tmp_path):
    """Weights given to open_clip as a file lose the tag's preprocessing there: vital_fast takes mean, std and
    interpolation (and QuickGELU) from the tag's config itself."""
    import vital_fast.models.openclip as oc

    model = open_clip.create_model(ARCH, pretrained=None)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda arch: ["fake"])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda arch, tag: {
        "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear", "quick_gelu": False})
    monkeypatch.setattr(oc, "_weights_file", lambda *a: str(path))
    lm = load_model(f"openclip:{ARCH}:fake")
    assert lm.mean == (0.5, 0.5, 0.5) and lm.std == (0.25, 0.25, 0.25) and lm.interpolation == "bilinear"
    assert lm.weights == "pretrained" and lm.name == f"openclip:{ARCH}:fake"
