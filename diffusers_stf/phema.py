"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Section 3.1–3.2, Eq. 3, Algorithms 2 and 3, Appendix C).

**Power-function averaging profile.** An EMA of the weights θ(τ) at training time t is ∫ p_t(τ) θ(τ) dτ with

    p_t(τ) = (γ + 1) τ^γ / t^(γ+1)    on 0 < τ < t,

a profile that scales with the length of training. Its width relative to t is σ_rel = √((γ+1)/((γ+2)²(γ+3)))
(:func:`exp_to_std`, Eq. 123; :func:`std_to_exp` inverts it, Eq. 126). σ_rel decreases from 1/√12 ≈ 0.2887 at γ = 0
(the uniform average of all weights so far) to 0 as γ → ∞, so a profile is valid for 0 < σ_rel < 1/√12, i.e. γ > 0
(the paper quotes (0, 0.289)). EDM2 tracks σ_rel = 0.05 and 0.10 (γ = 16.97 and 6.94).

**Tracking** (Eq. 3 and Eq. 127, Algorithm 2). After the optimizer step that brings the training time from t − Δt to
t (t in images or steps, Δt the batch or 1),

    θ̂ ← β θ̂ + (1 − β) θ,     β = (1 − Δt/t)^(γ+1)

which is exactly ∫ p_t(τ) θ(τ) dτ for weights that are constant within each step: the first update copies θ (β = 0).
:class:`PowerFunctionEMA` keeps one average per σ_rel.

**Post-hoc reconstruction** (Algorithm 3). Snapshots θ̂_i of the tracked averages at times t_i (profiles p_i) are
combined as Σ_i x_i θ̂_i to approximate any other profile q (any σ_rel, at any snapshot time): x is the least-squares
fit of the profiles, A x = b with A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, q⟩ in L²(0, ∞) (closed form:
:func:`power_function_inner_product`, Eq. 151), then rescaled to sum to 1 so that constant weights are reproduced
exactly (:func:`solve_posthoc_coefficients`).

**Snapshot files.** :func:`save_snapshots` writes one safetensors file per tracked σ_rel,
``phema-<step:09d>-<std:.3f>.safetensors``, holding the averaged state dict (parameters averaged, buffers copied
from the model; floating-point tensors in float16 by default, as EDM2's snapshots) and the metadata

    format   "diffusers_stf.phema.snapshot"
    std      σ_rel of the tracked average (repr of the float)
    time     the training time t of the average (repr; the unit of PowerFunctionEMA.update, e.g. images)
    step     the optimizer step (integer)
    buffers  JSON list of the state-dict keys that are buffers (copied, not averaged, in a reconstruction)

``python -m diffusers_stf.phema OUTPUT_DIR --std 0.02,0.05,0.10,0.15 [--at_step N] [--plot]`` reads the snapshots
in ``OUTPUT_DIR/phema_snapshots`` (or in OUTPUT_DIR itself), solves for each σ_rel at the step (default: the last
snapshot) and writes to ``OUTPUT_DIR/posthoc_ema`` one pipeline folder per σ_rel when OUTPUT_DIR holds a training
run's pipeline, else ``posthoc-<step:09d>-<std:.3f>.safetensors`` state dicts (the command line is
:mod:`diffusers_stf.training.posthoc`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

MAX_STD = 1 / math.sqrt(12)  # σ_rel at γ = 0; valid stds lie in (0, MAX_STD)
SNAPSHOT_FORMAT = "diffusers_stf.phema.snapshot"
SNAPSHOT_DIR = "phema_snapshots"
RECONSTRUCTION_DIR = "posthoc_ema"
SNAPSHOT_RE = re.compile(r"^phema-(\d+)-(\d+\.\d+)\.safetensors$")


# ----------------------------------------------------------------------------------------------------------------------
# The profile: γ ↔ σ_rel, β, inner products, Algorithm 3


def check_stds(stds, name: str = "std") -> np.ndarray:
    """``stds`` as a float64 array, or a ValueError naming ``name`` unless every value lies in (0, 1/√12)."""
    values = np.asarray(stds, dtype=np.float64)
    if values.size == 0 or not np.all((values > 0) & (values < MAX_STD)):
        raise ValueError(f"{name} must lie in (0, 1/sqrt(12) = {MAX_STD:.5f}) (the power-function profile needs "
                         f"exponent gamma > 0; the paper rounds the bound to 0.289), got {stds}")
    return values


def exp_to_std(exp):
    """σ_rel = √((γ+1)/((γ+2)²(γ+3))) of the power-function profile with exponent γ > 0 (Eq. 123)."""
    exp = np.asarray(exp, dtype=np.float64)
    if exp.size == 0 or not np.all(exp > 0):
        raise ValueError(f"exp must be > 0, got {exp}")
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))[()]


