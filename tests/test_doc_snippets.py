"""Every Python snippet of README.md and docs/*.md runs as written, and every relative link points to a file.

Conventions of the pages (also in docs/testing.md):

- Every fence names its language: ```python is run; ```bash, ```json, ```text are not.
- A ```python block that cannot run by nature (an outline with ``...``, a multi-GPU launch, a push to the Hub) is
  marked by an HTML comment on the line before it: ``<!-- no-run: the reason -->``. Marked blocks must still parse;
  ``test_no_run_blocks_name_their_reason`` lists them with their reasons.
- The blocks of one file run in order in one namespace per file (a later block may use the names of an earlier one
  when the page reads that way), with the working directory a temporary folder where the pages' placeholders exist:
  ``outputs/...`` and ``converted/...`` pipeline folders of tiny random networks saved with the package's
  ``save_pretrained`` (the two ``converted/edm-cifar10-*`` folders are converted from NVlabs-format pickles written by
  the tests' stand-in, ``tests/nvlabs_standin.py``), ``cifar10-train.npz`` reference statistics, and ``benchmarks/``
  (a link to the repository's). Hub ids (``HUB_IDS``) are replaced by local folders; HF_HUB_OFFLINE is set, so an
  unknown Hub id fails instead of downloading.
- ``BUDGET`` lists the only other substitutions, each because the page's value would take far more than a few
  seconds (or a GPU) here; the rest runs with the page's own values.
"""

import ast
import os
import re
import shutil
import sys
import textwrap

import pytest
import torch

from conftest import make_tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
PYTHON = ("python", "py", "python3")
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(.*?)\s*-->$")

# Hub ids of the pages → fixture folders (text substitution: nothing is downloaded)
HUB_IDS = {"namespace/name": "outputs/stf-digits"}

# (pattern, replacement, why): the only changes to a snippet's text besides HUB_IDS
BUDGET = [
    (r"num_images=50000", "num_images=4", "50,000 samples for FID: hours"),
    (r"batch_size=500\b", "batch_size=2", "the batch of the 50,000-sample loop"),
    (r"batch_size=64\b", "batch_size=2", "the batch of the 50,000-sample loop"),
    (r"num_images=1000\b", "num_images=200", "1000 samples of 35 evaluations: tens of seconds on one thread"),
]
if not torch.cuda.is_available():
    BUDGET.append((r'\.to\("cuda"\)', '.to("cpu")', "no GPU here"))


# ---------------------------------------------------------------------------------------------------------------------
# Reading the pages


