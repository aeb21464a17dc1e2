"""Variability ratio: maths vs an independent numpy computation, the streaming pass on tiny encoders,
resume equivalence, errors, and end to end on all-MiniLM-L6-v2 with real data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastsel import ops
from fastsel.capture.taps import pool_mask
from fastsel.hf.layer_map import map_layers
from fastsel.scores.variability import (
    ClassStatistics,
    ClassStatisticsAccumulation,
    accumulate_class_statistics,
    merge_class_stats,
    scatter_matrices,
    smoothness,
    variability_layer_scores,
    variability_ratio,
)
from tests.stream_helpers import batch_class_stats
from tests.tiny_models import ARCHS, VOCAB, tiny_model

# --------------------------------------------------------------------------------------------------
# Oracle: the definitions of section 3.1 / appendix A.1 in plain numpy, from the stored features
# --------------------------------------------------------------------------------------------------


def numpy_nu(H: np.ndarray, y: np.ndarray, variant: str = "xie"):
    classes = np.unique(y)
    C = len(classes)
    mus = np.array([H[y == c].mean(0) for c in classes])
    if variant == "xie":
        sw = sum(np.cov(H[y == c].T, bias=True) for c in classes) / C
        centre = mus.mean(0)
    else:
        sw = sum((H[y == c] - mus[i]).T @ (H[y == c] - mus[i]) for i, c in enumerate(classes)) / len(y)
        centre = H.mean(0)
    sb = sum(np.outer(m - centre, m - centre) for m in mus) / C
    # The pseudo-inverse of S_B (rank <= C - 1) with a relative cutoff: features computed in float32 leave S_B
    # eigenvalues of ~1e-7 relative size that a float64 cutoff (~1e-13) would invert into ~1e13.
    w, v = np.linalg.eigh((sb + sb.T) / 2)
    keep = w > 1e-6 * w.max()
    pinv = (v[:, keep] / w[keep]) @ v[:, keep].T
    return np.trace(sw @ pinv) / C, sw, sb


def stats_of(H: np.ndarray, y: np.ndarray, C: int, batch: int = 7) -> tuple[torch.Tensor, ...]:
    """Feed stored features (N, D) through the op as T = 1 sequences, in batches."""
    D = H.shape[1]
    count, mean, m2 = torch.zeros(C, dtype=torch.float64), torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, D, D, dtype=torch.float64)
    h = torch.from_numpy(H).unsqueeze(1)
    lab = torch.from_numpy(y).long()
    for s in range(0, len(y), batch):
        ops.class_stats_update(count, mean, m2, h[s : s + batch], torch.ones(h[s : s + batch].shape[:2]), lab[s : s + batch])
    return count, mean, m2


def features(counts, D=6, seed=0, sep=1.0):
    rng = np.random.default_rng(seed)
    H, y = [], []
    for c, n in enumerate(counts):
        centre = rng.normal(size=D) * sep
        H.append(centre + rng.normal(size=(n, D)) @ rng.normal(size=(D, D)) * 0.5)
        y += [c] * n
    perm = rng.permutation(len(y))
    return np.concatenate(H)[perm], np.array(y)[perm]


@pytest.mark.parametrize("counts", [(40, 40), (50, 20, 7), (30, 5, 12, 60), (100, 3)])
@pytest.mark.parametrize("variant", ["xie", "papyan"])
def test_nu_matches_numpy_definition(counts, variant):
    H, y = features(counts, D=6, seed=len(counts))
    count, mean, m2 = stats_of(H, y, len(counts))
    nu_np, sw_np, sb_np = numpy_nu(H, y, variant)
    sw, M = scatter_matrices(count, mean, m2, variant)
    np.testing.assert_allclose(sw.numpy(), sw_np, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose((M.t() @ M / len(counts)).numpy(), sb_np, rtol=1e-9, atol=1e-12)
    res = variability_ratio(count, mean, m2, variant)
    assert res["nu"] == pytest.approx(nu_np, rel=1e-8)
    # both centrings are (weighted) averages of the class means: rank C - 1
    assert res["rank_sigma_b"] == len(counts) - 1


def test_variants_agree_on_balanced_data_and_differ_on_imbalanced():
    H, y = features((60, 60, 60), seed=3)
    st = stats_of(H, y, 3)
    assert variability_ratio(*st, variant="xie")["nu"] == pytest.approx(variability_ratio(*st, variant="papyan")["nu"], rel=1e-9)
    H, y = features((150, 10, 20), seed=3)
    st = stats_of(H, y, 3)
    assert abs(variability_ratio(*st, variant="xie")["nu"] / variability_ratio(*st, variant="papyan")["nu"] - 1) > 1e-3


def test_nu_is_scale_and_shift_invariant_and_wide_features():
    """Wide features (D > N): Sigma_w is singular, Sigma_b has rank C-1; still matches numpy's pinv."""
    H, y = features((8, 9, 7), D=40, seed=5)
    st = stats_of(H, y, 3)
    nu = variability_ratio(*st)["nu"]
    assert nu == pytest.approx(numpy_nu(H, y)[0], rel=1e-7)
    st2 = stats_of(3.0 * H + 100.0, y, 3)
    assert variability_ratio(*st2)["nu"] == pytest.approx(nu, rel=1e-7)


