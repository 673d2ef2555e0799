"""The deliberate bugs of the hardening issue's mutation pass, each planted in a scratch copy of the package and run
against the tests that must catch it (docs/testing.md).

Each bug once passed the whole suite. A bug is *caught* when its tests fail; the exit status is the number of bugs
that survive.

    python scripts/deliberate_bugs.py            # all bugs
    python scripts/deliberate_bugs.py --only s_noise_initial_draw
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name: (file, the correct text, the bug, the tests that must fail, what the bug does)
BUGS = {
    "v_prediction_correction_sign": (
        "diffusers_stf/preconditioning/base.py",
        "return denoised_change / float(self.c_out(as_sigma(sigma).double()))",
        "return denoised_change / abs(float(self.c_out(as_sigma(sigma).double())))",
        ["tests/test_guidance_schedulers.py", "-k", "edm_euler and v_prediction"],
        "a guidance correction turned into the network output without c_out's sign (v-prediction flips it)"),
    "s_noise_initial_draw": (
        "diffusers_stf/schedulers/scheduling_edm_heun.py",
        "return math.sqrt(s0**2 + self.config.s_noise**2 * max(s0_hat**2 - s0**2, 0.0))",
        "return math.sqrt(s0**2 + max(s0_hat**2 - s0**2, 0.0))",
        ["tests/test_edm_schedulers.py"],
        "init_noise_sigma without its S_noise factor"),
    "sdedit_without_noise": (
        "diffusers_stf/pipelines/pipeline_discriminator_guided.py",
        "sample = self.scheduler.add_noise(source, noise, self.scheduler.timesteps[begin : begin + 1])",
        "sample = source.clone()",
        ["tests/test_discriminator_guidance.py", "-k", "sdedit"],
        "SDEdit starting from the clean image"),
    "sigma_hat_not_rounded": (
        "diffusers_stf/schedulers/scheduling_edm_heun.py",
        "self.sigmas_hat = churn_sigma(sigmas, gammas, p.round_sigma)",
        "self.sigmas_hat = churn_sigma(sigmas, gammas)",
        ["tests/test_edm_schedulers.py", "-k", "rounded"],
        "the churned σ̂ not rounded to the network's discrete σ table"),
    "marginal_vp_corrector_step": (
        "diffusers_stf/schedulers/scheduling_predictor_corrector.py",
        "        return beta, 1 - beta\n",
        "        return beta, torch.ones_like(t)\n",
        ["tests/test_score_based.py", "-k", "marginal or corrector"],
        "the marginal VP corrector's step size with α = 1 instead of 1 − β_i"),
}


def plant(scratch: pathlib.Path, path: str, correct: str, bug: str) -> None:
    file = scratch / path
    text = file.read_text()
    if text.count(correct) != 1:
        raise SystemExit(f"{path}: the correct text of the bug is not there exactly once; update BUGS")
    file.write_text(text.replace(correct, bug))


def run(name: str, timeout: float) -> bool:
    path, correct, bug, tests, _ = BUGS[name]
    with tempfile.TemporaryDirectory(prefix=f"bug_{name}_") as tmp:
        scratch = pathlib.Path(tmp)
        shutil.copytree(ROOT / "diffusers_stf", scratch / "diffusers_stf",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", scratch / "pyproject.toml")
        plant(scratch, path, correct, bug)
        env = dict(os.environ, PYTHONPATH=str(scratch), OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode == 5:
        raise SystemExit(f"{name}: the selection {tests} ran no test")
    return result.returncode != 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--only", action="append", choices=tuple(BUGS), help="one bug (repeatable)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per bug")
    args = parser.parse_args(argv)
    survivors = 0
    for name in args.only or BUGS:
        start = time.perf_counter()
        caught = run(name, args.timeout)
        survivors += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} {name:30s} {time.perf_counter() - start:6.1f} s  "
              f"({BUGS[name][4]})", flush=True)
    print(f"{len(args.only or BUGS) - survivors} of {len(args.only or BUGS)} caught")
    return survivors


if __name__ == "__main__":
    sys.exit(main())
