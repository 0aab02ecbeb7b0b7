"""Real clients of the loss, against the real packages (the ``clients`` extra: torch-lucent, horama, einops):
each example under examples/ runs, and the loss goes down in it."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


def _example(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("param", ["fourier", "pixel"])
def test_lucent_render_vis_with_the_loss(tmp_path, param):
    pytest.importorskip("lucent", reason="the clients extra: pip install torch-lucent")
    initial, final = _example("lucent_loss").main(["--steps", "12", "--size", "64", "--param", param,
                                                   "--out", str(tmp_path / "l.png")])
    assert final < 0.7 * initial and (tmp_path / "l.png").stat().st_size > 0


def test_horama_fourier_with_the_loss(tmp_path):
    pytest.importorskip("horama", reason="the clients extra: pip install horama einops")
    first, last = _example("horama_loss").main(["--steps", "16", "--size", "64", "--out", str(tmp_path / "h.png")])
    assert last < 0.8 * first and (tmp_path / "h.png").stat().st_size > 0


def test_compiled_training_step_with_the_regularizer():
    eager, compiled = _example("compiled_regularizer").main(["--steps", "4", "--backend", "aot_eager"])
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    assert compiled[-1][0] < compiled[0][0]


def test_adapters_name_a_missing_layer():
    from vital_fast.integrations import layer_prototype

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="layer 'conv9' is not a module of Sequential"):
        layer_prototype(net, "conv9", torch.rand(1, 3, 8, 8))
