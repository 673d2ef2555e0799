"""benchmarks/bench_evidence.py: the statistics against their textbook formulas, the table, and the --quick smoke test
(every comparison end to end through the example scripts, then a resume that skips what finished)."""

import importlib.util
import json
import math
import os
import sys

import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_evidence", os.path.join(ROOT, "benchmarks", "bench_evidence.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_evidence"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_summary_is_welch_t_test_with_satterthwaite_degrees_of_freedom(bench):
    baseline, method = [14.62, 19.32, 16.1], [11.41, 10.95, 11.8]
    s = bench.summarize(baseline, method)
    m1, m2 = sum(method) / 3, sum(baseline) / 3
    v1 = sum((x - m1) ** 2 for x in method) / 2
    v2 = sum((x - m2) ** 2 for x in baseline) / 2
    t = (m1 - m2) / math.sqrt(v1 / 3 + v2 / 3)
    df = (v1 / 3 + v2 / 3) ** 2 / ((v1 / 3) ** 2 / 2 + (v2 / 3) ** 2 / 2)  # Welch–Satterthwaite
    assert s["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert (s["method_mean"], s["baseline_mean"]) == (pytest.approx(m1), pytest.approx(m2))
    assert (s["method_sd"], s["baseline_sd"]) == (pytest.approx(math.sqrt(v1)), pytest.approx(math.sqrt(v2)))
    assert s["ratio"] == pytest.approx(m1 / m2)
    one = bench.summarize([3.0], [2.0])  # one seed: no spread, no test
    assert one["baseline_sd"] is None and one["p_value"] is None and one["ratio"] == pytest.approx(2 / 3)


def test_table_and_verdict_state_each_arm_the_ratio_and_p(bench):
    evidence = {"comparisons": [
        {"name": "stf_vs_edm", "baseline": [10.0, 12.0, 14.0], "method": [5.0, 6.0, 7.0], "seeds": [0, 1, 2],
         "baseline_label": "EDM", "method_label": "STF", "plot": "benchmarks/results/evidence_stf_vs_edm.png"},
        {"name": "dg_vs_unguided", "baseline": [20.0, 21.0, 22.0], "method": [20.5, 21.0, 21.5], "seeds": [0, 1, 2]},
    ]}
    table = bench.render_table(evidence).splitlines()
    assert len(table) == 4
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:6] == ["`stf_vs_edm`", "EDM", "STF", "12.00 ± 2.00", "6.00 ± 1.00", "0.50"]
    p = stats.ttest_ind([5.0, 6.0, 7.0], [10.0, 12.0, 14.0], equal_var=False).pvalue
    assert cells[6] == f"{p:.2g}" and cells[7] == "3" and "evidence_stf_vs_edm.png" in cells[8]
    assert "helps" in bench.verdict(evidence["comparisons"][0])
    assert "no significant difference" in bench.verdict(evidence["comparisons"][1])
    lower = {"name": "x", "baseline": [20.0, 23.0, 26.0], "method": [19.0, 22.0, 25.0], "seeds": [0, 1, 2]}
    higher = {**lower, "method": [21.0, 24.0, 27.0]}
    assert "(4 % lower, Welch p" in bench.verdict(lower) and "(4 % higher, Welch p" in bench.verdict(higher)