def std_to_exp(std):
    """The exponent γ > 0 of the profile with relative standard deviation σ_rel (Eq. 126, Algorithm 2).

    γ is the largest root of (γ+2)²(γ+3) − (γ+1)/σ_rel² = 0, found by Newton's method from γ = 1/σ_rel, where the
    cubic is positive and convex, so the iterates decrease monotonically to the root.
    """
    std = check_stds(std)
    s = std**-2
    exp = 1 / std
    for _ in range(100):
        h = (exp + 2) ** 2 * (exp + 3) - s * (exp + 1)
        slope = 2 * (exp + 2) * (exp + 3) + (exp + 2) ** 2 - s
        step = h / slope
        exp = exp - step
        if np.all(np.abs(step) <= 1e-15 * np.abs(exp)):
            break
    return exp[()]


def power_function_beta(std: float, t_next: float, t_delta: float = 1.0) -> float:
    """β = (1 − Δt/t)^(γ+1) of the update that brings the training time to ``t_next`` (Eq. 3, Eq. 127).

    Args:
        std: σ_rel of the tracked profile.
        t_next: the training time after the update (images or steps), > 0.
        t_delta: the time the update covers (the batch in images, or 1 step), 0 < t_delta ≤ t_next.
    """
    if not 0 < t_delta <= t_next:
        raise ValueError(f"need 0 < t_delta <= t_next, got t_delta={t_delta}, t_next={t_next}")
    return float((1 - t_delta / t_next) ** (std_to_exp(std) + 1))


