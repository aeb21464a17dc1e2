"""The README's Python snippets run as written (with a tiny model and a few examples substituted)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_snippets():
    assert len(snippets()) >= 2


def test_fisher_snippet(tiny_dir, data_dir, tmp_path, monkeypatch):
    code = snippets()[0]
    assert '"minilm"' in code and '"../shared/data"' in code
    code = code.replace('"minilm"', repr(str(tiny_dir))).replace('"../shared/data"', repr(str(data_dir)))
    code = code.replace("num_examples=500", "num_examples=12")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert (tmp_path / "scores.json").is_file() and len(ns["scores"].ranking) == ns["layer_map"].num_layers
    assert set(ns["fisher"].diagonal) == {n for n, p in ns["model"].named_parameters() if p.requires_grad}


def test_backend_snippet():
    code = snippets()[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    loader = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(2)]
    ns = {"model": model, "loader": loader}
    exec(compile(code, "README.md", "exec"), ns)
    # the oracle: per-example gradients one by one
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in loader:
        for i in range(len(x)):
            logp = torch.log_softmax(model(x[i:i + 1]), -1)[0, y[i]]
            for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(logp, list(model.parameters()))):
                want[n] += g**2
    for n in want:
        torch.testing.assert_close(ns["fisher"][n], want[n] / 8, rtol=1e-4, atol=1e-7)