@pytest.mark.parametrize("variant", ["xie", "papyan"])
@pytest.mark.parametrize("C", [2, 3])
def test_nu_with_large_offset_and_weak_class_signal(variant, C):
    """Means far from 0, classes barely apart (random labels): the rounding noise of the centring must
    not be inverted as a direction of Sigma_b (regression test)."""
    rng = np.random.default_rng(C)
    H = rng.normal(size=(6000, 64)) * 0.1 + rng.normal(size=64) * 5
    y = rng.integers(0, C, 6000)
    nu = variability_ratio(*stats_of(H, y, C, batch=256), variant=variant)["nu"]
    assert nu == pytest.approx(numpy_nu(H, y, variant)[0], rel=1e-6)


def test_class_errors():
    H, y = features((10, 1), seed=0)
    with pytest.raises(ValueError, match="at least 2 examples in every class"):
        variability_ratio(*stats_of(H, y, 2))
    H, y = features((10,), seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        variability_ratio(*stats_of(H, y, 1))
    H, y = features((10, 10, 0), seed=0)
    with pytest.raises(ValueError, match=r"class counts are \[10, 10, 0\]"):
        variability_ratio(*stats_of(H, y, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassStatistics(3, 1)
    H = np.ones((6, 3))
    with pytest.raises(ValueError, match="coincide"):
        variability_ratio(*stats_of(H, np.array([0, 1] * 3), 2))


def test_smoothness():
    assert smoothness([1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.0)  # linear: no curvature
    v = np.array([1.0, 3.0, 2.0, 5.0])
    z = (v - v.mean()) / v.std()
    assert smoothness(v) == pytest.approx(((z[2:] - 2 * z[1:-1] + z[:-2]) ** 2).sum())
    assert smoothness(10 * v + 7) == pytest.approx(smoothness(v))  # normalised (footnote 2)
    assert smoothness([1.0, 2.0]) == 0.0


# --------------------------------------------------------------------------------------------------
# Streaming pass on tiny random encoders vs output_hidden_states + numpy
# --------------------------------------------------------------------------------------------------


def tiny_batches(arch: str, n: int = 22, batch_size: int = 5, C: int = 3, seed: int = 0, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    pad_id = 1 if arch in ("roberta", "xlm-roberta") else 0
    out = []
    for s in range(0, n, batch_size):
        B = min(batch_size, n - s)
        lengths = torch.randint(3, T + 1, (B,), generator=g)
        ids = torch.randint(3, VOCAB, (B, T), generator=g)
        att = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids[att == 0] = pad_id
        special = torch.zeros(B, T, dtype=torch.long)
        special[:, 0] = 1  # CLS
        special[torch.arange(B), lengths - 1] = 1  # SEP
        special[att == 0] = 1
        labels = torch.arange(s, s + B) % C  # every class present
        out.append({"input_ids": ids, "attention_mask": att, "special_tokens_mask": special, "labels": labels})
    return out


def oracle_layers(model, batches, pooling="mean"):
    """Pooled states of every layer from output_hidden_states (no hooks), by a per-example loop."""
    states, labels = None, []
    with torch.no_grad():
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            hs = out.hidden_states
            states = states or [[] for _ in hs]
            m = pool_mask(b, pooling)
            for i, h in enumerate(hs):
                for e in range(h.shape[0]):
                    states[i].append(h[e][m[e]].double().mean(0).numpy())
            labels += b["labels"].tolist()
    return [np.array(s) for s in states], np.array(labels)


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_matches_hidden_states_oracle(arch):
    model = tiny_model(arch, num_labels=3, num_layers=3)
    batches = tiny_batches(arch)
    stats = accumulate_class_statistics(model, batches, num_classes=3)
    states, labels = oracle_layers(model, batches)
    assert stats.num_layers == len(states) == 4
    for i, H in enumerate(states):
        assert variability_ratio(*stats.layer(i))["nu"] == pytest.approx(numpy_nu(H, labels)[0], rel=1e-6)
        assert variability_ratio(*stats.layer(i), variant="papyan")["nu"] == pytest.approx(numpy_nu(H, labels, "papyan")[0], rel=1e-6)


def test_cls_pooling_and_left_padding():
    batch = {"attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]),
             "special_tokens_mask": torch.tensor([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]])}
    assert pool_mask(batch, "cls").tolist() == [[False, False, True, False, False], [True, False, False, False, False]]
    assert pool_mask(batch, "mean").tolist() == [[False, False, False, True, False], [False, True, False, False, False]]
    with pytest.raises(ValueError, match="special_tokens_mask"):
        pool_mask({"attention_mask": batch["attention_mask"]}, "mean")
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_mask(batch, "max")
    model = tiny_model("bert", num_labels=3)
    batches = tiny_batches("bert")
    for b in batches:
        b["input_ids"][:, 0] = 2  # the same CLS id everywhere, as a tokenizer gives
    stats = accumulate_class_statistics(model, batches, num_classes=3, pooling="cls")
    states, labels = oracle_layers(model, batches, "cls")
    assert variability_ratio(*stats.layer(2))["nu"] == pytest.approx(numpy_nu(states[2], labels)[0], rel=1e-6)
    # the CLS embedding is the same for every example: no class signal there, reported, not fatal
    scores = variability_layer_scores(stats, map_layers(model), pooling="cls")
    assert "score" not in scores.extra["embeddings"] and "coincide" in scores.extra["embeddings"]["note"]
    assert "ranking (best first)" in scores.table()  # the table skips the score-less embeddings row
    assert all(np.isfinite(l.score) for l in scores.layers)


def test_batch_size_and_order_invariance_of_the_pass():
    model = tiny_model("bert", num_labels=3)
    whole = tiny_batches("bert", n=24, batch_size=24)
    split = [{k: v[s : s + 4] for k, v in whole[0].items()} for s in range(0, 24, 4)]
    a = accumulate_class_statistics(model, split, num_classes=3)
    b = accumulate_class_statistics(model, whole, num_classes=3)
    rev = [{k: v.flip(0) for k, v in bt.items()} for bt in reversed(whole)]
    c = accumulate_class_statistics(model, rev, num_classes=3)
    for i in range(a.num_layers):
        for x, y, z in zip(a.layer(i), b.layer(i), c.layer(i)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # fp32 model: padding changes the states slightly
            torch.testing.assert_close(y, z, rtol=1e-6, atol=1e-7)  # same data reversed: only fp32 GEMM order differs


def test_skipped_examples_counted_without_a_host_read(monkeypatch):
    """consume() counts the examples without a pooled token on the device: no int(), item() or tolist() per batch;
    num_skipped reads the count once, when asked."""
    model = tiny_model("bert", num_labels=3)
    batches = tiny_batches("bert", n=12, batch_size=4)
    for b in batches[:2]:
        b["special_tokens_mask"][1] = 1  # example 1 of the first two batches: no pooled token
    acc = ClassStatisticsAccumulation(model, map_layers(model), 3)
    reads = []
    for b in batches:
        with acc.capture(b):
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            with monkeypatch.context() as m:
                for name in ("__int__", "item", "tolist", "__bool__"):
                    m.setattr(torch.Tensor, name, lambda *a, name=name, **k: reads.append(name))
                acc.consume(b)
    assert reads == []
    assert acc.stats.num_skipped == 2 and acc.stats.num_examples == 12
    acc.stats.num_skipped = 5  # set (a checkpoint, a reduction): the device count since is dropped
    assert acc.stats.num_skipped == 5


def test_hooked_keeps_the_layer_taps_for_many_batches():
    model = tiny_model("bert", num_labels=3)
    batches = tiny_batches("bert", n=12, batch_size=4)
    want = accumulate_class_statistics(model, batches, num_classes=3)  # taps registered per batch
    taps = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    acc = ClassStatisticsAccumulation(model, map_layers(model), 3)
    with acc.hooked(), torch.no_grad():
        registered = taps()
        assert registered == map_layers(model).num_layers + 1  # the embeddings' output and every block's
        model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])  # outside a capture
        for b in batches:
            with acc.capture(b):
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                acc.consume(b)
            assert taps() == registered
    assert taps() == 0
    assert acc.stats.num_examples == want.num_examples
    for i in range(want.num_layers):
        for a, b in zip(acc.stats.layer(i), want.layer(i)):
            torch.testing.assert_close(a, b)


def _oracle_stats(model, batches, rows_of=None):
    """Per layer index, (count, mean, m2) float64 of the pooled states of the examples rows_of(batch_no) picks (all by
    default), from output_hidden_states by a per-example loop."""
    states, labels = oracle_layers(model, batches)
    keep = np.concatenate([np.arange(len(b["labels"]))[rows_of(n) if rows_of else slice(None)] + sum(
        len(x["labels"]) for x in batches[:n]) for n, b in enumerate(batches)])
    y = torch.from_numpy(labels[keep])
    return [batch_class_stats(torch.from_numpy(H[keep]), y, 3) for H in states]


def test_one_update_per_batch_and_group_for_all_layers(monkeypatch):
    """The examples are grouped by class once per batch (and once per confidence group); each layer is pooled as the
    forward makes it, and after the forward one update merges every layer of the batch, (L, B, 1, D), and one per
    confidence group: no update per layer. The statistics (all and per group) are the hidden-states oracle's."""
    import fastsel.scores.variability as variability

    model = tiny_model("bert", num_labels=3, num_layers=3)
    batches = tiny_batches("bert", n=12, batch_size=4)
    for b in batches:
        b["index"] = torch.arange(len(b["labels"])) + 4 * batches.index(b)
        b["group"] = torch.tensor([0, 1, 1, 0])
    made, updates, pools = [], [], []
    real_grouping, real_update, real_pool = ops.class_grouping, ops.class_stats_update, ops.class_stats_pool

    def grouping(labels, C):
        made.append(real_grouping(labels, C))
        return made[-1]

    def update(*args, **kw):
        updates.append((tuple(args[3].shape), args[6] if len(args) > 6 else kw.get("grouping")))
        real_update(*args, **kw)

    def pool(*args):
        pools.append(tuple(args[1].shape))
        real_pool(*args)

    monkeypatch.setattr(variability.ops, "class_grouping", grouping)
    monkeypatch.setattr(variability.ops, "class_stats_update", update)
    monkeypatch.setattr(variability.ops, "class_stats_pool", pool)
    acc = ClassStatisticsAccumulation(model, map_layers(model), 3, groups=2)
    with torch.no_grad(), acc.hooked():
        for b in batches:
            with acc.capture(b):
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                acc.consume(b)
    monkeypatch.undo()
    layers = map_layers(model).num_layers + 1
    assert len(made) == len(batches) * 3  # the batch's and each of its 2 groups'
    assert len(pools) == len(batches) * layers  # each layer pooled once per batch
    D = model.config.hidden_size
    assert [shape for shape, _ in updates] == [(layers, 4, 1, D), (layers, 2, 1, D), (layers, 2, 1, D)] * len(batches)
    assert all(any(g is m for m in made) for _, g in updates)  # every update got one of the batch's groupings
    for stats, rows_of in [(acc.stats, None), (acc.group_stats[0], lambda n: [0, 3]), (acc.group_stats[1], lambda n: [1, 2])]:
        for i, want in enumerate(_oracle_stats(model, batches, rows_of)):
            count, mean, m2 = stats.layer(i)
            assert count.tolist() == want[0].tolist()
            torch.testing.assert_close(mean, want[1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m2, want[2], rtol=1e-5, atol=1e-5)


def test_a_failed_forward_adds_nothing():
    """The layers are merged only after a whole forward: a batch whose forward raises leaves the statistics as they
    were (the per-layer updates of before added the layers that had run)."""
    model = tiny_model("bert", num_labels=3, num_layers=3)
    batches = tiny_batches("bert", n=8, batch_size=4)
    acc = ClassStatisticsAccumulation(model, map_layers(model), 3)

    def fail(index, hidden, mask, labels):
        if index == 2:
            raise RuntimeError("boom")

    with torch.no_grad(), acc.hooked():
        with acc.capture(batches[0]):
            model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
        before = [tuple(t.clone() for t in acc.stats.layer(i)) for i in range(acc.stats.num_layers)]
        acc.on_layer = fail
        with pytest.raises(RuntimeError, match="boom"), acc.capture(batches[1]):
            model(input_ids=batches[1]["input_ids"], attention_mask=batches[1]["attention_mask"])
    for i, old in enumerate(before):
        for a, b in zip(acc.stats.layer(i), old):
            assert torch.equal(a, b)


def test_update_layers_after_a_checkpoint_restacks_and_matches_per_layer_updates():
    """After load_state_dict (separate per-layer tensors), update_layers stacks them once and goes on with one call:
    the statistics of per-layer updates; a call without every layer index is refused."""
    g = torch.Generator().manual_seed(0)
    L, B, D, C = 3, 6, 5, 3
    pooled = [torch.randn(L, B, D, generator=g, dtype=torch.float64) for _ in range(3)]
    present = torch.tensor([True, True, False, True, True, True])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    want = ClassStatistics(L, C)
    for p in pooled:
        for i in range(L):
            want.update(i, p[i].unsqueeze(1), present.unsqueeze(1), labels)
    got = ClassStatistics(L, C)
    got.update_layers(pooled[0], present, labels)
    resumed = ClassStatistics(L, C)
    resumed.load_state_dict(got.state_dict())
    for p in pooled[1:]:
        resumed.update_layers(p, present, labels)
    assert resumed._count_all is not None and resumed.count[1].data_ptr() == resumed._count_all[1].data_ptr()
    for i in range(L):
        for a, b in zip(resumed.layer(i), want.layer(i)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="all 3 layer indices"):
        got.update_layers(pooled[0][:2], present, labels)


def test_a_layer_tapped_twice_in_one_capture_counts_twice():
    """Two forwards in one capture: the second tap of each layer is merged at once (layer by layer), the first with
    the other layers after the forward: the statistics of the batch fed twice."""
    model = tiny_model("bert", num_labels=3, num_layers=2)
    batch = tiny_batches("bert", n=5, batch_size=5)[0]
    acc = ClassStatisticsAccumulation(model, map_layers(model), 3)
    with torch.no_grad(), acc.capture(batch):
        for _ in range(2):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = accumulate_class_statistics(model, [batch, batch], num_classes=3)
    for i in range(acc.stats.num_layers):
        for a, b in zip(acc.stats.layer(i), want.layer(i)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_regression_labels_and_empty_data_rejected():
    model = tiny_model("bert", num_labels=3)
    batches = tiny_batches("bert", n=6)
    batches[0]["labels"] = batches[0]["labels"].float()
    with pytest.raises(ValueError, match="regression"):
        accumulate_class_statistics(model, batches, num_classes=3)
    with pytest.raises(ValueError, match="empty"):
        accumulate_class_statistics(model, [], num_classes=3)


def test_layer_scores_schema(tmp_path):
    model = tiny_model("bert", num_labels=3, num_layers=4)
    stats = accumulate_class_statistics(model, tiny_batches("bert", n=30), num_classes=3)
    scores = variability_layer_scores(stats, map_layers(model), model_name="tiny", task="t", split="train")
    nus = [s.score for s in scores.layers]
    assert scores.info["l_star"] == int(np.argmin(nus)) == scores.ranking[0]
    assert not scores.higher_is_better and len(nus) == 4
    assert scores.extra["embeddings"]["score"] == pytest.approx(variability_ratio(*stats.layer(0))["nu"])
    assert scores.info["zeta"] == pytest.approx(smoothness(nus))
    scores.to_json(tmp_path / "s.json")
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["l_star"] == scores.info["l_star"] and d["ranking"][0] == d["l_star"]
    assert "nu_papyan" in d["layers"][0]


# --------------------------------------------------------------------------------------------------
# Real model, real data
# --------------------------------------------------------------------------------------------------


def test_regression_task_rejected(data_dir):
    from fastsel.pipeline.config import ScoreConfig
    from fastsel.pipeline.inmemory import prepare

    with pytest.raises(ValueError, match="needs classes"):
        prepare(ScoreConfig(metric="variability", model="minilm", task="stsb", data_dir=str(data_dir), num_examples=10))


@pytest.mark.slow
def test_cli_minilm_sst2_end_to_end(data_dir, minilm_path, tmp_path, capsys):
    from fastsel.cli.app import main
    from fastsel.data.features import make_dataloader, tokenize_examples
    from fastsel.data.readers import load_examples
    from fastsel.hf.loading import load_model

    out, plot, ckpt = tmp_path / "scores.json", tmp_path / "nu.png", tmp_path / "ckpt"
    common = ["score", "--metric", "variability", "--model", str(minilm_path), "--task", "sst2", "--data-dir", str(data_dir),
              "--num-examples", "96", "--max-length", "32", "--batch-size", "16", "--no-progress"]
    # in memory, with probes
    assert main(common + ["--probe", "--probe-eval-examples", "64", "--out", str(out), "--plot", str(plot)]) == 0
    d = json.loads(out.read_text())
    assert d["metric"] == "variability" and len(d["layers"]) == 6 and d["num_examples"] == 96
    assert d["l_star"] == int(np.argmin([l["score"] for l in d["layers"]]))
    assert all("probe" in l for l in d["layers"]) and d["rho_probe"]["pearson"] is not None
    assert plot.stat().st_size > 0
    # independent check of layer 3 from output_hidden_states + numpy, with the tokenizer's special-tokens mask
    model, tok, _ = load_model(str(minilm_path), num_labels=2)
    ex = load_examples("sst2", data_dir, "train", num_examples=96, seed=0)
    states, labels = oracle_layers(model, list(make_dataloader(tokenize_examples(ex, tok, 32), tok, 16)))
    assert d["layers"][3]["score"] == pytest.approx(numpy_nu(states[4], labels)[0], rel=1e-5)
    assert d["extra"]["embeddings"]["score"] == pytest.approx(numpy_nu(states[0], labels)[0], rel=1e-5)
    # the streamed pass (bucketed batches, checkpoints) gives the same nu; a finished checkpoint resumes to it
    streamed, resumed = tmp_path / "streamed.json", tmp_path / "resumed.json"
    ck = ["--checkpoint", str(ckpt), "--checkpoint-every", "32"]
    assert main(common + ck + ["--keep-checkpoints", "--out", str(streamed)]) == 0
    assert main(common + ck + ["--resume", "--out", str(resumed)]) == 0
    ds, dr = json.loads(streamed.read_text()), json.loads(resumed.read_text())
    assert [l["score"] for l in ds["layers"]] == pytest.approx([l["score"] for l in d["layers"]], rel=1e-6)
    assert [l["score"] for l in dr["layers"]] == [l["score"] for l in ds["layers"]]


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_merge_class_stats_is_exact(parts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * 3 + 100.0  # large mean: cancellation-prone
    y = torch.randint(0, 3, (200,), generator=g)
    y[y == 2] = 1  # class 2 empty everywhere
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, 200), parts - 1, replace=False)).tolist()
    pieces = [batch_class_stats(xp, yp, 3) for xp, yp in zip(torch.tensor_split(x, cuts), torch.tensor_split(y, cuts))]
    acc = pieces[0]
    for p in pieces[1:]:
        acc = merge_class_stats(*acc, *p)
    count, mean, m2 = acc
    xn, yn = x.numpy(), y.numpy()
    for c in range(3):
        xc = xn[yn == c]
        assert int(count[c]) == len(xc)
        if len(xc):
            torch.testing.assert_close(mean[c], torch.from_numpy(xc.mean(0)))
            torch.testing.assert_close(m2[c], torch.from_numpy((xc - xc.mean(0)).T @ (xc - xc.mean(0))), rtol=1e-9, atol=1e-8)
        else:
            assert mean[c].abs().sum() == 0 and m2[c].abs().sum() == 0


def test_merge_class_stats_shape_errors():
    z = batch_class_stats(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]), 2)
    w = batch_class_stats(torch.zeros(2, 4, dtype=torch.float64), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="different shapes"):
        merge_class_stats(*z, *w)
    with pytest.raises(ValueError, match="expected count"):
        merge_class_stats(z[0], z[1], z[1], z[0], z[1], z[1])