def power_function_inner_product(t_a, std_a, t_b, std_b) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of the profiles ending at t_a and t_b (Eq. 151), broadcast:

        (γ_a+1)(γ_b+1)/(γ_a+γ_b+1) · min(t_a, t_b)^(γ_a+γ_b+1) / (t_a^(γ_a+1) t_b^(γ_b+1))

    evaluated in log space."""
    g_a, g_b = std_to_exp(std_a), std_to_exp(std_b)
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    log = (np.log((g_a + 1) * (g_b + 1) / (g_a + g_b + 1)) + (g_a + g_b + 1) * np.log(np.minimum(t_a, t_b))
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_posthoc_coefficients(in_times, in_stds, out_times, out_stds) -> np.ndarray:
    """Coefficients X (len(in), len(out)) such that Σ_i X[i, j]·θ̂_i approximates the average with σ_rel
    ``out_stds[j]`` at time ``out_times[j]``, from snapshots θ̂_i of averages with σ_rel ``in_stds[i]`` taken at
    ``in_times[i]`` (Algorithm 3: least squares in L², columns rescaled to sum to 1).

    Times and stds are broadcast against each other (e.g. one ``out_times`` for several ``out_stds``). Times are in
    the unit of :meth:`PowerFunctionEMA.update` and must be > 0; no (time, std) pair may repeat among the inputs.
    """
    in_times, in_stds = (a.reshape(-1) for a in np.broadcast_arrays(np.asarray(in_times, np.float64),
                                                                    check_stds(in_stds, "in_stds")))
    out_times, out_stds = (a.reshape(-1) for a in np.broadcast_arrays(np.asarray(out_times, np.float64),
                                                                      check_stds(out_stds, "out_stds")))
    for name, times in (("in_times", in_times), ("out_times", out_times)):
        if not np.all(np.isfinite(times) & (times > 0)):
            raise ValueError(f"{name} must be finite and > 0, got {times}")
    if len(set(zip(in_times.tolist(), in_stds.tolist()))) != len(in_times):
        raise ValueError("the input snapshots repeat a (time, std) pair; each must be given once")
    gram = power_function_inner_product(in_times[:, None], in_stds[:, None], in_times[None, :], in_stds[None, :])
    rhs = power_function_inner_product(in_times[:, None], in_stds[:, None], out_times[None, :], out_stds[None, :])
    coefficients = np.linalg.solve(gram, rhs)
    return coefficients / coefficients.sum(axis=0, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------------
# Tracking during training


class PowerFunctionEMA:
    """Power-function EMAs of a model's parameters, one per σ_rel (Eq. 3, Algorithm 2).

    Args:
        model_or_parameters: the trained ``nn.Module`` (its parameters are averaged and its buffers copied into
            :meth:`snapshot`), or an iterable of tensors (snapshots are keyed "0", "1", …).
        stds: the tracked σ_rel, each in (0, 1/√12) (EDM2: 0.05 and 0.10).
    """

    def __init__(self, model_or_parameters: Union[nn.Module, Iterable[torch.Tensor]],
                 stds: Sequence[float] = (0.05, 0.10)):
        values = check_stds(list(stds), "stds")
        names = [f"{s:.3f}" for s in values]
        if len(set(names)) != len(names):
            raise ValueError(f"stds must differ in their first three decimals (snapshot names), got {list(stds)}")
        if isinstance(model_or_parameters, nn.Module):
            self.module = model_or_parameters
            named = list(model_or_parameters.named_parameters())
        else:
            self.module = None
            named = [(str(i), p) for i, p in enumerate(model_or_parameters)]
        if not named:
            raise ValueError("model_or_parameters holds no parameters to average")
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.stds = tuple(float(s) for s in values)
        self.exps = tuple(float(e) for e in std_to_exp(values))
        self.averages = [[p.detach().clone() for p in self.params] for _ in self.stds]

    @torch.no_grad()
    def update(self, t_next: float, t_delta: float = 1.0) -> List[float]:
        """Blend the current parameters in after the optimizer step that brought the training time to ``t_next``
        (e.g. the images seen after the step, with ``t_delta`` the images in it; or the step count, with 1).
        Returns the β of each σ_rel."""
        if not 0 < t_delta <= t_next:
            raise ValueError(f"need 0 < t_delta <= t_next, got t_delta={t_delta}, t_next={t_next}")
        betas = [(1 - t_delta / t_next) ** (exp + 1) for exp in self.exps]
        for beta, average in zip(betas, self.averages):
            for a, p in zip(average, self.params):
                a.lerp_(p.detach().to(a.dtype), 1 - beta)
        return betas

    def to(self, *args, **kwargs) -> "PowerFunctionEMA":
        self.averages = [[a.to(*args, **kwargs) for a in average] for average in self.averages]
        return self

    def _module_state(self):
        """The module's state dict (tensors as they are) and, per key, the index of the tracked parameter it is
        (tied parameters share one), or None for a buffer."""
        state = self.module.state_dict(keep_vars=True)
        index = {id(p): i for i, p in enumerate(self.params)}
        return state, {key: index.get(id(value)) for key, value in state.items()}

    def buffer_names(self) -> List[str]:
        """State-dict keys of the model that are not averaged parameters (copied into snapshots)."""
        if self.module is None:
            return []
        return [key for key, i in self._module_state()[1].items() if i is None]

    @torch.no_grad()
    def snapshot(self) -> Dict[float, Dict[str, torch.Tensor]]:
        """{σ_rel: state dict}: for a module, its state dict with the averaged parameters (loadable with
        ``model.load_state_dict``); for plain tensors, {"0": …, "1": …}. Tensors are copies."""
        if self.module is None:
            return {std: {n: a.clone() for n, a in zip(self.names, average)}
                    for std, average in zip(self.stds, self.averages)}
        state, index = self._module_state()
        return {std: {key: (value if index[key] is None else average[index[key]]).detach().clone()
                      for key, value in state.items()}
                for std, average in zip(self.stds, self.averages)}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """A flat str → tensor dict (safetensors-ready) for an exact resume: ``stds`` and ``ema<i>.<name>``."""
        state = {"stds": torch.tensor(self.stds, dtype=torch.float64)}
        for i, average in enumerate(self.averages):
            state.update({f"ema{i}.{name}": a for name, a in zip(self.names, average)})
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        stds = state_dict.get("stds")
        stds = None if stds is None else tuple(torch.as_tensor(stds, dtype=torch.float64).tolist())
        if stds != self.stds:
            raise ValueError(f"the saved power-function EMA tracks stds {stds}, this one {self.stds}")
        expected = {f"ema{i}.{name}" for i in range(len(self.stds)) for name in self.names} | {"stds"}
        if set(state_dict) != expected:
            missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise ValueError(f"power-function EMA state does not match the model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for i, average in enumerate(self.averages):
            for name, a in zip(self.names, average):
                a.copy_(state_dict[f"ema{i}.{name}"])


# ----------------------------------------------------------------------------------------------------------------------
# Snapshot files


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its path, optimizer step, training time t and σ_rel."""

    path: str
    step: int
    time: float
    std: float