def fences(text):
    """``(line, language, code, no-run reason or None)`` for every fenced block of ``text``."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = re.match(r"^\s*```(.*)$", lines[i])
        if not match:
            i += 1
            continue
        language, start = match.group(1).strip(), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"line {start + 1}: a fence that is never closed"
        code = textwrap.dedent("\n".join(lines[start + 1:end])) + "\n"
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_RUN.match(before)
        blocks.append((start + 1, language, code, marker.group(1) if marker else None))
        i = end + 1
    return blocks


def page_blocks():
    out = []
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            out += [(page, n, *block) for n, block in enumerate(b for b in fences(f.read()) if b[1] in PYTHON)]
    return out


BLOCKS = page_blocks()
RUNNABLE = [b for b in BLOCKS if b[5] is None]


def test_every_fence_names_its_language_and_every_marker_a_python_block():
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text = f.read()
        for line, language, _, reason in fences(text):
            assert language, f"{page}:{line}: a fence without a language (python runs; say bash, json or text)"
            assert reason is None or language in PYTHON, f"{page}:{line}: a no-run marker before a {language} block"
        markers = len(re.findall(r"^\s*<!--\s*no-run:", without_code(text), re.M))
        assert markers == sum(r is not None for *_, r in fences(text)), f"{page}: a no-run marker not right before a block"


def test_no_run_blocks_name_their_reason(capsys):
    marked = [(page, n, line, reason, code) for page, n, line, _, code, reason in BLOCKS if reason is not None]
    for page, n, line, reason, code in marked:
        assert len(reason) > 10, f"{page} block {n} (line {line}): say why it cannot run"
        compile(code, f"{page}:{line}", "exec")  # still valid Python
    with capsys.disabled():
        print("\nno-run blocks:\n" + "\n".join(f"  {p} block {n} (line {line}): {r}" for p, n, line, r, _ in marked))
    assert len(RUNNABLE) >= 15


# ---------------------------------------------------------------------------------------------------------------------
# The placeholders


def save(pipe, folder):
    pipe.save_pretrained(folder)
    return folder


def conditional_unet(seed, classes, block_out_channels=(8, 16)):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=block_out_channels,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, norm_num_groups=4,
                       num_class_embeds=classes)


def tiny_edm2(seed, classes):
    from diffusers_stf.models import EDM2UNet

    torch.manual_seed(seed)
    return EDM2UNet(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=classes, model_channels=8,
                    channel_mult=(1, 2), channel_mult_noise=1, channel_mult_emb=2, num_blocks=1, attn_resolutions=(),
                    channels_per_head=4)


def write_nvlabs_edm_snapshot(path, label_dim, seed):
    """A VP snapshot of a tiny DDPM++ in NVlabs' pickle format (tests/nvlabs_standin.py), as EDM's edm-cifar10-*."""
    import nvlabs_standin as standin

    from diffusers_stf.models import SongUNet

    kwargs = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13,
                  embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                  resample_filter=[1, 1])
    torch.manual_seed(seed)
    net = SongUNet(sample_size=8, in_channels=1, out_channels=1, num_class_embeds=label_dim or None, augment_dim=9,
                   channel_mult_emb=4, label_dropout=0.0, **kwargs)
    record = standin.persistent_tree(net, "SongUNet", dict(img_resolution=8, in_channels=1, out_channels=1,
                                                           label_dim=label_dim, augment_dim=9, **kwargs))
    ema = standin.preconditioning("VPPrecond", record, 8, 1, label_dim=label_dim, model_type="SongUNet")
    standin.write(path, standin.edm_snapshot(ema))


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """A folder where every path the pages name exists, built from tiny random networks; the modules the pages
    import from it (``benchmarks/`` through its link) leave ``sys.modules`` with it, so later tests import their own."""
    root = tmp_path_factory.mktemp("pages")
    yield build_placeholders(root)
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(root)):
            del sys.modules[name]


def build_placeholders(root):
    from diffusers import DDPMPipeline, DDPMScheduler

    from diffusers_stf import (
        Discriminator,
        DiscriminatorGuidedPipeline,
        EDMHeunScheduler,
        EDMPipeline,
        NoiseConditionalClassifier,
    )
    from diffusers_stf.conversion.cli import main as convert
    from diffusers_stf.evaluation import load_feature_extractor, reference_statistics, save_reference_stats

    cwd = os.getcwd()
    os.chdir(root)
    try:
        def disc(seed):
            torch.manual_seed(seed)
            return Discriminator(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)

        def edm(seed, folder):
            return save(EDMPipeline(make_tiny_unet(seed), EDMHeunScheduler()), folder)

        for seed, name in enumerate(["stf-digits", "edm-digits", "edm-digits-3000"]):
            edm(seed, f"outputs/{name}")
        for seed, name in enumerate(["stf-digits-guide", "edm-digits-guide"], start=10):  # smaller guides
            torch.manual_seed(seed)
            from diffusers import UNet2DModel

            guide = UNet2DModel(**{**make_tiny_unet().config, "block_out_channels": (4, 8)})
            save(EDMPipeline(guide, EDMHeunScheduler()), f"outputs/{name}")
        save(EDMPipeline(conditional_unet(3, 11), EDMHeunScheduler(), null_class_label=10), "outputs/stf-digits-cond")
        save(DDPMPipeline(make_tiny_unet(4), DDPMScheduler()), "outputs/sa2-digits")
        save(DiscriminatorGuidedPipeline(make_tiny_unet(5), EDMHeunScheduler(), disc(6)), "outputs/train_discriminator")
        shutil.copytree("outputs/train_discriminator", "dg-run")
        torch.manual_seed(7)
        NoiseConditionalClassifier(sample_size=8, in_channels=1, num_classes=10, block_out_channels=(8, 16),
                                   norm_num_groups=4).save_pretrained("outputs/train_classifier")

        for label_dim, kind in ((0, "uncond"), (10, "cond")):
            write_nvlabs_edm_snapshot(f"edm-cifar10-32x32-{kind}-vp.pkl", label_dim, seed=20 + label_dim)
            convert(["edm", f"edm-cifar10-32x32-{kind}-vp.pkl", f"converted/edm-cifar10-{kind}-vp"])
        save(DiscriminatorGuidedPipeline(conditional_unet(8, 10), EDMHeunScheduler(), disc(9)),
             "converted/dg-cifar10-cond")
        edm2 = dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
        save(EDMPipeline(tiny_edm2(30, 1000), EDMHeunScheduler(**edm2)), "converted/edm2-img512-s-fid")
        for seed, name in ((31, "guid"), (33, "autog")):
            save(EDMPipeline(tiny_edm2(seed, 1000), EDMHeunScheduler(**edm2), guide_unet=tiny_edm2(seed + 1, 1000)),
                 f"converted/edm2-img512-xxl-{name}-fid")
        save(EDMPipeline(tiny_edm2(40, None), EDMHeunScheduler(**edm2)),
             "outputs/edm2-digits/posthoc_ema/posthoc-000000400-0.080")  # docs/training.md's phema folder

        extractor = load_feature_extractor("digits")
        stats = reference_statistics(extractor, "digits:train", cache_dir=str(root / "cache" / "reference_stats"))
        save_reference_stats("cifar10-train.npz", stats["mu"], stats["sigma"], feature_network=extractor.name,
                             num_images=len(stats["features"]))
        os.symlink(os.path.join(ROOT, "benchmarks"), "benchmarks")
    finally:
        os.chdir(cwd)
    return root


def as_run(code):
    """The snippet with HUB_IDS and BUDGET applied."""
    for hub_id, folder in HUB_IDS.items():
        code = code.replace(f'"{hub_id}"', f'"{folder}"')
    for pattern, replacement, _ in BUDGET:
        code = re.sub(pattern, replacement, code)
    return code


NAMESPACES = {}  # page → (namespace, index of the next block to run)


def assigned_names(code):
    """The names a block binds at its top level (assignments, imports, definitions, for-loop targets)."""
    names = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        else:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For)) else []
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def run_block(page, n, code, placeholders, monkeypatch):
    """Runs the block in its page's namespace and checks that it ran to its end: every name it binds is bound."""
    monkeypatch.chdir(placeholders)
    monkeypatch.setenv("DIFFUSERS_STF_CACHE", str(placeholders / "cache"))
    monkeypatch.syspath_prepend(str(placeholders))
    namespace = NAMESPACES[page][0]
    exec(compile(as_run(code), f"{page} (block {n})", "exec"), namespace)
    missing = assigned_names(as_run(code)) - namespace.keys()
    assert not missing, f"{page} block {n} ended before binding {sorted(missing)}"


