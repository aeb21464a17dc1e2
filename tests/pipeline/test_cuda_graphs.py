"""--cuda-graphs (fastsel.pipeline.cuda_graphs): the bucket padding, warm-up/capture/replay counting with fake
capturers, the fallbacks and their reasons, the config checks, and that padding to a bucket leaves the Fisher scores
unchanged. The capture itself (torch.cuda.CUDAGraph) needs a GPU: the GPU check runs it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastsel.pipeline import cuda_graphs as cg
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.cuda_graphs import (
    BucketPolicy,
    GraphAdapter,
    GraphSteps,
    bucket_length,
    check_cuda_graphs,
    pad_into,
    register_graph_adapter,
    why_not_capturable,
)
from fastsel.pipeline.registry import BatchConsumer

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}


# -- the bucket policy -------------------------------------------------------------------------------------------


def test_bucket_length():
    assert [bucket_length(t) for t in (1, 31, 32, 33, 100)] == [32, 32, 32, 64, 128]
    assert bucket_length(40, 32, cap=48) == 48  # not beyond the longest input of the run
    assert bucket_length(50, 32, cap=48) == 50  # never below the batch's own length
    assert bucket_length(5, 8) == 8
    with pytest.raises(ValueError):
        bucket_length(0)


def _batch(B: int, T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.randint(5, 100, (B, T), generator=g) * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros(B, T, dtype=torch.long), "special_tokens_mask": 1 - mask,
            "labels": torch.randint(0, 2, (B,), generator=g), "index": torch.arange(B) + 100 * seed}


def test_pad_into_pads_on_the_right_with_the_pad_values():
    batch = _batch(3, 5)
    batch["input_ids"][:, 3:] = 7  # a pad id of 7 where the mask is 0 (visible in the extra positions)
    static = {k: torch.full((3, 32) if v.dim() == 2 else tuple(v.shape), -1, dtype=v.dtype) for k, v in batch.items()}
    pad_into(static, batch, {**PAD, "input_ids": 7})
    for k in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"):
        assert static[k].shape == (3, 32)
        assert torch.equal(static[k][:, :5], batch[k])
        assert (static[k][:, 5:] == {**PAD, "input_ids": 7}[k]).all(), k
    assert torch.equal(static["labels"], batch["labels"]) and torch.equal(static["index"], batch["index"])
    with pytest.raises(ValueError, match="no pad value"):
        pad_into({"other": torch.zeros(3, 8)}, {"other": torch.zeros(3, 5)}, PAD)


def test_policy_key_is_batch_size_and_bucketed_length():
    p = BucketPolicy(multiple=32, cap=48)
    assert p.key(_batch(4, 20), "none") == p.key(_batch(4, 30, seed=1), "none")
    assert p.key(_batch(4, 20), "none")[:3] == (4, 32, "none")
    assert p.key(_batch(4, 40), "none")[1] == 48
    assert p.key(_batch(3, 20), "none") != p.key(_batch(4, 20), "none")  # B is never padded
    assert p.key(_batch(4, 20), "bf16") != p.key(_batch(4, 20), "none")
    with pytest.raises(ValueError):
        BucketPolicy(warmup=0)


# -- the runner, with fake capturers -------------------------------------------------------------------------------


class Toy(BatchConsumer):
    """A consumer whose device state is one persistent tensor updated in place, its host state a count."""

    name = "toy-graphs"

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.n = 0

    def consume(self, batch, outputs) -> None:
        self.total.add_((batch["input_ids"] * batch["attention_mask"]).double().sum())
        self.n += int(batch["input_ids"].shape[0])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def all_reduce(self, group=None):
        pass

    def result(self):
        raise NotImplementedError


class ToyAdapter(GraphAdapter):
    def host_state(self, consumer):
        return consumer.n

    def restore(self, consumer, state):
        consumer.n = state

    def advance(self, state, batch_size):
        return state + batch_size


register_graph_adapter(Toy.name, ToyAdapter())


def toy_step(model, consumers, batch, autocast, device):
    for c in consumers:
        c.consume(batch, None)
    return torch.ones((), dtype=torch.bool)


class RunningCapturer:
    """Captures by running the step (on the static buffers); a replay runs it again, host effects included (the
    runner must undo them and redo the adapter's)."""

    device_types = ("cpu",)
    capture_runs_work = True

    def __init__(self) -> None:
        self.warmups = self.captures = self.replays = 0

    def warmup(self, fn):
        self.warmups += 1
        return fn()

    def capture(self, fn):
        self.captures += 1
        capturer = self

        class Graph:
            outputs = fn()

            def replay(self) -> None:
                capturer.replays += 1
                Graph.outputs = fn()

        return Graph()


class RecordingCapturer(RunningCapturer):
    """Like a CUDA capture: the Python of the step runs (its host effects stay), its device work does not (the
    tensors in ``device_state`` are put back); the runner replays once."""

    capture_runs_work = False

    def __init__(self, device_state, fail: bool = False) -> None:
        super().__init__()
        self.device_state, self.fail = device_state, fail

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        saved = [t.clone() for t in self.device_state()]
        graph = super().capture(fn)
        for t, s in zip(self.device_state(), saved):
            t.copy_(s)
        return graph


def _runner(capturer, consumers, **policy) -> GraphSteps:
    return GraphSteps("on", toy_step, True, "on", BucketPolicy(**policy), capturer, PAD, consumers)


SHAPES = [(4, 20), (4, 30), (4, 25), (4, 40), (4, 31), (2, 10)]  # (4, 32) x4, (4, 64) once, (2, 32) once


def _drive(graphs: GraphSteps, consumers) -> list[dict]:
    batches = [_batch(B, T, seed=i) for i, (B, T) in enumerate(SHAPES)]
    for b in batches:
        logits_ok = graphs.step(None, consumers, b, "none", torch.device("cpu"))
        assert logits_ok.shape == () and bool(logits_ok)
    return batches


def _expected(batches) -> tuple[float, int]:
    return (float(sum((b["input_ids"] * b["attention_mask"]).double().sum() for b in batches)),
            sum(int(b["input_ids"].shape[0]) for b in batches))


@pytest.mark.parametrize("make", [RunningCapturer, lambda: None], ids=["running", "recording"])
def test_warmup_capture_replay_and_eager_counts(make):
    toy = Toy()
    capturer = make() or RecordingCapturer(lambda: [toy.total])
    graphs = _runner(capturer, [toy])
    assert graphs.step == graphs.run
    batches = _drive(graphs, [toy])
    total, n = _expected(batches)
    assert float(toy.total) == total and toy.n == n  # the replays read the new batches, counted once each
    rep = graphs.report(len(batches))
    assert rep["graphs_captured"] == 1 and rep["replays"] == 2 and rep["eager_batches"] == 3
    assert rep["eager_why"] == {"warm-up (first sightings of a shape)": 3}  # (4,32) once, (4,64) and (2,32) seen once
    assert rep["used"] and capturer.captures == 1 and capturer.warmups == 3
    assert capturer.replays == (2 if capturer.capture_runs_work else 3)  # a recorded capture is replayed once more


def test_warmup_two_sightings_and_graph_limit():
    toy = Toy()
    graphs = _runner(RunningCapturer(), [toy], warmup=2)
    _drive(graphs, [toy])
    assert graphs.report()["graphs_captured"] == 1 and graphs.replays == 1
    toy = Toy()
    graphs = _runner(RunningCapturer(), [toy], max_graphs=0)
    batches = _drive(graphs, [toy])
    rep = graphs.report(len(batches))
    assert rep["graphs_captured"] == 0 and rep["eager_why"]["graph limit"] == 3
    assert float(toy.total) == _expected(batches)[0]


def test_a_failed_capture_runs_the_batch_eager_and_gives_up():
    toy = Toy()
    graphs = _runner(RecordingCapturer(lambda: [toy.total], fail=True), [toy])
    batches = _drive(graphs, [toy])
    total, n = _expected(batches)
    assert float(toy.total) == total and toy.n == n
    rep = graphs.report(len(batches))
    assert rep["graphs_captured"] == 0 and not rep["used"] and graphs.step is toy_step
    assert "capture failed (RuntimeError: operation not permitted" in rep["why"]
    assert rep["eager_why"]["capture failed"] == 1 and rep["eager_batches"] == len(batches)


def test_a_capture_with_host_effects_the_adapter_does_not_redo_is_refused():
    class Wrong(ToyAdapter):
        def advance(self, state, batch_size):
            return state  # forgets the count

    class Toy2(Toy):
        name = "toy-graphs-wrong"

    register_graph_adapter(Toy2.name, Wrong())
    toy = Toy2()
    graphs = _runner(RecordingCapturer(lambda: [toy.total]), [toy])
    batches = _drive(graphs, [toy])
    total, n = _expected(batches)
    assert float(toy.total) == total and toy.n == n  # eager after the refusal: still right
    assert "changed host state" in graphs.report()["why"] and graphs.report()["graphs_captured"] == 0


# -- what cannot be captured -----------------------------------------------------------------------------------------


def _fisher_stub(mode="empirical", groups=0, labels=2, fallback=()):
    model = SimpleNamespace(config=SimpleNamespace(num_labels=labels))
    acc = SimpleNamespace(model=model, fallback_params=set(fallback), num_examples=0, sums_used=False, group_counts=[])
    return SimpleNamespace(name="fisher", needs_hidden_states=False, mode=mode, groups=groups, acc=acc)


def test_fallback_reasons():
    assert why_not_capturable([_fisher_stub()]) is None
    assert why_not_capturable([_fisher_stub(mode="exact")]) is None  # binary: a closed form, no eigh
    assert "sampled" in why_not_capturable([_fisher_stub(mode="sampled")])
    assert "--confidence-groups" in why_not_capturable([_fisher_stub(groups=4)])
    assert "eigh" in why_not_capturable([_fisher_stub(mode="exact", labels=3)])
    assert "exact per-example fallback" in why_not_capturable([_fisher_stub(fallback=["w"])])
    assert "no CUDA-graph adapter" in why_not_capturable([_fisher_stub(), SimpleNamespace(name="variability",
                                                                                         needs_hidden_states=False)])
    assert "output_hidden_states" in why_not_capturable([SimpleNamespace(name="classmean", needs_hidden_states=True)])


def test_the_exact_fallback_found_in_a_warmup_gives_up():
    stub = _fisher_stub()

    def step(model, consumers, batch, autocast, device):
        stub.acc.fallback_params.add("tied.weight")  # the engine met a parameter it could not credit per example
        stub.acc.num_examples += int(batch["input_ids"].shape[0])
        return torch.ones((), dtype=torch.bool)

    graphs = GraphSteps("on", step, True, "on", BucketPolicy(), RunningCapturer(), PAD, [stub])
    _drive(graphs, [stub])
    rep = graphs.report()
    assert rep["graphs_captured"] == 0 and "exact per-example fallback" in rep["why"]
    assert stub.acc.num_examples == sum(B for B, _ in SHAPES)


# -- the setting -------------------------------------------------------------------------------------------------------


def test_config_validation_and_on_without_cuda():
    assert PipelineConfig().cuda_graphs == "auto"
    assert PipelineConfig.from_json(PipelineConfig(cuda_graphs="off").to_json()).cuda_graphs == "off"
    with pytest.raises(ValueError, match="--cuda-graphs must be one of auto, on, off"):
        PipelineConfig(cuda_graphs="maybe")
    with pytest.raises(ValueError, match=r"^fastsel: --cuda-graphs on needs a CUDA device"):
        check_cuda_graphs("on", "cpu")
    check_cuda_graphs("auto", "cpu")
    check_cuda_graphs("off", "cpu")
    check_cuda_graphs("on", "cuda:1")


def test_on_without_cuda_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    from fastsel.pipeline import streamed

    def no(*a, **k):
        raise AssertionError("loaded something before refusing --cuda-graphs on")

    monkeypatch.setattr(streamed, "load_model", no)
    monkeypatch.setattr(streamed, "load_tokenizer", no)
    monkeypatch.setattr(streamed, "apply_length_limit", no)
    cfg = ScoreConfig(model=str(tmp_path / "nosuch"), task="sst2", num_examples=8)
    with pytest.raises(ValueError, match="needs a CUDA device") as err:
        streamed.run_pipeline(cfg, PipelineConfig(cuda_graphs="on"), progress=False)
    assert "\n" not in str(err.value)


# -- the Fisher scores ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from fastsel.hf.loading import load_model

    model, tok, lmap = load_model(tiny_dir, num_labels=2, seed=0)
    return model.eval(), tok


def test_fisher_of_a_batch_padded_to_its_bucket_equals_the_unpadded(tiny):
    from fastsel.data.features import PadCollator
    from fastsel.hf.io import model_inputs
    from fastsel.scores.fisher import FisherAccumulation

    model, tok = tiny
    enc = tok(["a good film with a great cast", "bad", "slow and dull but fine", "the plot"],
              padding=True, return_tensors="pt", return_special_tokens_mask=True)
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")}
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    T = batch["input_ids"].shape[1]
    padded = {k: torch.empty((4, 64) if v.dim() == 2 else tuple(v.shape), dtype=v.dtype) for k, v in batch.items()}
    pad_into(padded, batch, PadCollator(tok).pad_values)
    assert padded["input_ids"].shape == (4, 64) and T < 32
    assert (padded["attention_mask"][:, T:] == 0).all() and (padded["input_ids"][:, T:] == tok.pad_token_id).all()

    def fisher(b):
        acc = FisherAccumulation(model, "empirical")
        with acc.capture(b):
            out = model(**model_inputs(b))
            acc.consume(b, out)
        return out.logits.detach(), acc.result().diagonal

    (l0, d0), (l1, d1) = fisher(batch), fisher(padded)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert d0.keys() == d1.keys()
    for n in d0:
        torch.testing.assert_close(d1[n], d0[n], rtol=1e-4, atol=1e-9, msg=n)


N = 48


def _pass(tiny_dir, data_dir, pcfg: PipelineConfig):
    from fastsel.data.corpus import load_tokenized_corpus
    from fastsel.hf.loading import load_model
    from fastsel.pipeline.context import PipelineContext
    from fastsel.pipeline.distributed import DistEnv
    from fastsel.pipeline.drivers.fisher import FisherConsumer
    from fastsel.pipeline.streamed import run_pass

    cfg = ScoreConfig(model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=N, batch_size=4, max_length=40,
                      confidence_groups=0, options={"head": "fresh", "label_check": 0})
    model, tok, lmap = load_model(cfg.model, num_labels=2, seed=cfg.seed)
    corpus = load_tokenized_corpus(cfg, tok, pcfg.cache_dir)
    ctx = PipelineContext(cfg, pcfg, model, tok, lmap, corpus.task, torch.device("cpu"), len(corpus))
    return ctx, run_pass(ctx, corpus, [FisherConsumer(ctx)], DistEnv(), progress=False)


def test_off_and_auto_on_cpu_are_todays_eager_step(tiny_dir, data_dir, cache):
    ctx, auto = _pass(tiny_dir, data_dir, PipelineConfig())
    _, off = _pass(tiny_dir, data_dir, PipelineConfig(cuda_graphs="off"))
    a, o = auto.consumers[0].acc, off.consumers[0].acc
    assert a.num_examples == o.num_examples == N
    for n, s in o.totals().items():
        assert torch.equal(a.totals()[n], s)  # bit for bit: the same step
    rep = auto.stats["cuda_graphs"]
    assert rep["requested"] == "auto" and not rep["used"] and rep["why"].startswith("auto: eager on cpu")
    assert rep["eager_batches"] == N // 4 and rep["graphs_captured"] == rep["replays"] == 0
    assert off.stats["cuda_graphs"]["why"] == "off"
    step = object()
    for mode in ("off", "auto"):
        ctx.pipeline = PipelineConfig(cuda_graphs=mode)
        assert GraphSteps.for_pass(ctx, auto.consumers, step).step is step  # nothing wrapped
    ctx.pipeline = PipelineConfig(cuda_graphs="on")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphSteps.for_pass(ctx, auto.consumers, step)


def test_pass_with_a_fake_capturer_gives_the_eager_fisher(tiny_dir, data_dir, cache, monkeypatch):
    """run_pass with graphs on (a capturer that runs the step, on the CPU): padded, warmed up, captured, replayed;
    the Fisher sums and the example count equal the eager pass's up to float rounding."""
    _, eager = _pass(tiny_dir, data_dir, PipelineConfig(cuda_graphs="off"))
    capturer = RunningCapturer()
    monkeypatch.setattr(cg, "default_capturer", lambda device: capturer)
    _, graphs = _pass(tiny_dir, data_dir, PipelineConfig(cuda_graphs="on"))
    rep = graphs.stats["cuda_graphs"]
    assert rep["used"] and rep["graphs_captured"] >= 1 and rep["replays"] >= 1, rep
    assert rep["graphs_captured"] + rep["replays"] + rep["eager_batches"] == N // 4
    assert capturer.replays == rep["replays"]
    g, e = graphs.consumers[0].acc, eager.consumers[0].acc
    assert g.num_examples == e.num_examples == N and g.fallback_params == e.fallback_params == set()
    for n, s in e.totals().items():
        torch.testing.assert_close(g.totals()[n], s, rtol=1e-4, atol=1e-9, msg=n)
