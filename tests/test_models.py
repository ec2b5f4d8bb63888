"""The article's snippets, reproduced with the package's modules."""

import ast
from pathlib import Path

import torch

from ddp_demo.core import models
from ddp_demo.core.models import MLP, CNNClassifier, MultiplyByTwo, SimpleCNN


def test_mlp_output_shape():
    assert MLP(10, 5, 2)(torch.randn(1, 10)).shape == (1, 2)


def test_simple_cnn_keeps_height_and_width():
    assert SimpleCNN(3, 16)(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32, 32)


def test_simple_cnn_is_conv3x3_padding1_then_relu():
    cnn = SimpleCNN(3, 16)
    assert cnn.conv.kernel_size == (3, 3) and cnn.conv.padding == (1, 1)
    assert (cnn(torch.randn(2, 3, 8, 8)) >= 0).all()


def test_multiply_by_two_gradients():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    m = MultiplyByTwo()
    assert m.multiplier.item() == 2.0
    assert [name for name, _ in m.named_parameters()] == ["multiplier"]
    m(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    assert m.multiplier.grad.item() == 6.0


def test_classifier_wraps_the_unchanged_simple_cnn():
    clf = CNNClassifier(3, 3)
    assert type(clf.features) is SimpleCNN
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_models_know_nothing_about_distribution():
    tree = ast.parse(Path(models.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("distributed" in name for name in imported), imported