def snapshot_filename(step: int, std: float, prefix: str = "phema") -> str:
    return f"{prefix}-{int(step):09d}-{std:.3f}.safetensors"


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)  # a killed save never leaves a half-written snapshot under the final name


def save_snapshots(folder: str, ema: PowerFunctionEMA, step: int, time: float,
                   dtype: Optional[torch.dtype] = torch.float16) -> List[str]:
    """Write ``ema``'s averages as ``folder/phema-<step>-<std>.safetensors`` (format: module docstring), floating
    tensors cast to ``dtype`` (None: as they are). Returns the paths."""
    os.makedirs(folder, exist_ok=True)
    buffers = json.dumps(ema.buffer_names())
    paths = []
    for std, state in ema.snapshot().items():
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        path = os.path.join(folder, snapshot_filename(step, std))
        _write_safetensors(state, path, {"format": SNAPSHOT_FORMAT, "std": repr(std), "time": repr(float(time)),
                                         "step": str(int(step)), "buffers": buffers})
        paths.append(path)
    return paths


def list_snapshots(folder: str) -> List[Snapshot]:
    """The snapshots in ``folder``, sorted by (step, std); a ValueError when there are none."""
    if not os.path.isdir(folder):
        raise ValueError(f"snapshot folder {folder!r} does not exist")
    found = []
    for name in sorted(os.listdir(folder)):
        if not SNAPSHOT_RE.match(name):
            continue
        path = os.path.join(folder, name)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a power-function EMA snapshot (metadata format {meta.get('format')!r})")
        found.append(Snapshot(path, int(meta["step"]), float(meta["time"]), float(meta["std"])))
    if not found:
        raise ValueError(f"no power-function EMA snapshots (phema-<step>-<std>.safetensors) in {folder!r}; train "
                         "with --ema_stds and --ema_snapshot_steps to write them")
    return sorted(found, key=lambda s: (s.step, s.std))