def test_quick_smoke_run_writes_the_evidence_and_resumes_skipping_finished_work(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSERS_STF_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    argv = ["--quick", "--work_dir", str(work), "--quiet"]
    evidence = bench.main(argv)
    with open(work / "results" / "evidence.json") as f:
        assert json.load(f) == json.loads(json.dumps(evidence))
    names = [c["name"] for c in evidence["comparisons"]]
    assert names == ["stf_vs_edm", "sa2_vs_ddpm_ddim10", "dg_vs_unguided", "autoguidance_vs_unguided",
                     "cfg_vs_conditional", "posthoc_ema", "edm2_vs_unet2d"]
    for c in evidence["comparisons"]:
        assert c["metric"] == "fd_train" and c["seeds"] == [0] and isinstance(c["setup"], str)
        assert len(c["baseline"]) == len(c["method"]) == 1 and all(math.isfinite(v) for v in c["baseline"] + c["method"])
        assert c["summary"]["ratio"] == pytest.approx(c["method"][0] / c["baseline"][0])
        assert os.path.isfile(os.path.join(bench.ROOT, c["plot"]) if not os.path.isabs(c["plot"]) else c["plot"])
    sa = evidence["comparisons"][1]
    assert set(sa["by_steps"]) == {"10", "20"} and sa["by_steps"]["10"]["baseline"] == sa["baseline"]
    dg = evidence["comparisons"][2]
    # the unguided arm samples the EDM arm's score model with the same seeds: the same FD
    assert dg["baseline"] == evidence["comparisons"][0]["baseline"]
    sigmas = {f"{float(s):g}" for s in bench.Protocol.quick().validation_sigmas.split(",")}
    assert set(dg["discriminator"][0]["heldout_accuracy_by_sigma"]) == sigmas
    autog, cfg = evidence["comparisons"][3], evidence["comparisons"][4]
    # the unguided arm of autoguidance is the EDM arm; w is chosen on the selection seed, never a reported one
    assert autog["baseline"] == evidence["comparisons"][0]["baseline"]
    assert autog["selection"]["seed"] == 1 and set(autog["selection"]["fd_by_candidate"]) == {"w=1.5", "w=2"}
    assert len(autog["with_interval"]["method"]) == 1
    assert cfg["selection"]["seed"] == 1 and len(cfg["equal_evaluations"]["baseline"]) == 1
    assert all(0 <= a <= 1 for arm in cfg["label_accuracy"].values() for a in arm)
    posthoc, edm2 = evidence["comparisons"][5], evidence["comparisons"][6]
    # σ_rel chosen on the selection seed's curve, reported on seed 0's; the baseline is each run's saved EMA
    assert posthoc["selection"]["seed"] == 1 and set(posthoc["fd_by_std"]) == {"0", "1"}
    curve = posthoc["fd_by_std"]["1"]
    assert set(curve) == {"0.04", "0.1"} and posthoc["selection"]["chosen"] == f"σ_rel={min(curve, key=curve.get)}"
    assert posthoc["method"] == [posthoc["fd_by_std"]["0"][min(curve, key=curve.get)]]
    assert posthoc["baseline"] == [posthoc["training_ema_fd"]["0"]]
    run0 = work / "models" / "phema-edm-4-seed0"
    assert sorted(os.listdir(run0 / "phema_snapshots")) == [f"phema-00000000{s}-{std}.safetensors" for s in (2, 4)
                                                             for std in ("0.050", "0.100")]
    assert json.loads((run0 / "posthoc_ema" / "posthoc-000000004-0.040" / "posthoc_ema.json").read_text())["std"] \
        == 0.04
    assert os.path.isfile(os.path.join(bench.ROOT, posthoc["curves_plot"]))
    counts = edm2["parameters"]
    assert abs(counts["edm2"] / counts["unet2d"] - 1) < 0.05 and f"{counts['edm2']:,}" in edm2["setup"]
    assert edm2["baseline"] == evidence["comparisons"][0]["baseline"]  # the EDM arm, the same seeds
    unet = json.loads((work / "models" / "edm2-edm-4-seed0" / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "EDM2UNet"
    assert evidence["cached"] is False and evidence["commit"]
    investigation = evidence["dg_investigation"]
    assert [v["variant"] for v in investigation["variants"]] == ["default", "narrow_window"]
    assert all(0 <= a <= 1 for v in investigation["variants"] for a in v["heldout_accuracy_by_sigma"].values())
    capsys.readouterr()

    # A run killed during the SA-2 training and before the last evaluation: only those are redone.
    sa2 = work / "models" / "sa2-4-seed0"
    os.remove(sa2 / "model_index.json")
    os.remove(work / "models" / "disc-narrow_window-on-edm-4-seed0" / "bench_eval_heun3_w2_narrow.json")
    again = bench.main(argv)
    log = capsys.readouterr().out
    trained = [line.split(":")[0] for line in log.splitlines() if line.startswith("train ")]
    assert trained == ["train sa2-4-seed0"]
    evaluated = [line.split("[")[1].split("]")[0] for line in log.splitlines() if line.startswith("  ") and "[" in line]
    assert sorted(evaluated) == ["ddim10", "ddim20", "heun3_w2_narrow"]
    assert [c["baseline"] for c in again["comparisons"]] == [c["baseline"] for c in evidence["comparisons"]]
    assert again["cached"] is True
    shown = bench.main(["--table", "--results_dir", str(work / "results")])
    printed = capsys.readouterr().out
    assert bench.render_table(shown) in printed and shown["comparisons"][0]["verdict"] in printed


def test_the_full_protocols_edm2_network_has_the_unet2d_arms_parameter_count(bench):
    """edm2_vs_unet2d compares at equal size: the full protocol's EDM2 flags against train_stf.py's default
    UNet2DModel on the 8x8 digits, both built from the script's own parser."""
    spec = importlib.util.spec_from_file_location("train_stf_bench", os.path.join(ROOT, "examples", "train_stf.py"))
    train_stf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_stf)
    from diffusers_stf.training import parse_training_args
    from diffusers_stf.training.network import make_network

    protocol = bench.Protocol.full()
    counts = {}
    for name, argv in (("unet2d", protocol.model_args), ("edm2", ["--architecture", "edm2", *protocol.edm2_args])):
        _, config = parse_training_args(train_stf.build_parser(), argv)
        model = make_network(config.network, config.unet, 8, 1)
        counts[name] = sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "EDM2UNet"
    assert abs(counts["edm2"] / counts["unet2d"] - 1) < 0.01, counts


def test_combine_orders_the_parts_copies_their_plots_and_refuses_parts_of_another_commit(bench, tmp_path):
    """Two parallel --only parts become one json: the table's order, the longest part's wall time, the plots beside
    the combined json; parts of another commit are refused."""
    def part(name, comparisons, seconds, commit="abc", cached=False, investigation=False):
        folder = tmp_path / name
        folder.mkdir()
        records = []
        for comparison in comparisons:
            plot = folder / f"evidence_{comparison}.png"
            plot.write_bytes(comparison.encode())
            records.append({"name": comparison, "plot": os.path.relpath(plot, ROOT), "baseline": [1.0, 1.2],
                            "method": [0.5, 0.7], "seeds": [0, 1]})
        evidence = {"comparisons": records, "protocol": {"seeds": [0]}, "commit": commit, "quick": False,
                    "seconds": seconds, "cached": cached, "real_heldout_fd_train": 2.6}
        if investigation:
            evidence["dg_investigation"] = {"weights": [1.0]}
        (folder / "evidence.json").write_text(json.dumps(evidence))
        return str(folder)

    a = part("a", ["dg_vs_unguided", "stf_vs_edm"], 100.0, investigation=True)
    b = part("b", ["posthoc_ema", "sa2_vs_ddpm_ddim10"], 250.0)
    results = tmp_path / "results"
    evidence = bench.main(["--combine", a, b, "--results_dir", str(results)])
    names = [c["name"] for c in evidence["comparisons"]]
    assert names == [n for n in bench.COMPARISONS if n in {"dg_vs_unguided", "stf_vs_edm", "posthoc_ema",
                                                             "sa2_vs_ddpm_ddim10"}]
    assert names[:2] == ["stf_vs_edm", "sa2_vs_ddpm_ddim10"]
    assert evidence["seconds"] == 250.0 and evidence["cached"] is False and evidence["parallel_parts"] == 2
    assert evidence["dg_investigation"] == {"weights": [1.0]}
    for comparison in evidence["comparisons"]:
        copied = os.path.join(ROOT, comparison["plot"])
        assert os.path.dirname(os.path.realpath(copied)) == os.path.realpath(results)
        assert open(copied, "rb").read() == comparison["name"].encode()
    assert json.loads((results / "evidence.json").read_text())["comparisons"] == evidence["comparisons"]
    other = part("c", ["cfg_vs_conditional"], 10.0, commit="def")
    with pytest.raises(ValueError, match="commit"):
        bench.main(["--combine", a, other, "--results_dir", str(tmp_path / "r2")])
