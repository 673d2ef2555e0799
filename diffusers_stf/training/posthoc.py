"""The command line of post-hoc EMA reconstruction, ``python -m diffusers_stf.phema OUTPUT_DIR --std ...``: one
pipeline folder per σ_rel, and the plot of FD against σ_rel.

For a training folder that holds a saved pipeline (``model_index.json``) and the snapshots of ``--ema_stds``
(``phema_snapshots/``), each requested σ_rel becomes ``OUTPUT_DIR/posthoc_ema/posthoc-<step>-<σ_rel>/``: the training
folder's pipeline with its network's weights replaced by the reconstruction (EDM2 Algorithm 3, see
:mod:`~diffusers_stf.phema`), saved with ``save_pretrained``, a model card saying how it was made, and
``posthoc_ema.json`` (σ_rel, step, training time, the snapshots used, the command). A folder without a pipeline gets
state-dict files instead (:func:`~diffusers_stf.phema.safetensors_saver`).

``--plot`` samples every reconstruction and the training folder's own EMA (``--plot_images`` images from seeds 0, 1,
…, ``--plot_steps`` sampler steps) and plots their Fréchet distance to ``--plot_reference`` (default: the digits'
training split, in the shipped digits classifier's features) against σ_rel: ``fd_vs_std.png`` and
``fd_vs_std.json`` in the output folder.

A folder is only replaced when ``posthoc_ema.json`` shows that this command wrote it; anything else in the way is
refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from typing import Callable, Dict, List, Optional, Sequence

from ..phema import (
    RECONSTRUCTION_DIR, SNAPSHOT_DIR, check_stds, list_snapshots, safetensors_saver, select_snapshots,
    write_reconstructions,
)

RECORD = "posthoc_ema.json"
PLOT = "fd_vs_std"


def folder_name(step: int, std: float) -> str:
    return f"posthoc-{int(step):09d}-{std:.3f}"


def written_here(path: str) -> bool:
    """Whether ``path`` is a folder this command wrote (it holds ``posthoc_ema.json``)."""
    return os.path.isfile(os.path.join(path, RECORD))


def claim(path: str) -> None:
    """Refuse ``path`` when it exists and this command did not write it."""
    if os.path.lexists(path) and not written_here(path):
        raise ValueError(f"{path!r} exists and was not written by python -m diffusers_stf.phema (no {RECORD}); move "
                         "it away or choose another --out_dir")


def card_title(folder: str) -> Optional[str]:
    """The heading of the model card in ``folder`` (None without one)."""
    try:
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
            return next((line[2:].strip() for line in f if line.startswith("# ")), None)
    except OSError:
        return None


def card_tags(folder: str) -> List[str]:
    try:
        from huggingface_hub import ModelCard

        return list(ModelCard.load(os.path.join(folder, "README.md")).data.tags or [])
    except Exception:  # no card, or one huggingface_hub cannot parse: the reconstruction's own tags suffice
        return []


def pipeline_saver(training_dir: str, out_dir: str, command: str,
                   snapshot_dir: Optional[str] = None) -> Callable[..., str]:
    """A ``save_fn`` for :func:`~diffusers_stf.phema.write_reconstructions`: the pipeline of ``training_dir`` with the
    reconstructed network weights, saved to ``out_dir/posthoc-<step>-<std>/`` with a model card and the record
    (``snapshot_dir``: where the snapshots are, default :func:`snapshot_folder`)."""
    from ..evaluation import load_pipeline

    snapshot_dir = snapshot_dir or snapshot_folder(training_dir)
    snapshots = list_snapshots(snapshot_dir)  # first: a folder without snapshots is refused before anything loads
    pipe = load_pipeline(training_dir)
    network = getattr(pipe, "unet", None)
    if network is None:
        raise ValueError(f"the pipeline in {training_dir!r} has no unet: the snapshots average a score network")
    title = card_title(training_dir) or os.path.basename(os.path.abspath(training_dir))
    tags = card_tags(training_dir)

    def save(state, std, step, time):
        target = os.path.join(out_dir, folder_name(step, std))
        partial = target + ".partial"
        claim(target)
        claim(partial)
        if os.path.lexists(partial):
            shutil.rmtree(partial)
        dtype = next(network.parameters()).dtype
        try:
            network.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as err:
            raise ValueError(f"the snapshots in {snapshot_dir!r} do not fit the network of {training_dir!r} "
                             f"({err})") from err
        used = [os.path.basename(s.path) for s in select_snapshots(snapshots, step)[0]]
        record = {"std": std, "step": int(step), "time": time, "source": os.path.abspath(training_dir),
                  "snapshots": used, "command": command}
        os.makedirs(partial)  # and out_dir with it
        with open(os.path.join(partial, RECORD), "w") as f:  # first: a killed write is recognisably ours
            json.dump(record, f, indent=1)
        pipe.save_pretrained(partial)
        write_card(partial, target, record, title, tags, type(pipe))
        if os.path.lexists(target):
            shutil.rmtree(target)
        os.replace(partial, target)
        return target

    return save


def write_card(folder: str, target: str, record: Dict, title: str, tags: Sequence[str], pipeline_class) -> str:
    """The model card of one reconstruction: what it is, from which snapshots, and the command."""
    from .model_card import ModelCardInfo, local_name, write_model_card

    stds = sorted({float(name.rsplit("-", 1)[1][: -len(".safetensors")]) for name in record["snapshots"]})
    steps = sorted({int(name.split("-")[1]) for name in record["snapshots"]})
    module = "diffusers_stf" if pipeline_class.__module__.startswith("diffusers_stf") else "diffusers"
    usage = (f"import torch\nfrom {module} import {pipeline_class.__name__}\n\n"
             f'pipeline = {pipeline_class.__name__}.from_pretrained("{{repo}}")\n'
             "images = pipeline(batch_size=16, generator=torch.Generator().manual_seed(0)).images")
    description = (
        f"The network of *{title}* with **post-hoc EMA** weights: EDM2's reconstruction (Karras et al., CVPR 2024, "
        f"\"Analyzing and Improving the Training Dynamics of Diffusion Models\", Section 3.2 and Algorithm 3) of the "
        f"power-function EMA with σ_rel = {record['std']:g} at step {record['step']} (training time "
        f"{record['time']:g} images), as the least-squares combination of {len(record['snapshots'])} snapshots of "
        f"the power-function EMAs σ_rel ∈ {{{', '.join(f'{s:g}' for s in stds)}}} tracked during training (steps "
        f"{steps[0]} to {steps[-1]}). The pipeline and its scheduler are those of the training folder; only the "
        "network's weights differ.")
    info = ModelCardInfo(title=f"{title}: post-hoc EMA σ_rel = {record['std']:g}", description=description,
                         tags=[t for t in tags if t not in ("diffusers", "diffusers_stf")] + ["post-hoc-ema", "edm2"],
                         usage=usage, extra={"script": "python -m diffusers_stf.phema"})
    facts = {"σ_rel": record["std"], "step": record["step"], "training images": record["time"],
             "snapshots": len(record["snapshots"]), "made with": f"`{record['command']}`"}
    return write_model_card(folder, info, local_name(target), training_config={"source": record["source"]},
                            metrics=facts)


def snapshot_folder(output_dir: str) -> str:
    """``output_dir/phema_snapshots`` when it exists, else ``output_dir`` itself."""
    inside = os.path.join(output_dir, SNAPSHOT_DIR)
    return inside if os.path.isdir(inside) else output_dir


def fd_against_std(folders: Dict[float, str], out_dir: str, num_images: int, steps: int, reference: str,
                   baseline: Optional[str] = None, feature_extractor: str = "digits", batch_size: int = 250,
                   log=print) -> str:
    """Sample each pipeline folder of ``folders`` (σ_rel → folder) and ``baseline`` (the training folder's own
    weights), score the samples' FD against ``reference``, and plot FD against σ_rel; returns the PNG's path."""
    from ..evaluation import evaluate_images, generate_images, load_feature_extractor, load_pipeline

    extractor = load_feature_extractor(feature_extractor)

    def fd(folder):
        pipe = load_pipeline(folder)
        images = generate_images(pipe, num_images, steps, seed=0, batch_size=batch_size, progress=False)["images"]
        value = evaluate_images(images, extractor, references=(reference,))["fd"][reference]
        log(f"  {folder}: FD {value:.3f}")
        return value

    rows = {f"{std:g}": fd(folder) for std, folder in sorted(folders.items())}
    result = {"fd_by_std": rows, "reference": reference, "feature_extractor": feature_extractor,
              "num_images": num_images, "num_inference_steps": steps}
    if baseline is not None:
        result["training_ema_fd"] = fd(baseline)
    path = os.path.join(out_dir, PLOT)
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.plot([float(s) for s in rows], list(rows.values()), marker="o", label="post-hoc EMA")
    if baseline is not None:
        ax.axhline(result["training_ema_fd"], color="grey", linestyle="--", label="the run's saved EMA")
    ax.set_xlabel("σ_rel (EMA length relative to training time)")
    ax.set_ylabel(f"FD vs {reference} ({feature_extractor}) ↓")
    ax.set_title(f"{num_images} images, {steps} sampler steps", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=110)
    plt.close(fig)
    return path + ".png"


def parse_stds(text: str) -> List[float]:
    """'0.05,0.10' → [0.05, 0.1], each checked to lie in (0, 1/√12)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--std must be a comma-separated list of numbers, got {text!r}") from None
    check_stds(values, "--std")
    return sorted(set(values))


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(prog="python -m diffusers_stf.phema",
                                     description="Post-hoc EMA reconstruction from power-function EMA snapshots "
                                                 "(EDM2, Algorithm 3): one pipeline folder per σ_rel.",
                                     allow_abbrev=False)
    parser.add_argument("output_dir", help=f"the training output folder (snapshots in {SNAPSHOT_DIR}/ or the "
                                           "folder itself)")
    parser.add_argument("--std", required=True, help="comma-separated σ_rel to reconstruct, each in (0, 0.2887)")
    parser.add_argument("--at_step", type=int, default=None, help="snapshot step to reconstruct at (default: last)")
    parser.add_argument("--snapshot_dir", default=None, help=f"snapshot folder (default: OUTPUT_DIR/{SNAPSHOT_DIR})")
    parser.add_argument("--out_dir", default=None, help=f"where to write (default: OUTPUT_DIR/{RECONSTRUCTION_DIR})")
    parser.add_argument("--plot", action="store_true",
                        help="sample every reconstruction and the run's own EMA, and plot FD against σ_rel")
    parser.add_argument("--plot_images", type=int, default=300, help="--plot: images per σ_rel")
    parser.add_argument("--plot_steps", type=int, default=18, help="--plot: sampler steps")
    parser.add_argument("--plot_reference", default="digits:train",
                        help="--plot: the reference set of the FD (see examples/evaluate.py)")
    parser.add_argument("--plot_feature_extractor", default="digits", help="--plot: digits, inception, ...")
    args = parser.parse_args(argv)
    command = "python -m diffusers_stf.phema " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                      else sys.argv[1:]))
    snapshot_dir = args.snapshot_dir or snapshot_folder(args.output_dir)
    out_dir = args.out_dir or os.path.join(args.output_dir, RECONSTRUCTION_DIR)
    pipeline = os.path.isfile(os.path.join(args.output_dir, "model_index.json"))
    try:
        stds = parse_stds(args.std)
        if args.plot and not pipeline:
            raise ValueError(f"--plot samples pipelines, and {args.output_dir!r} holds none (no model_index.json)")
        if args.plot and (args.plot_images < 2 or args.plot_steps < 1):
            raise ValueError("--plot_images must be >= 2 and --plot_steps >= 1")
        save = pipeline_saver(args.output_dir, out_dir, command, snapshot_dir) if pipeline else \
            safetensors_saver(out_dir)
        paths = write_reconstructions(snapshot_dir, stds, save, args.at_step)
        if args.plot:
            paths.append(fd_against_std(dict(zip(stds, paths)), out_dir, args.plot_images, args.plot_steps,
                                        args.plot_reference, baseline=args.output_dir,
                                        feature_extractor=args.plot_feature_extractor))
    except ValueError as err:
        parser.error(str(err))
    for path in paths:
        print(path)
    return paths
