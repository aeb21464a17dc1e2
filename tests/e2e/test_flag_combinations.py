"""Issue 24 item 6: combinations of valid flags and files, drawn by hypothesis (test_every_flag.py sets one flag at a
time; test_fuzz.py mostly single bad values).

Contract for every drawn command: exit code 0 with finite, schema-valid output (strict JSON: NaN/Infinity refused;
every score finite) whose recorded config matches the flags, or exit code 2 with exactly one ``error:`` line and no
output. Beyond that, what fastsel must do is predicted: a combination that only sets flags where they apply must
run, and one where a flag would be ignored or contradicts another must be refused (``expect``).

Bounded and deterministic (``derandomize``): about a minute on two cores. ``FASTSEL_FUZZ_RANDOM=1`` draws fresh
combinations, ``FASTSEL_FUZZ_SCALE=4`` four times as many.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = float(os.environ.get("FASTSEL_FUZZ_SCALE", "1"))
OUTCOMES: dict[str, list[int]] = {"score": [], "plan": []}


def _settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    derandomize=not os.environ.get("FASTSEL_FUZZ_RANDOM"), suppress_health_check=list(HealthCheck))


def _strict(text: str):
    def no(c):
        raise AssertionError(f"{c} in JSON output")

    return json.loads(text, parse_constant=no)


_run = run_cli  # (tests/cli_helpers.py)


def _refused(rc: int, err: str, outs: list[Path], argv: list[str]) -> str:
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, f"{' '.join(argv)}: rc={rc}, stderr: {err[-2000:]}"
    assert "internal error" not in errors[0], errors[0]
    for p in outs:
        assert not p.exists(), f"{p} written by a refused command"
    return errors[0]


def _finite_numbers(obj, where: str = "") -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj), where
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite_numbers(v, f"{where}[{i}]")


# -- score ------------------------------------------------------------------------------------------------------


SCORE = st.fixed_dictionaries({
    "metric": st.sampled_from(["fisher", "variability", "fisher,variability"]),
    "head": st.sampled_from(["auto", "fresh", "probe", "warmup:2"]),
    "aggregate": st.sampled_from(["frobenius", "trace", "tensor_norm_sum", "label_specific"]),
    "label_check": st.sampled_from([None, 0.0, 0.5]),
    "groups": st.sampled_from([None, 0, 2, 3]),
    "until_stable": st.booleans(),
    "checkpoint": st.booleans(),
    "autocast": st.sampled_from(["none", "bf16"]),
    "pooling": st.sampled_from([None, "cls"]),
    "variant": st.sampled_from([None, "papyan"]),
    "data": st.sampled_from(["sst2", "custom"]),
    "max_tokens": st.sampled_from([None, 64]),
})


@st.composite
def score_combo(draw) -> dict:
    """A combination of SCORE; 6 in 10 made coherent (the flags a metric ignores left out), so that many run."""
    c = dict(draw(SCORE))
    if draw(st.integers(0, 9)) < 6:
        metrics = set(c["metric"].split(","))
        if "fisher" not in metrics:
            c.update(head="auto", aggregate="frobenius", label_check=None)  # the defaults
        if "variability" not in metrics:
            c.update(pooling=None, variant=None)
        if c["aggregate"] == "label_specific" and c["label_check"] == 0.0:
            c["label_check"] = None
        if c["until_stable"] and c["groups"] == 0:
            c["groups"] = None
    return c


def score_expect(c: dict) -> bool:
    """Whether fastsel must run this combination (every flag applies, none contradicts another)."""
    metrics = set(c["metric"].split(","))
    fisher_opts = c["head"] != "auto" or c["aggregate"] != "frobenius" or c["label_check"] not in (None, 0.2)
    if fisher_opts and "fisher" not in metrics:
        return False  # --head/--aggregate/--label-check would be ignored
    if (c["pooling"] or c["variant"]) and "variability" not in metrics:
        return False  # --pooling/--variant would be ignored
    if c["aggregate"] == "label_specific" and c["label_check"] == 0.0 and "fisher" in metrics:
        return False  # needs the label-dependence check
    if c["until_stable"] and c["groups"] == 0:
        return False  # --until-stable needs the ranking confidence
    return True


@_settings(25)
@given(c=score_combo())
@example(c={"metric": "fisher,variability", "head": "probe", "aggregate": "trace", "label_check": 0.5, "groups": 2,
            "until_stable": True, "checkpoint": True, "autocast": "bf16", "pooling": "cls", "variant": "papyan",
            "data": "custom", "max_tokens": 64})
@example(c={"metric": "variability", "head": "auto", "aggregate": "trace", "label_check": None, "groups": None,
            "until_stable": False, "checkpoint": False, "autocast": "none", "pooling": None, "variant": None,
            "data": "sst2", "max_tokens": None})
def test_score_flag_combinations(tmp_path_factory, tiny_dir, data_dir, c):
    base = tmp_path_factory.mktemp("combo-score")
    argv = ["score", "--model", tiny_dir, "--metric", c["metric"], "--max-length", "16", "--batch-size", "4",
            "--no-progress", "--out", str(base / "s.json")]
    if c["data"] == "custom":
        f = base / "d.jsonl"
        texts = ["a good film", "bad and dull", "the cast is fine", "slow", "a great story", "boring", "fresh and smart",
                 "thin plot"]
        f.write_text("".join(json.dumps({"text": f"{t} {i}", "y": ["pos", "neg"][i % 2]}) + "\n"
                             for i, t in enumerate(texts * 8)))
        argv += ["--task", "custom", "--data-file", str(f), "--text-fields", "text", "--label-field", "y"]
    else:
        argv += ["--task", "sst2", "--data-dir", str(data_dir)]
    argv += ["--num-examples", "24", "--balanced"] if not c["until_stable"] else ["--num-examples", "32", "--balanced",
                                                                                   "--until-stable", "--check-every", "8"]
    argv += ["--head", c["head"], "--aggregate", c["aggregate"], "--autocast", c["autocast"]]
    if c["head"] != "fresh" and "fisher" in c["metric"]:  # the examples a head is fitted on: a Fisher option
        argv += ["--probe-examples", "16"]
    for flag, key in (("--label-check", "label_check"), ("--confidence-groups", "groups"), ("--pooling", "pooling"),
                      ("--variant", "variant"), ("--max-tokens", "max_tokens")):
        if c[key] is not None:
            argv += [flag, str(c[key])]
    if c["checkpoint"]:
        argv += ["--checkpoint", str(base / "ck"), "--checkpoint-every", "8"]
    metrics = c["metric"].split(",")
    outs = [base / "s.json"] if len(metrics) == 1 else [base / f"s.{m}.json" for m in metrics]

    rc, out, err = _run(argv)
    OUTCOMES["score"].append(rc)
    expect = score_expect(c)
    if rc != 0:
        line = _refused(rc, err, outs, argv)
        assert not expect, f"a valid combination was refused: {' '.join(argv)}\n{line}"
        return
    assert expect, f"accepted, but a flag would be ignored or contradicts another: {' '.join(argv)}"
    assert "Traceback" not in err and not [l for l in err.splitlines() if l.startswith("error:")], err[-2000:]
    for path, metric in zip(outs, metrics):
        d = _strict(path.read_text())
        _finite_numbers(d, path.name)
        for key in ("metric", "model", "task", "split", "num_examples", "layers", "ranking", "config"):
            assert key in d, (key, path)
        assert d["metric"] == metric and sorted(d["ranking"]) == list(range(len(d["layers"])))
        assert all(isinstance(l["score"], (int, float)) and math.isfinite(l["score"]) for l in d["layers"])
        cfg = d["config"]
        assert cfg["metric"] in (metric, c["metric"]) and cfg["max_length"] == 16 and cfg["batch_size"] == 4
        opts = cfg["options"]
        assert opts["head"] == c["head"] and opts["aggregate"] == c["aggregate"]
        assert cfg["confidence_groups"] == (4 if c["groups"] is None else c["groups"])
        if c["label_check"] is not None:
            assert opts["label_check"] == c["label_check"]
        assert opts["pooling"] == (c["pooling"] or "mean") and opts["variant"] == (c["variant"] or "xie")
        pipe = d["pipeline"]
        assert pipe["autocast"] == c["autocast"] and pipe["max_tokens"] == c["max_tokens"]
        assert pipe["checkpoint_dir"] == (str(base / "ck") if c["checkpoint"] else None)
        assert ("until_stable" in d) == c["until_stable"]
        k = cfg["confidence_groups"]
        assert (d.get("ranking_confidence") or {}).get("groups", 0) == k or k == 0
        if metric == "fisher":
            # auto: a probe here (at least --probe-examples 16 training examples are never all scored)
            assert d["head"]["kind"] == ("probe" if c["head"] == "auto" else c["head"].split(":")[0])
            assert ("label_dependence" in d) == (c["label_check"] != 0.0)
        else:
            assert d["mode"] == f"{c['variant'] or 'xie'}/{c['pooling'] or 'mean'}"


# -- plan ---------------------------------------------------------------------------------------------------------


PLAN = st.fixed_dictionaries({
    "strategy": st.sampled_from(["full", "bitfit", "lora-i", "lora-ii", "spafit-0-1-i", "fisher-top-1", "fisher-bottom-2",
                                 "top-2", "lstar-down-1", "position-top-2", "middle-1", "layers-0-1-2", "random-2-s3"]),
    "tuner": st.sampled_from([None, "full", "lora", "adapter", "bitfit"]),
    "lora_r": st.sampled_from([None, 1, 4, 16, 17]),
    "lora_alpha": st.sampled_from([None, "2*r", "1.5"]),
    "lora_dropout": st.sampled_from([None, 0.1]),
    "adapter_size": st.sampled_from([None, 4, 16, 17]),
    "scores": st.sampled_from([None, "fisher", "variability", "four-blocks"]),
    "num_labels": st.sampled_from([None, 1, 3]),
    "peft": st.booleans(),
})
HIDDEN = 16  # tiny_dir's hidden size (tests/tiny_tokenizer.save_tiny_bert)


@st.composite
def plan_combo(draw) -> dict:
    """A combination of PLAN; 6 in 10 made coherent (only the flags the strategy and tuner use), so that many run."""
    from fastsel.plans.strategies import find_strategy

    c = dict(draw(PLAN))
    if draw(st.integers(0, 9)) < 6:
        strategy, _ = find_strategy(c["strategy"])
        if not strategy.takes_tuner:
            c["tuner"] = None
        tuner = c["tuner"] or "full"
        if not (tuner == "lora" or c["strategy"].startswith(("lora-", "spafit-"))):
            c.update(lora_r=None, lora_alpha=None, lora_dropout=None)
        if tuner != "adapter":
            c["adapter_size"] = None
        c["scores"] = {None: None, "scores": c["scores"] or "fisher"}.get(strategy.needs, strategy.needs)
    return c


def plan_expect(c: dict) -> bool:
    from fastsel.plans.strategies import find_strategy

    strategy, _ = find_strategy(c["strategy"])
    own_tuning = not strategy.takes_tuner
    if c["tuner"] not in (None, "full") and own_tuning:
        return False  # --tuner would be ignored
    tuner = c["tuner"] or "full"
    lora = tuner == "lora" or c["strategy"].startswith(("lora-", "spafit-"))
    adapter = tuner == "adapter" and not own_tuning
    if (c["lora_r"] not in (None, 8) or c["lora_alpha"] not in (None, "2*r") or c["lora_dropout"]) and not lora:
        return False
    if c["adapter_size"] is not None and not adapter:
        return False
    if adapter and (c["adapter_size"] or 256) > HIDDEN or lora and (c["lora_r"] or 8) > HIDDEN:
        return False
    if c["scores"] is not None and strategy.needs is None:
        return False  # --scores would be ignored
    if strategy.needs is not None:
        if c["scores"] in (None, "four-blocks"):
            return False
        if strategy.needs in ("fisher", "variability") and c["scores"] != strategy.needs:
            return False
    return True


@pytest.fixture(scope="module")
def score_files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("combo-scores")
    files = {}
    for name, metric, layers in (("fisher", "fisher", 3), ("variability", "variability", 3), ("four-blocks", "fisher", 4)):
        rows = [{"layer": l, "name": f"bert.encoder.layer.{l}", "score": float((l * 7) % 5 + 1)} for l in range(layers)]
        d = {"metric": metric, "model": "tiny", "task": "sst2", "layers": rows}
        if metric == "variability":
            d.update(higher_is_better=False, l_star=1)
        (tmp / f"{name}.json").write_text(json.dumps(d))
        files[name] = str(tmp / f"{name}.json")
    return files


@_settings(60)
@given(c=plan_combo())
@example(c={"strategy": "fisher-top-1", "tuner": "lora", "lora_r": 4, "lora_alpha": "1.5", "lora_dropout": 0.1,
            "adapter_size": None, "scores": "fisher", "num_labels": 3, "peft": True})
@example(c={"strategy": "position-top-2", "tuner": "adapter", "lora_r": None, "lora_alpha": None, "lora_dropout": None,
            "adapter_size": 4, "scores": None, "num_labels": 1, "peft": False})
def test_plan_flag_combinations(tmp_path_factory, tiny_dir, score_files, c):
    base = tmp_path_factory.mktemp("combo-plan")
    out = base / "plan.json"
    argv = ["plan", "--model", tiny_dir, "--strategy", c["strategy"], "--out", str(out)]
    for flag, key in (("--tuner", "tuner"), ("--lora-r", "lora_r"), ("--lora-alpha", "lora_alpha"),
                      ("--lora-dropout", "lora_dropout"), ("--adapter-size", "adapter_size"), ("--num-labels", "num_labels")):
        if c[key] is not None:
            argv += [flag, str(c[key])]
    if c["scores"]:
        argv += ["--scores", score_files[c["scores"]]]
    if c["peft"]:
        argv.append("--peft")
    rc, stdout, err = _run(argv)
    OUTCOMES["plan"].append(rc)
    expect = plan_expect(c)
    if rc != 0:
        line = _refused(rc, err, [out], argv)
        assert not expect, f"a valid combination was refused: {' '.join(argv)}\n{line}"
        return
    assert expect, f"accepted, but a flag would be ignored or contradicts another: {' '.join(argv)}"
    d = _strict(out.read_text())
    _finite_numbers(d, "plan.json")
    tuner = c["tuner"] or "full"
    assert d["strategy"] == c["strategy"] + ("" if tuner == "full" else f"+{tuner}") and d["num_layers"] == 3 and len(d["blocks"]) == 3
    assert isinstance(d["trainable_params"], int) and 0 < d["trainable_params"] <= d["params_by_group"]["all_params"]
    labels = c["num_labels"] or 2
    assert d["params_by_group"]["head"] == HIDDEN * labels + labels
    lora_blocks = [b["lora"] for b in d["blocks"] if b.get("lora")]
    for spec in lora_blocks:
        r = c["lora_r"] or 8
        alpha = 2 * r if c["lora_alpha"] in (None, "2*r") else float(c["lora_alpha"])
        assert spec["r"] == r and spec["alpha"] == alpha and spec.get("dropout", 0.0) == (c["lora_dropout"] or 0.0), spec
    if (c["tuner"] == "adapter") and c["adapter_size"]:
        assert max(b.get("adapter_size") or 0 for b in d["blocks"]) == c["adapter_size"]
    assert ("PEFT LoraConfig" in stdout) == (c["peft"] and bool(lora_blocks))


def test_zz_both_outcomes_seen(capsys):
    """Last in the module: the draws above reached both the happy path and refusals (not all one or the other)."""
    for command, rcs in OUTCOMES.items():
        if rcs:  # (empty: that test was deselected)
            assert 0 in rcs and 2 in rcs, (command, sorted(set(rcs)))
    with capsys.disabled():
        print("\nflag combinations: " + "; ".join(f"{c}: {len(r)} drawn, {r.count(0)} ran, {r.count(2)} refused"
                                                  for c, r in OUTCOMES.items()))