@pytest.mark.parametrize("page,n", [(b[0], b[1]) for b in RUNNABLE], ids=[f"{b[0]}-{b[1]}" for b in RUNNABLE])
def test_snippet_runs_as_written(page, n, placeholders, monkeypatch):
    namespace, done = NAMESPACES.setdefault(page, ({"__name__": "__snippet__"}, 0))
    earlier = [b for b in RUNNABLE if b[0] == page and done <= b[1] < n]
    for _, m, _, _, code, _ in earlier:  # blocks this run skipped (e.g. -k): the page reads them first
        run_block(page, m, code, placeholders, monkeypatch)
    NAMESPACES[page] = (namespace, n + 1)
    code = next(b[4] for b in RUNNABLE if b[0] == page and b[1] == n)
    run_block(page, n, code, placeholders, monkeypatch)


# ---------------------------------------------------------------------------------------------------------------------
# Links


def github_anchor(heading):
    """GitHub's anchor of a markdown heading: lower case, code marks and punctuation dropped (``_`` and ``-`` kept),
    spaces → '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def without_fences(text):
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def without_code(text):
    """``text`` without fenced blocks and inline code spans."""
    return re.sub(r"(`+).*?\1", "", without_fences(text))


def anchors(path):
    with open(path, encoding="utf-8") as f:
        return {github_anchor(h) for h in re.findall(r"^#+\s+(.*)$", without_fences(f.read()), re.M)}


def broken_links(root, pages):
    """``page: target (why)`` for every relative link ``[text](path)`` or ``[text](path#anchor)`` of ``pages`` whose
    file, or heading in a markdown file, does not exist."""
    broken = []
    for page in pages:
        with open(os.path.join(root, page), encoding="utf-8") as f:
            text = without_code(f.read())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(root, os.path.dirname(page), path)) if path else os.path.join(root, page)
            if not os.path.exists(full):
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and full.endswith(".md") and anchor not in anchors(full):
                broken.append(f"{page}: {target} (no heading #{anchor})")
    return broken


def test_every_relative_link_points_to_a_file_and_heading():
    broken = broken_links(ROOT, PAGES)
    assert not broken, "\n".join(broken)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## In training: `evaluate_pipeline`\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#in-training-evaluate_pipeline) [web](https://x.org/y.md)\n"
        "[gone](docs/b.md) [no heading](docs/a.md#results)\n```bash\n[not a link](nowhere.md)\n```\n")
    (tmp_path / "docs" / "c.md").write_text("# C\n[up](../README.md) [here](#c) [nothing here](#results)\n")
    assert broken_links(str(tmp_path), ["README.md", "docs/c.md"]) == [
        "README.md: docs/b.md (no such file)", "README.md: docs/a.md#results (no heading #results)",
        "docs/c.md: #results (no heading #results)"]


def test_pip_install_diffusers_stf_appears_only_as_what_works_once_published():
    """The package is not on PyPI: wherever the index name appears (pages, card templates, code), the same line says
    it works only once published."""
    files = [os.path.join(ROOT, p) for p in PAGES]
    for folder, _, names in os.walk(os.path.join(ROOT, "diffusers_stf")):
        files += [os.path.join(folder, n) for n in names if n.endswith((".py", ".md"))]
    offending = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if "pip install diffusers-stf" in line and "published" not in line:
                    offending.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)
