"""``Settings.compile`` / ``--compile``: the network's forward under ``torch.compile``.

Compiled runs give the eager run's images (the debug backends run the same ops; inductor rounds
differently, within a tolerance); the model is left with the hooks it had, also when the run fails; an
unknown backend stops in one line before any step; ``--compile`` reaches the settings and the manifest.
Most tests use the debug backends ``aot_eager`` and ``eager``, which compile in a second; one small test
runs inductor and is skipped where it cannot compile.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from vital_fast.optim import Objective, Settings, visualize
from vital_fast.references.cache import DiskCache

from _util import tiny_loaded, tiny_refs

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:relevance_maps. family 'generic' has no canonizer")]


@pytest.fixture(scope="module")
def lm():
    return tiny_loaded()


@pytest.fixture(scope="module")
def refs():
    return tiny_refs()


TARGETS = ["class:1", "channel:conv2:3"]


def small(**kw):
    base = dict(stages=[(0.5, 2), (1.0, 3)], warmup=1, n_refs=3, quantiles=16, lr=0.1)
    base.update(kw)
    return Settings(**base)


def hooks_of(model):
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()}


def run(lm, refs, targets=TARGETS, **kw):
    return visualize(lm, targets, {t: refs for t in targets}, settings=small(**kw), cache=DiskCache(enabled=False))


def _never(*a):
    raise AssertionError("no step may run")


def test_compiled_run_gives_the_eager_images_and_leaves_no_hooks(lm, refs):
    before = hooks_of(lm.model)
    eager = run(lm, refs)
    compiled = run(lm, refs, compile="aot_eager")
    assert hooks_of(lm.model) == before
    assert torch.allclose(compiled.images, eager.images, atol=1e-4)
    assert torch.allclose(compiled.losses, eager.losses, rtol=1e-4, atol=1e-5)
    # recorded: the setting (left out when off: earlier runs keep their identity) and the compile time
    assert compiled.settings.to_dict()["compile"] == "aot_eager" and eager.settings.to_dict()["compile"] == "off"
    assert compiled.timings["compile_s"] > 0 and "compile_s" not in eager.timings
    assert compiled.timings["compile_s"] <= compiled.timings["optimize_s"]


def test_one_target_padded_and_mixed_precision(lm, refs):
    """A one-element batch runs padded to two, and autocast still applies around the compiled call."""
    eager = run(lm, refs, targets=["class:2"], amp="bf16")
    compiled = run(lm, refs, targets=["class:2"], amp="bf16", compile="eager")
    assert compiled.precision == eager.precision == "bfloat16"
    assert torch.allclose(compiled.images, eager.images, atol=1e-4)
    assert torch.allclose(compiled.losses, eager.losses, rtol=1e-4, atol=1e-5)


def test_hooks_are_removed_when_the_run_fails(lm, refs):
    before = hooks_of(lm.model)

    def boom(step, total, losses):
        assert lm.model.conv1._forward_hooks, "the compiled forward hooks the tapped layers during the run"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        visualize(lm, ["class:1"], {"class:1": refs}, settings=small(compile="aot_eager"),
                  cache=DiskCache(enabled=False), progress=boom)
    assert hooks_of(lm.model) == before


class _OwnHooks(Objective):
    """Reads conv2 and brings its own (empty) hooks: its steps run eagerly."""

    name = "own_hooks"

    def __init__(self):
        self.entered = 0

    def layers(self, slots):
        return ["conv2"]

    @contextlib.contextmanager
    def _ctx(self):
        self.entered += 1
        yield

    def hooks(self, model):
        return self._ctx()

    def __call__(self, ctx):
        return -ctx.features["conv2"][:, 3].flatten(1).mean(1)


def test_an_objective_with_its_own_hooks_runs_eagerly(lm):
    before = hooks_of(lm.model)
    obj = _OwnHooks()
    eager = visualize(lm, ["class:1"], objective=obj, settings=small())
    compiled = visualize(lm, ["class:1"], objective=obj, settings=small(compile="aot_eager"))
    assert obj.entered == 2 * 5
    assert torch.equal(compiled.images, eager.images) and "compile_s" in compiled.timings
    assert compiled.timings["compile_s"] == 0.0  # nothing compiled
    assert hooks_of(lm.model) == before


def test_unknown_backend_is_one_line_before_any_step(lm, refs):
    with pytest.raises(ValueError) as exc:
        Settings(compile="turbo")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("unknown compile 'turbo'; valid: off, on, ")
    assert all(name in msg for name in ("inductor", "aot_eager", "eager"))
    s = small()
    s.compile = "turbo"  # set after construction: the engine refuses it before any step
    with pytest.raises(ValueError, match="unknown compile 'turbo'"):
        visualize(lm, ["class:1"], {"class:1": refs}, settings=s, cache=DiskCache(enabled=False), progress=_never)


def test_cli_flag_reaches_settings_and_bad_values_exit_2(tmp_path, capsys):
    from vital_fast.cli.common import settings_from_args as _settings
    from vital_fast.cli.main import build_parser, main

    cmd = ["visualize", "--model", "m", "--target", "class:1", "--images", ".", "--out", "o"]
    assert _settings(build_parser().parse_args(cmd)).compile == "off"
    assert _settings(build_parser().parse_args(cmd + ["--compile", "on"])).compile == "on"
    assert _settings(build_parser().parse_args(cmd + ["--compile", "aot_eager"])).compile == "aot_eager"
    assert _settings(build_parser().parse_args(cmd + ["--set", "compile=eager"])).compile == "eager"
    sweep = ["sweep", "--model", "m", "--images", ".", "--out", "o", "--classes", "1", "--compile", "inductor"]
    assert _settings(build_parser().parse_args(sweep)).compile == "inductor"
    for extra in (["--compile", "turbo"], ["--set", "compile=turbo"]):
        out = tmp_path / "o"
        code = main(["visualize", "--model", "efficientnet-lite0", "--target", "class:967", "--images",
                     str(tmp_path), "--out", str(out), "--steps", "1", *extra])
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("vital-fast: error")]
        assert code == 2 and len(lines) == 1 and "unknown compile 'turbo'" in lines[0], err
        assert not out.exists()


def _inductor_compiles() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.ones(2)).eq(3).all())
    except Exception:  # noqa: BLE001 - no C++ compiler, or an inductor that cannot build here
        return False


def test_inductor_gives_the_eager_image(lm, refs):
    if not _inductor_compiles():
        pytest.skip("inductor cannot compile on this machine")
    kw = dict(stages=[(1.0, 3)])
    eager = run(lm, refs, targets=["class:1"], **kw)
    compiled = run(lm, refs, targets=["class:1"], compile="on", **kw)
    assert torch.allclose(compiled.images, eager.images, atol=1e-4)