def select_snapshots(snapshots: Sequence[Snapshot], at_step: Optional[int] = None):
    """(the snapshots up to ``at_step``, the step, its training time); ``at_step`` defaults to the last snapshot and
    must be the step of one."""
    steps = sorted({s.step for s in snapshots})
    at_step = steps[-1] if at_step is None else int(at_step)
    if at_step < steps[0]:
        raise ValueError(f"at_step {at_step} is before the first snapshot (step {steps[0]})")
    if at_step not in steps:
        raise ValueError(f"at_step {at_step} is not a snapshot step; the snapshots are at steps {steps}")
    times = {s.time for s in snapshots if s.step == at_step}
    if len(times) != 1:
        raise ValueError(f"the snapshots of step {at_step} disagree on the training time: {sorted(times)}")
    return [s for s in snapshots if s.step <= at_step], at_step, times.pop()


@torch.no_grad()
def combine_state_dicts(state_dicts: Iterable[Mapping[str, torch.Tensor]], coefficients, buffers: Sequence[str] = (),
                        dtype: torch.dtype = torch.float32) -> List[Dict[str, torch.Tensor]]:
    """Σ_i coefficients[i, j]·state_dicts[i] for each column j, accumulated in ``dtype``, one input at a time (so an
    iterable that loads each state dict lazily keeps one in memory). ``buffers`` and non-floating tensors are taken
    from the last input."""
    coefficients, buffers = np.asarray(coefficients, dtype=np.float64), set(buffers)
    outs: List[Dict[str, torch.Tensor]] = [{} for _ in range(coefficients.shape[1])]
    count = 0
    for i, state in enumerate(state_dicts):
        count += 1
        for key, value in state.items():
            for j, out in enumerate(outs):
                if key in buffers or not value.is_floating_point():
                    out[key] = value.clone()
                elif i == 0:
                    out[key] = value.to(dtype) * float(coefficients[i, j])
                else:
                    out[key].add_(value.to(dtype), alpha=float(coefficients[i, j]))
    if count != coefficients.shape[0]:
        raise ValueError(f"coefficients have {coefficients.shape[0]} rows but {count} state dicts were given")
    return outs


def reconstruct(folder: str, stds: Sequence[float], at_step: Optional[int] = None,
                dtype: torch.dtype = torch.float32):
    """Post-hoc EMAs with σ_rel ``stds`` at snapshot step ``at_step`` (default: the last) from the snapshots in
    ``folder``. Returns ({σ_rel: state dict}, step, time)."""
    stds = [float(s) for s in check_stds(list(stds), "std")]
    inputs, step, time = select_snapshots(list_snapshots(folder), at_step)
    coefficients = solve_posthoc_coefficients([s.time for s in inputs], [s.std for s in inputs], time, stds)
    with safe_open(inputs[-1].path, framework="pt") as f:
        buffers = json.loads((f.metadata() or {}).get("buffers", "[]"))
    states = combine_state_dicts((load_file(s.path) for s in inputs), coefficients, buffers, dtype)
    return dict(zip(stds, states)), step, time


def write_reconstructions(folder: str, stds: Sequence[float], save_fn: Callable[..., str],
                          at_step: Optional[int] = None) -> List[str]:
    """Reconstruct (:func:`reconstruct`) and hand each result to ``save_fn(state_dict, std=, step=, time=)``, which
    writes it (e.g. a pipeline folder with a model card) and returns its path. Returns the paths."""
    states, step, time = reconstruct(folder, stds, at_step)
    return [save_fn(state, std=std, step=step, time=time) for std, state in states.items()]


def safetensors_saver(out_dir: str) -> Callable[..., str]:
    """A ``save_fn`` writing ``out_dir/posthoc-<step>-<std>.safetensors`` with the std, step and time as metadata."""

    def save(state, std, step, time):
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, snapshot_filename(step, std, prefix="posthoc"))
        _write_safetensors(state, path, {"format": "diffusers_stf.phema.reconstruction", "std": repr(std),
                                         "step": str(step), "time": repr(time)})
        return path

    return save


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """``python -m diffusers_stf.phema``: see :func:`diffusers_stf.training.posthoc.main`."""
    from .training.posthoc import main as command_line

    return command_line(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
