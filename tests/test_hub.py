"""Hub-native folders: plain-diffusers loading through generated remote code, package loading of both layouts,
model cards the Hub parses, and ``--push_to_hub`` that fails early or retries cleanly."""

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_unet
from safetensors.torch import load_file

from diffusers_stf import (
    AnnealedLangevinScheduler,
    AugmentConditionedUNet2DModel,
    Discriminator,
    DiscriminatorGuidedPipeline,
    EDMHeunScheduler,
    EDMPipeline,
    EDMStochasticScheduler,
    NoiseConditionalClassifier,
    PredictorCorrectorScheduler,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A child process's limit: a hang fails the test instead of CI's job. Sized for CI's worst case (a loaded 2-core
# machine) since hitting it tests nothing.
TIMEOUT = 600

# Put first on PYTHONPATH of a child process: every import of diffusers_stf fails there, as on a machine with only
# torch and diffusers installed.
BLOCKER = """
import sys


class _BlockDiffusersStf:
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers_stf" or name.startswith("diffusers_stf."):
            raise ImportError(f"{name} is blocked: this process has only torch and diffusers")
        return None


sys.meta_path.insert(0, _BlockDiffusersStf())
"""


def blocked_env(tmp_path):
    """Environment of a child process in which ``import diffusers_stf`` fails (a sitecustomize meta-path blocker)."""
    block_dir = tmp_path / "block"
    block_dir.mkdir(exist_ok=True)
    (block_dir / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(block_dir)
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same reductions, so bit-identical samples
    return env


def run_blocked(tmp_path, code: str, timeout=TIMEOUT, args=(), **extra_env) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``args`` in ``sys.argv[1:]``) in a fresh interpreter, outside the repository, with
    diffusers_stf blocked."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd,
                          env={**blocked_env(tmp_path), **extra_env}, capture_output=True, text=True, timeout=timeout)


def tiny_disc(seed=0):
    torch.manual_seed(seed)
    return Discriminator(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return NoiseConditionalClassifier(sample_size=8, in_channels=1, num_classes=3, block_out_channels=(8, 16),
                                      norm_num_groups=4)


def tiny_augment_unet(seed=0):
    torch.manual_seed(seed)
    return AugmentConditionedUNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False, norm_num_groups=4, augment_dim=9)


def tiny_conditional_unet(seed=0, block_out_channels=(8, 16)):
    """A class-conditional UNet of 3 classes trained, as classifier-free guidance needs, with a null label (index 3)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=block_out_channels,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, norm_num_groups=4,
                       num_class_embeds=4)


# name -> (pipeline factory, call kwargs); each exercises a different component class of the package
CASES = {
    "edm_heun": (lambda: EDMPipeline(make_tiny_unet(0), EDMHeunScheduler()), {"num_inference_steps": 4}),
    "edm_stochastic": (lambda: EDMPipeline(make_tiny_unet(1), EDMStochasticScheduler(s_churn=40.0)),
                       {"num_inference_steps": 4}),
    "guided": (lambda: DiscriminatorGuidedPipeline(make_tiny_unet(2), EDMHeunScheduler(), tiny_disc(3)),
               {"num_inference_steps": 4, "dg_weight_1st_order": 2.0}),
    "classifier_guided": (
        lambda: DiscriminatorGuidedPipeline(make_tiny_unet(9), EDMHeunScheduler(), tiny_disc(10), tiny_classifier(11)),
        {"num_inference_steps": 4, "dg_weight_1st_order": 1.0, "classifier_guidance_scale": 2.0,
         "class_labels": [0, 2]}),
    "langevin": (lambda: EDMPipeline(make_tiny_unet(4), AnnealedLangevinScheduler(steps_per_level=2)),
                 {"num_inference_steps": 3}),
    "predictor_corrector": (lambda: EDMPipeline(make_tiny_unet(5), PredictorCorrectorScheduler(sigma_max=5.0)),
                            {"num_inference_steps": 4}),
    "augment_unet": (lambda: EDMPipeline(tiny_augment_unet(6), EDMHeunScheduler()), {"num_inference_steps": 4}),
    "cfg_autoguided": (
        lambda: DiscriminatorGuidedPipeline(tiny_conditional_unet(12), EDMHeunScheduler(), tiny_disc(13),
                                            guide_unet=tiny_conditional_unet(14, block_out_channels=(4, 8)),
                                            null_class_label=3),
        {"num_inference_steps": 4, "class_labels": [0, 2], "guidance_scale": 2.0, "autoguidance_scale": 1.5,
         "guidance_interval": [0.05, 20.0], "dg_weight_1st_order": 1.0}),
}


def call_kwargs(kwargs):
    """JSON-able case kwargs → pipeline kwargs (class labels as a tensor)."""
    return {k: torch.tensor(v) if k == "class_labels" else v for k, v in kwargs.items()}


def sample(pipe, kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="pt",
                **call_kwargs(kwargs)).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case saved once, with the samples of our own classes."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name, (make, kwargs) in CASES.items():
        pipe = make()
        folder = root / name
        pipe.save_pretrained(folder)
        out[name] = (folder, kwargs, sample(pipe, kwargs), pipe)
    return out


# The bundler's import rule (diffusers_stf/hub/bundle.py, rule 2), written out independently of the bundler
MODULE_LEVEL_IMPORTS = frozenset({"torch", "diffusers", "numpy", "__future__"} | set(sys.stdlib_module_names))
FUNCTION_LEVEL_IMPORTS = MODULE_LEVEL_IMPORTS | {"PIL", "transformers"}
BUNDLE_RULE = ("a bundled module may import only torch, diffusers, numpy and the standard library (inside a function "
               "also PIL and transformers), and nothing relative: see the rules in diffusers_stf/hub/bundle.py")


def imports_breaking_the_rule(source: str):
    """``(line, imported module, where)`` for every import in ``source`` that a bundle may not make."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.ImportFrom) and child.level:
                    found.append((child.lineno, "." * child.level + (child.module or ""), "relative"))
                    continue
                allowed = FUNCTION_LEVEL_IMPORTS if in_function else MODULE_LEVEL_IMPORTS
                names = [child.module] if isinstance(child, ast.ImportFrom) else [a.name for a in child.names]
                found.extend((child.lineno, name, "in a function" if in_function else "at module level")
                             for name in names if name.split(".")[0] not in allowed)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def assert_bundle_imports_allowed(source: str, what: str):
    bad = imports_breaking_the_rule(source)
    assert not bad, f"{what} imports " + "; ".join(f"{m} ({where}, line {n})" for n, m, where in bad) + \
        f". Rule: {BUNDLE_RULE}"


def saveable_package_classes():
    """Every class of the package that ``save_pretrained`` writes (pipelines, schedulers, models), by import path."""
    import importlib
    import pkgutil

    from diffusers import ConfigMixin

    import diffusers_stf

    classes = {}
    for info in pkgutil.walk_packages(diffusers_stf.__path__, "diffusers_stf."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, ConfigMixin) and obj.__module__ == module.__name__:
                classes[f"{module.__name__}.{name}"] = obj
    return classes


def test_every_bundle_imports_only_torch_diffusers_numpy_and_the_standard_library():
    """The bundle of every class that can be saved, alone (a pipeline's bundle adds its components' bundles)."""
    from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

    from diffusers_stf.hub import generate_remote_code

    classes = saveable_package_classes()
    for base in (DiffusionPipeline, SchedulerMixin, ModelMixin):
        assert any(issubclass(c, base) for c in classes.values()), base  # the walk finds each kind
    for path, cls in classes.items():
        assert_bundle_imports_allowed(generate_remote_code(cls), f"the bundle of {path}")


def test_the_import_rule_check_names_what_breaks_it():
    fake = "import os\nimport scipy.stats\nfrom torch import nn\n\n\ndef f():\n    import PIL\n" \
           "    from sklearn import svm\n    from . import sibling\n"
    with pytest.raises(AssertionError) as err:
        assert_bundle_imports_allowed(fake, "the fake module")
    reported, rule = str(err.value).split("\n")[0].split(" Rule: ")
    assert reported == ("the fake module imports scipy.stats (at module level, line 2); sklearn (in a function, "
                        "line 8); . (relative, line 9).")
    assert rule == BUNDLE_RULE and "diffusers_stf/hub/bundle.py" in rule
    assert_bundle_imports_allowed(fake.replace("scipy.stats", "math").replace("sklearn", "numpy").replace(
        "    from . import sibling\n", ""), "the fake module, mended")


def test_the_component_library_lists_every_component_class_of_the_package():
    """Adding a model or scheduler class means adding it to pipelines/components.py (one import line)."""
    from diffusers import DiffusionPipeline

    from diffusers_stf.hub.layout import library_classes

    not_components = {  # saveable, but never a pipeline component
        "diffusers_stf.schedulers.scheduling_base.PreconditionedScheduler": "the schedulers' base class",
        "diffusers_stf.evaluation.feature_extractors.DigitsClassifier": "a feature extractor of the metrics",
    }
    library = EDMPipeline.component_library
    listed = set(library_classes(library).values())
    for path, cls in saveable_package_classes().items():
        if issubclass(cls, DiffusionPipeline):
            assert cls.component_library is library, path
        elif path not in not_components:
            assert cls in listed, f"{path} is missing from {library.__name__} (add one import line there)"
    assert {"ModelMixin", "SchedulerMixin"} <= set(vars(library))  # diffusers picks the load method by them


def assert_content_addressed(path, defining_module):
    """``path`` is ``<defining module>_<first 10 hex digits of the SHA-256 of its bytes>.py``."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert path.name == f"{defining_module}_{digest}.py", (path.name, digest)


def test_folders_use_the_remote_code_layout_with_self_contained_content_addressed_code(saved):
    for name, (folder, _, _, pipe) in saved.items():
        index = json.loads((folder / "model_index.json").read_text())
        stem, class_name = index["_class_name"]
        assert class_name == type(pipe).__name__
        code = folder / f"{stem}.py"
        assert_content_addressed(code, type(pipe).__module__.rpartition(".")[2])
        assert_bundle_imports_allowed(code.read_text(), code.name)
        tree = ast.parse(code.read_text())
        defined = {stmt.name for stmt in tree.body if isinstance(stmt, ast.ClassDef)}
        assert class_name in defined
        components = 0
        for component, value in index.items():
            if component.startswith("_") or not isinstance(value, list) or value[0] in ("diffusers", None):
                continue
            library, cls = value
            assert cls == type(getattr(pipe, component)).__name__ and cls in defined
            # the component's file takes its class from the pipeline's module: one class object for both
            shim_path = folder / component / f"{library}.py"
            assert_content_addressed(shim_path, type(getattr(pipe, component)).__module__.rpartition(".")[2])
            shim = ast.parse(shim_path.read_text())
            imports = [s for s in shim.body if isinstance(s, (ast.Import, ast.ImportFrom))]
            assert len(imports) == 1 and imports[0].level == 1 and imports[0].names[0].name == stem
            assert [p.name for p in (folder / component).glob("*.py")] == [shim_path.name]
            components += 1
        assert components >= 1, name  # at least the scheduler is a package class
        assert [p.name for p in folder.glob("*.py")] == [code.name]
        assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))


def test_saving_again_replaces_the_code_files_it_wrote_and_keeps_the_rest(saved, tmp_path):
    import shutil

    folder = tmp_path / "again"
    shutil.copytree(saved["guided"][0], folder)
    old = {p.relative_to(folder) for p in folder.rglob("*.py")}
    # the user's own files, and code files as version 0.3.0 wrote them (their docstrings)
    (folder / "notes.py").write_text("# the user's own file\n")
    (folder / "scheduler" / "mine.py").write_text('"""Generated by me, not by diffusers_stf."""\n')
    (folder / "pipeline_discriminator_guided.py").write_text(
        '"""DiscriminatorGuidedPipeline: code for diffusers\' ``trust_remote_code=True`` loading.\n\n'
        'Generated by diffusers_stf 0.3.0 ``save_pretrained`` from these modules of the package\n"""\n')
    (folder / "scheduler" / "scheduling_edm_heun.py").write_text(
        '"""EDMHeunScheduler for diffusers\' ``trust_remote_code=True`` loading, generated by diffusers_stf '
        '0.3.0.\n"""\n')
    saved["classifier_guided"][3].save_pretrained(folder)  # other components, so other code
    new = {str(p.relative_to(folder)) for p in folder.rglob("*.py")}
    index = json.loads((folder / "model_index.json").read_text())
    named = {f"{index['_class_name'][0]}.py"} | {f"{c}/{v[0]}.py" for c, v in index.items() if not c.startswith("_")
                                                 and isinstance(v, list) and v[0] not in ("diffusers", None)}
    assert new == named | {"notes.py", "scheduler/mine.py"}
    assert not {str(p) for p in old} & new


# A package of known content: what the generator must keep, rename, drop and refuse
FAKE_PACKAGE = {
    "__init__.py": "from .things import Thing\n",
    "plumbing.py": "class RemoteCodeMixin:\n    def save_pretrained(self):\n        return 'package save'\n",
    "constants.py": "_SCALE = 2.0\nOFFSET = 1.0\n\n\ndef scaled(x):\n    return _SCALE * x + OFFSET\n\n\n"
                    "def unused():\n    import scipy\n\n    return scipy\n",
    "things.py": "import math\n\nfrom torch import nn\n\nfrom . import constants\nfrom .constants import OFFSET\n"
                 "from .constants import scaled as scale_it\nfrom .plumbing import RemoteCodeMixin\n\n"
                 "_SCALE = 10.0\n\n\n"
                 "class Thing(RemoteCodeMixin, nn.Module):\n    factor = _SCALE\n    component_library = constants\n\n"
                 "    def value(self, x):\n        return scale_it(x) + _SCALE + OFFSET + math.floor(0.5)\n",
    "bad_top.py": "import scipy\n\n\nclass Bad:\n    def f(self):\n        return scipy\n",
    "bad_nested.py": "class Lazy:\n    def f(self):\n        from .constants import OFFSET\n\n        return OFFSET\n",
    "bad_module.py": "from . import constants\n\n\nclass ModRef:\n    def f(self):\n        return constants.OFFSET\n",
    "bad_fstring.py": "from .constants import scaled\n\n_SCALE = 5.0\n\n\nclass Shown:\n    def f(self):\n"
                      "        return f\"{_SCALE}\" + str(scaled(1.0))\n",
}


def test_generator_keeps_what_is_reached_renames_clashes_and_refuses_what_cannot_travel(tmp_path, monkeypatch):
    import importlib

    from diffusers_stf.hub.bundle import generate_remote_code

    package = tmp_path / "h6_fake_package"
    package.mkdir()
    for name, text in FAKE_PACKAGE.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    things = importlib.import_module("h6_fake_package.things")
    code = generate_remote_code(things.Thing)  # the package is the classes' own: h6_fake_package
    assert "def unused" not in code and "scipy" not in code  # not reached from Thing
    scope = {}
    exec(compile(code, "bundle", "exec"), scope)
    # scaled(1) = 2·1 + 1 with constants' _SCALE; then + things' _SCALE (10) + OFFSET (1) + floor(0.5)
    assert scope["Thing"]().value(1.0) == 14.0 and scope["Thing"].factor == 10.0
    assert things.Thing().value(1.0) == 14.0
    # the package's save/load plumbing stays behind: no mixin base, no library attribute, no plumbing module
    assert scope["Thing"].__bases__ == (torch.nn.Module,) and not hasattr(scope["Thing"], "component_library")
    assert "plumbing" not in code and "package save" not in code
    assert things.Thing().save_pretrained() == "package save" and things.Thing.component_library.OFFSET == 1.0

    for module, cls, message in [("bad_top", "Bad", "imports scipy"), ("bad_nested", "Lazy", "module level"),
                                 ("bad_module", "ModRef", "is a module"), ("bad_fstring", "Shown", "f-string")]:
        with pytest.raises(ValueError, match=message):
            generate_remote_code(getattr(importlib.import_module(f"h6_fake_package.{module}"), cls))


def python_blocks(text):
    import re

    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def cards(saved, tmp_path_factory):
    """One card per template, written for a local folder (as a run without --push_to_hub does)."""
    import shutil

    from diffusers import DDPMPipeline, DDPMScheduler

    from diffusers_stf.training.model_card import ModelCardInfo, template_names, write_model_card

    root = tmp_path_factory.mktemp("cards")
    ddpm = root / "ddpm"
    DDPMPipeline(make_tiny_unet(8), DDPMScheduler(num_train_timesteps=20)).save_pretrained(ddpm)
    folders = {"unconditional_image_generation.md": saved["edm_stochastic"][0],
               "discriminator.md": saved["guided"][0], "classifier.md": saved["classifier_guided"][0],
               "sequence_aware_ddpm.md": ddpm}
    assert set(folders) == set(template_names())
    usage = {"unconditional_image_generation.md": 'from diffusers_stf import EDMPipeline\n'
                                                  'pipeline = EDMPipeline.from_pretrained("{repo}")\n'
                                                  'images = pipeline(batch_size=2, num_inference_steps=3).images',
             "discriminator.md": 'from diffusers_stf import DiscriminatorGuidedPipeline\n'
                                 'pipeline = DiscriminatorGuidedPipeline.from_pretrained("{repo}")\n'
                                 'images = pipeline(batch_size=2, num_inference_steps=3).images',
             "classifier.md": 'import torch\nfrom diffusers_stf import DiscriminatorGuidedPipeline\n'
                              'pipeline = DiscriminatorGuidedPipeline.from_pretrained("{repo}")\n'
                              'images = pipeline(batch_size=2, num_inference_steps=3,'
                              ' class_labels=torch.tensor([0, 1]), classifier_guidance_scale=1.0).images',
             "sequence_aware_ddpm.md": 'from diffusers import DDPMPipeline\n'
                                       'pipeline = DDPMPipeline.from_pretrained("{repo}")\n'
                                       'images = pipeline(batch_size=2, num_inference_steps=20).images'}
    sample_kwargs = {"unconditional_image_generation.md": {"num_inference_steps": 3},
                     "discriminator.md": {"num_inference_steps": 3, "dg_weight_1st_order": 2.0},
                     "classifier.md": {"num_inference_steps": 3},
                     "sequence_aware_ddpm.md": {"num_inference_steps": 20}}
    out = {}
    for template, source in folders.items():
        folder = root / template.replace(".md", "")
        shutil.copytree(source, folder)
        info = ModelCardInfo(title="t", description="d", template=template, usage=usage[template],
                             sample_kwargs=sample_kwargs[template], tags=["edm"])
        guides = template in ("discriminator.md", "classifier.md")
        config = {"pretrained_model_name_or_path": "someone/edm-digits"} if guides else {}
        write_model_card(str(folder), info, str(folder), datasets=["someone/digits"], training_config=config)
        out[template] = folder
    return out


def model_inputs():
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0.5, 2.0])


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A discriminator and a classifier saved on their own (as the guidance scripts do without a score model), with
    the outputs of the package's class loading the folder (weights loaded from a file can take another kernel path
    than freshly initialised ones: on one thread the last bit differs)."""
    from diffusers_stf.hub import write_model_remote_code

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in {"discriminator": tiny_disc(12), "classifier": tiny_classifier(13)}.items():
        model.save_pretrained(root / name)
        write_model_remote_code(model, str(root / name))
        loaded = type(model).from_pretrained(root / name)
        assert type(loaded) is type(model)
        with torch.no_grad():
            out[name] = (root / name, loaded(*model_inputs())[0])
    return out


@pytest.fixture(scope="module")
def plain_run(saved, saved_models, cards, tmp_path_factory):
    """One process without diffusers_stf: samples every saved folder with plain diffusers and runs the first
    (plain-diffusers) snippet of every model card."""
    import shutil

    tmp = tmp_path_factory.mktemp("plain")
    folders = {name: (str(folder), kwargs) for name, (folder, kwargs, _, _) in saved.items()}
    # a Hub repo id, from the local Hub cache (offline): what `from_pretrained("namespace/name")` finds after a download
    cache = tmp / "hub_cache" / "models--h6user--guided"
    shutil.copytree(saved["guided"][0], cache / "snapshots" / ("a" * 40))
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("a" * 40)
    folders["guided_repo_id"] = ("h6user/guided", saved["guided"][1])
    shutil.copytree(saved["guided"][0], tmp / "guided_0_3_0")
    to_0_3_0_layout(tmp / "guided_0_3_0")  # a folder of version 0.3.0 beside the content-addressed ones
    folders["guided_0_3_0"] = (str(tmp / "guided_0_3_0"), saved["guided"][1])
    models = {name: str(folder) for name, (folder, _) in saved_models.items()}
    snippets = {template: python_blocks((folder / "README.md").read_text())[0] for template, folder in cards.items()}
    out_file = tmp / "samples.safetensors"
    result = run_blocked(tmp, f"""
        import json, sys
        import torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import save_file
        try:
            import diffusers_stf
            raise SystemExit("diffusers_stf is importable")
        except ImportError:
            pass
        out, types = {{}}, {{}}
        for name, (folder, kwargs) in json.loads({json.dumps(json.dumps(folders))}).items():
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator().manual_seed(7)
            kwargs = {{k: torch.tensor(v) if k == "class_labels" else v for k, v in kwargs.items()}}
            out[name] = pipe(batch_size=2, generator=generator, output_type="pt", **kwargs).images.contiguous()
            types[name] = {{k: type(v).__module__ + "." + type(v).__name__ for k, v in pipe.components.items()}}
        from diffusers import AutoModel
        x, sigma = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0.5, 2.0])
        for name, folder in json.loads({json.dumps(json.dumps(models))}).items():
            model = AutoModel.from_pretrained(folder, trust_remote_code=True)
            with torch.no_grad():
                out["model_" + name] = model(x, sigma)[0].contiguous()
            types["model_" + name] = type(model).__module__ + "." + type(model).__name__
        save_file(out, {str(out_file)!r})
        snippets = {{}}
        for template, code in json.loads({json.dumps(json.dumps(snippets))}).items():
            scope = {{}}
            exec(compile(code, template, "exec"), scope)
            snippets[template] = len(scope["images"])
        assert not any(m.split(".")[0] == "diffusers_stf" for m in sys.modules)
        print(json.dumps({{"types": types, "snippets": snippets}}))
    """, HF_HUB_CACHE=str(tmp / "hub_cache"))
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr, json.loads(result.stdout.strip().splitlines()[-1]), load_file(out_file)


def test_plain_diffusers_loads_every_folder_and_samples_the_same_images(saved, saved_models, plain_run):
    stderr, report, remote = plain_run
    assert "Expected types" not in stderr  # the pipeline's annotations name the classes it was given
    types = report["types"]
    for name, (_, _, ours, pipe) in saved.items():
        assert torch.equal(remote[name], ours.contiguous()), name
        for component, value in pipe.components.items():
            if value is not None:
                assert types[name][component].endswith("." + type(value).__name__)
    assert torch.equal(remote["guided_repo_id"], saved["guided"][2])
    assert torch.equal(remote["guided_0_3_0"], saved["guided"][2])
    # each folder's classes come from its own module: the unhashed name of 0.3.0, the hashed one of today
    local = "diffusers_modules.local"
    assert types["guided_0_3_0"]["scheduler"] == f"{local}.pipeline_discriminator_guided.EDMHeunScheduler"
    hashed = json.loads((saved["guided"][0] / "model_index.json").read_text())["_class_name"][0]
    assert types["guided"]["scheduler"] == f"{local}.{hashed}.EDMHeunScheduler"
    for name, (_, ours) in saved_models.items():  # a model saved alone: diffusers' AutoModel
        assert torch.equal(remote["model_" + name], ours), name
        assert types["model_" + name].startswith("diffusers_modules.")
    assert types["guided"]["discriminator"].startswith("diffusers_modules.")
    assert types["augment_unet"]["unet"].startswith("diffusers_modules.")


# Two runs compared in one notebook: each folder keeps its own code in diffusers' module cache
TWO_RUNS = {  # name -> (pipeline factory, call kwargs)
    "first": (lambda: DiscriminatorGuidedPipeline(make_tiny_unet(30), EDMHeunScheduler(), tiny_disc(31)),
              {"num_inference_steps": 4, "dg_weight_1st_order": 2.0}),
    "same_code": (lambda: DiscriminatorGuidedPipeline(make_tiny_unet(32), EDMHeunScheduler(), tiny_disc(33)),
                  {"num_inference_steps": 4, "dg_weight_1st_order": 2.0}),
    "other_code": (lambda: DiscriminatorGuidedPipeline(make_tiny_unet(34), EDMStochasticScheduler(s_churn=40.0),
                                                       tiny_disc(35), tiny_classifier(36)),
                   {"num_inference_steps": 4, "dg_weight_1st_order": 1.0, "classifier_guidance_scale": 2.0,
                    "class_labels": [0, 2]}),
}

LOAD_AND_SAMPLE = """
import json, sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

cases, out_file = json.loads(sys.argv[1]), sys.argv[2]


def load(name):
    return DiffusionPipeline.from_pretrained(cases[name][0], trust_remote_code=True)


def draw(name, pipe):
    code = vars(sys.modules[type(pipe).__module__])  # where the pipeline's methods look their names up
    for component in ("scheduler", "discriminator"):
        cls = type(getattr(pipe, component))
        assert code[cls.__name__] is cls, f"{name}: its module binds another {cls.__name__} than its {component}'s"
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: torch.tensor(v) if k == "class_labels" else v for k, v in cases[name][1].items()}
    return pipe(batch_size=2, generator=torch.Generator().manual_seed(7), output_type="pt", **kwargs).images


samples, modules = {}, {}
for name in cases:  # each folder alone: loaded into fresh modules, sampled, and its modules dropped again
    samples["alone_" + name] = draw(name, load(name)).contiguous()
    for module in [m for m in sys.modules if m.startswith("diffusers_modules.local.")]:
        del sys.modules[module]
pipes = {name: load(name) for name in cases}  # then every folder, before any samples
for name, pipe in pipes.items():
    samples["together_" + name] = draw(name, pipe).contiguous()
    modules[name] = type(pipe).__module__
save_file(samples, out_file)
print(json.dumps(modules))
"""


def test_two_guided_folders_in_one_process_each_sample_as_when_loaded_alone(tmp_path):
    """Issue 20, fault 1: with plain diffusers, loading a second folder made the first pipeline refuse its own
    scheduler (the module both named was executed again) or run the second folder's code (the file was replaced).

    One process without the package: each folder loaded alone and sampled, then all loaded, then each sampled."""
    cases, ours = {}, {}
    for name, (make, kwargs) in TWO_RUNS.items():
        pipe = make()
        pipe.save_pretrained(tmp_path / name)
        cases[name] = (str(tmp_path / name), kwargs)
        ours[name] = sample(pipe, kwargs)
    run = run_blocked(tmp_path, LOAD_AND_SAMPLE, args=(json.dumps(cases), str(tmp_path / "out.st")))
    assert run.returncode == 0, run.stderr[-4000:]
    modules = json.loads(run.stdout.strip().splitlines()[-1])
    samples = load_file(tmp_path / "out.st")
    for name in cases:
        assert torch.equal(samples["together_" + name], samples["alone_" + name]), name
        assert torch.equal(samples["alone_" + name], ours[name]), name  # and the package's own classes agree
    assert not torch.equal(samples["together_first"], samples["together_same_code"])  # each folder's own weights
    # the same code shares one module; other code has its own
    assert modules["first"] == modules["same_code"] != modules["other_code"]


def to_0_3_0_layout(folder):
    """Rewrite a folder into the layout version 0.3.0 wrote: each code file named after its module alone
    (``pipeline_discriminator_guided.py``, ``scheduler/scheduling_edm_heun.py``), the component files importing that
    name."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    hashed = index["_class_name"][0]
    plain = hashed.rpartition("_")[0]
    (folder / f"{hashed}.py").rename(folder / f"{plain}.py")
    index["_class_name"][0] = plain
    for component, value in index.items():
        if component.startswith("_") or not isinstance(value, list) or value[0] in ("diffusers", None):
            continue
        shim = folder / component / f"{value[0]}.py"
        component_plain = value[0].rpartition("_")[0]
        (folder / component / f"{component_plain}.py").write_text(shim.read_text().replace(hashed, plain))
        shim.unlink()
        index[component] = [component_plain, value[1]]
    index_path.write_text(json.dumps(index, indent=2))


def to_release_layout(folder):
    """Rewrite a folder into what release 0.1.0 wrote: ``["diffusers_stf", Class]`` and no code files."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = index["_class_name"][1]
    for component, value in index.items():
        if isinstance(value, list) and value[0] not in ("diffusers", None):
            (folder / component / f"{value[0]}.py").unlink()
            index[component] = ["diffusers_stf", value[1]]
    for path in folder.glob("*.py"):
        path.unlink()
    index_path.write_text(json.dumps(index, indent=2))


@pytest.mark.parametrize("name", ["guided", "edm_stochastic", "augment_unet"])
def test_package_loads_new_and_release_folders_with_its_own_classes(saved, tmp_path, name):
    folder, kwargs, ours, pipe = saved[name]
    cls = type(pipe)
    loaded = cls.from_pretrained(folder)
    assert type(loaded) is cls
    for component, value in pipe.components.items():
        assert type(loaded.components[component]) is type(value)
    assert torch.equal(sample(loaded, kwargs), ours)
    assert loaded.name_or_path == str(folder)

    import shutil

    release = tmp_path / "release"
    shutil.copytree(folder, release)
    to_release_layout(release)
    assert not list(release.rglob("*.py"))
    for loader in {cls, DiscriminatorGuidedPipeline}:
        again = loader.from_pretrained(release)
        assert type(again.scheduler) is type(pipe.scheduler)
        assert type(again.unet) is type(pipe.unet)
    assert torch.equal(sample(cls.from_pretrained(release), kwargs), ours)

    layout_0_3_0 = tmp_path / "layout_0_3_0"
    shutil.copytree(folder, layout_0_3_0)
    to_0_3_0_layout(layout_0_3_0)
    again = cls.from_pretrained(layout_0_3_0)
    assert {k: type(v) for k, v in again.components.items()} == {k: type(v) for k, v in pipe.components.items()}
    assert torch.equal(sample(again, kwargs), ours)


def test_bad_input_messages(saved, tmp_path):
    from diffusers import DiffusionPipeline

    folder = saved["edm_heun"][0]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)
    # a folder without code files: diffusers' own message
    import shutil

    release = tmp_path / "release"
    shutil.copytree(folder, release)
    to_release_layout(release)
    with pytest.raises(AttributeError, match="EDMPipeline"):
        DiffusionPipeline.from_pretrained(release, trust_remote_code=True)
    # neither a folder nor in the Hub cache (offline)
    with pytest.raises(OSError) as err:
        EDMPipeline.from_pretrained("nobody-h6/not-a-model", cache_dir=str(tmp_path / "empty_cache"),
                                    local_files_only=True)
    message = str(err.value)
    assert "no such folder" in message and "local Hub cache" in message


# ---------------------------------------------------------------------------------------------------------------------
# Model cards


def test_model_cards_carry_metadata_the_hub_parses(cards):
    import re

    from huggingface_hub import ModelCard

    for template, folder in cards.items():
        card = ModelCard.load(str(folder / "README.md"))
        data = card.data
        assert data.library_name == "diffusers" and data.license == "apache-2.0"
        assert data.pipeline_tag == "unconditional-image-generation"
        assert {"diffusers", "diffusers_stf", "edm"} <= set(data.tags)
        assert data.datasets == ["someone/digits"]
        guides = template in ("discriminator.md", "classifier.md")
        assert data.base_model == ("someone/edm-digits" if guides else None)
        # how to install today (not on PyPI yet: a checkout or its wheel), and the index name only as a promise
        assert "not on PyPI yet" in card.text and "`pip install .` in a checkout" in card.text, template
        assert "`pip install dist/diffusers_stf-*.whl`" in card.text and "pip install -e" not in card.text
        assert card.text.count("pip install diffusers-stf") == 1, template
        assert "pip install diffusers-stf` once it is published" in card.text, template
        assert not re.search(r"https://github\.com/?(?=[\s)\]]|$)", card.text), template
        blocks = python_blocks(card.text)
        assert len(blocks) == 2, template
        remote = template != "sequence_aware_ddpm.md"
        flag = ", trust_remote_code=True" if remote else ""
        assert f'DiffusionPipeline.from_pretrained("{folder}"{flag})' in blocks[0]
        assert "diffusers_stf" not in blocks[0] and ("diffusers_stf" in blocks[1]) == remote


def test_card_datasets_and_base_model_take_only_hub_ids(tmp_path, saved):
    from diffusers_stf.training.model_card import ModelCardInfo, hub_dataset_ids, hub_id_of, write_model_card

    assert hub_dataset_ids(str(tmp_path)) is None and hub_dataset_ids(None) is None
    assert hub_dataset_ids("someone/digits") == ["someone/digits"]
    with pytest.raises(ValueError, match="datasets must be Hub dataset ids"):
        write_model_card(str(saved["edm_heun"][0]), ModelCardInfo(), "x/y", datasets=[str(tmp_path)])
    snapshot = tmp_path / "hub" / "models--someone--edm" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id_of(str(snapshot)) == "someone/edm"
    assert hub_id_of(str(tmp_path)) is None and hub_id_of("someone/edm") == "someone/edm"


def test_every_card_snippet_runs_against_its_local_folder(cards, plain_run):
    """The plain-diffusers snippet in a process without diffusers_stf (``plain_run``), the package snippet here."""
    assert plain_run[1]["snippets"] == {template: 16 for template in cards}
    for template, folder in cards.items():
        package = python_blocks((folder / "README.md").read_text())[1]
        scope = {}
        exec(compile(package, template, "exec"), scope)
        assert len(scope["images"]) == 2


# ---------------------------------------------------------------------------------------------------------------------
# --push_to_hub: fail early, retry cleanly (offline, with a stand-in for HfApi)


class RecordingHfApi:
    """Records the calls a push makes; ``fail`` names a method that raises."""

    def __init__(self, fail=None, user="me"):
        self.calls, self.fail, self.user = [], fail, user

    def _call(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if name == self.fail:
            raise ConnectionError(f"{name}: the Hub cannot be reached")

    def whoami(self, token=None):
        self._call("whoami", token=token)
        return {"name": self.user}

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id, **kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs):
        self._call("upload_folder", **kwargs)
        return "commit"


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


def test_hub_settings_are_checked_before_training(offline):
    from diffusers_stf.hub.push import check_hub_settings

    assert check_hub_settings(False, None, None, "out/run") is None
    with pytest.raises(ValueError, match="token"):
        check_hub_settings(True, "me/run", None, "out/run")
    api = RecordingHfApi(user="alice")
    assert check_hub_settings(True, None, "hf_x", "out/my-run", api=api) == "alice/my-run"
    assert check_hub_settings(True, "bob/run", "hf_x", "out", api=RecordingHfApi(fail="whoami")) == "bob/run"
    with pytest.raises(ValueError, match="namespace"):
        check_hub_settings(True, None, "hf_x", "out/run", api=RecordingHfApi(fail="whoami"))
    for bad in ("a/b/c", "me/bad name", "me/-run"):
        with pytest.raises(ValueError, match="hub_model_id"):
            check_hub_settings(True, bad, "hf_x", "out", api=api)


def test_repo_is_created_early_and_a_failed_upload_keeps_files_and_prints_the_retry(offline, saved, tmp_path,
                                                                                    monkeypatch, capsys):
    import shutil

    import diffusers_stf.hub.push as hub
    from diffusers_stf import push

    api = RecordingHfApi()
    assert hub.create_repo_early("me/run", "hf_x", private=True, api=api) == "me/run"
    assert api.calls == [("create_repo", ("me/run",), {"private": True, "exist_ok": True, "repo_type": "model"})]
    with pytest.raises(SystemExit, match="cannot create the Hub repo 'me/run'"):
        hub.create_repo_early("me/run", "hf_x", api=RecordingHfApi(fail="create_repo"))

    folder = tmp_path / "run"
    shutil.copytree(saved["edm_heun"][0], folder)
    (folder / "README.md").write_text(f'pipeline = DiffusionPipeline.from_pretrained("{folder}")\n')
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(SystemExit) as err:
        hub.push_or_explain(str(folder), "me/run", "hf_x", api=RecordingHfApi(fail="upload_folder"))
    message = str(err.value.code)
    retry = f"python -m diffusers_stf.push {folder} --hub_model_id me/run"
    assert "failed (ConnectionError" in message and message.rstrip().endswith(retry)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before

    # the printed command, run as printed (the module's main), uploads the folder and points the card at the repo
    retried = RecordingHfApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: retried)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(hub, "_token", lambda token: token or "hf_x")
    assert push.main(retry.split()[3:]) == "me/run"
    names = [c[0] for c in retried.calls]
    assert names == ["create_repo", "create_repo", "upload_folder"]
    upload = retried.calls[-1][2]
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "me/run"
    assert "checkpoint-*" in upload["ignore_patterns"]
    assert '"me/run"' in (folder / "README.md").read_text()
    with pytest.raises(SystemExit, match="not a folder"):
        push.main([str(tmp_path / "missing"), "--hub_model_id", "me/run"])


def test_the_retry_points_a_card_written_for_a_local_folder_at_the_repo(saved, tmp_path, monkeypatch):
    """A run's card names its folder relatively or by name, never by its absolute path; the retry of a push, from
    any working directory, points every snippet naming that folder at the repo and leaves other folders alone."""
    import re
    import shutil

    from diffusers_stf.hub.push import point_card_at_repo
    from diffusers_stf.training.model_card import ModelCardInfo, local_name, write_model_card

    usage = 'from diffusers_stf import EDMPipeline\npipeline = EDMPipeline.from_pretrained("{repo}")\n' \
            'guide = EDMPipeline.from_pretrained("runs/stf-guide")'
    (tmp_path / "elsewhere").mkdir()
    for cwd, expected in ((tmp_path, "runs/stf"), (tmp_path / "elsewhere", "stf")):
        folder = tmp_path / "runs" / "stf"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(saved["edm_heun"][0], folder)
        monkeypatch.chdir(cwd)
        name = local_name(str(folder))
        assert name == expected
        write_model_card(str(folder), ModelCardInfo(usage=usage), name)
        text = (folder / "README.md").read_text()
        snippets = "".join(re.findall(r"```python\n(.*?)```", text, re.S))
        assert str(tmp_path) not in snippets and snippets.count(f'from_pretrained("{expected}"') == 2
        monkeypatch.chdir(tmp_path / "elsewhere" if cwd == tmp_path else tmp_path)  # the retry runs elsewhere
        assert point_card_at_repo(str(folder), "me/stf")
        text = (folder / "README.md").read_text()
        assert text.count('from_pretrained("me/stf"') == 2 and f'from_pretrained("{expected}"' not in text
        assert 'from_pretrained("runs/stf-guide")' in text
        assert not point_card_at_repo(str(folder), "me/stf")


def load_example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"h6_{name}", os.path.join(REPO_ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_STF = ["--block_out_channels", "8,16", "--train_batch_size", "16", "--stf_reference_batch_size", "48",
            "--max_train_steps", "2", "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar",
            "--logging_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "0"]


def test_training_script_push_fails_before_training_or_keeps_the_run_and_prints_the_retry(offline, tmp_path,
                                                                                           monkeypatch):
    import diffusers_stf.hub.push as hub

    train_stf = load_example("train_stf")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="token"):  # no token: refused while parsing, nothing written
        train_stf.main(["--output_dir", str(out), "--push_to_hub", *TINY_STF])
    assert not out.exists() or not any(out.rglob("*.safetensors"))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")  # as after `hf auth login`
    refused = RecordingHfApi(fail="create_repo", user="alice")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: refused)
    with pytest.raises(SystemExit, match="cannot create the Hub repo 'alice/run'"):
        train_stf.main(["--output_dir", str(out), "--push_to_hub", *TINY_STF])  # default id: alice/<output_dir>
    assert not any(out.rglob("*.safetensors")) and not (out / "samples.png").exists()  # nothing was trained

    out = tmp_path / "run2"
    api = RecordingHfApi(fail="upload_folder", user="alice")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    with pytest.raises(SystemExit) as err:
        train_stf.main(["--output_dir", str(out), "--push_to_hub", "--hub_model_id", "alice/stf-digits", *TINY_STF])
    assert [c[0] for c in api.calls] == ["create_repo", "create_repo", "upload_folder"]  # early, then exist_ok
    message = str(err.value.code)
    assert message.rstrip().endswith(f"python -m diffusers_stf.push {out} --hub_model_id alice/stf-digits")
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md", "samples.png"):
        assert (out / name).is_file(), name
    assert 'from_pretrained("alice/stf-digits", trust_remote_code=True)' in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# The wheel: built with `python -m build`, installed outside the source tree, trains with every script


TRAINING_RUNS = {  # script -> arguments of a few-step run on the 8x8 digits
    "train_stf.py": ["--block_out_channels", "8,16", "--train_batch_size", "16", "--stf_reference_batch_size", "48",
                     "--max_train_steps", "2", "--num_validation_images", "4", "--num_inference_steps", "2",
                     "--logging_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "0"],
    "train_sequence_aware.py": ["--block_out_channels", "8,16", "--norm_num_groups", "4", "--max_train_steps", "2",
                                "--train_batch_size", "16", "--num_validation_images", "4", "--num_inference_steps",
                                "2", "--checkpointing_steps", "0", "--validation_steps", "0", "--logging_steps", "1",
                                "--sa_k", "3", "--num_train_timesteps", "100"],
    "train_score_model.py": ["--block_out_channels", "8,16", "--norm_num_groups", "4", "--max_train_steps", "2",
                             "--train_batch_size", "16", "--num_validation_images", "4", "--num_inference_steps", "3",
                             "--steps_per_level", "2", "--checkpointing_steps", "0", "--logging_steps", "1"],
    "train_discriminator.py": ["--pretrained_model_name_or_path", "{train_stf}", "--max_train_steps", "2",
                               "--num_fake_images", "48", "--generation_steps", "2", "--num_inference_steps", "2",
                               "--num_validation_images", "4", "--validation_steps", "0", "--checkpointing_steps", "0",
                               "--disc_block_out_channels", "8,16", "--disc_norm_num_groups", "4",
                               "--train_batch_size", "16", "--report_to", "none", "--num_heldout_images", "16"],
    "train_classifier.py": ["--pretrained_model_name_or_path", "{train_stf}", "--max_train_steps", "2",
                            "--num_validation_images", "4", "--validation_steps", "0", "--checkpointing_steps", "0",
                            "--clf_block_out_channels", "8,16", "--clf_norm_num_groups", "4", "--train_batch_size",
                            "16", "--report_to", "none", "--num_heldout_images", "16", "--num_inference_steps", "2"],
}

WHEEL_DRIVER = """
import importlib.util, json, os, sys
import torch
import diffusers_stf
from huggingface_hub import ModelCard

venv, examples, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
assert os.path.realpath(diffusers_stf.__file__).startswith(os.path.realpath(venv)), diffusers_stf.__file__
torch.set_num_threads(1)
outputs = {}
for script, args in runs.items():
    out = os.path.join(os.getcwd(), script[:-3])
    args = [a.format(**outputs) for a in args] + ["--output_dir", out, "--no_progress_bar"]
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(examples, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args)
    card = ModelCard.load(os.path.join(out, "README.md"))  # rendered from the wheel's templates
    assert card.data.library_name == "diffusers", script
    outputs[script[:-3]] = out
print(json.dumps(outputs))
"""


def test_wheel_installs_outside_the_tree_and_every_script_trains_a_folder_plain_diffusers_loads(tmp_path):
    import glob
    import shutil
    import sysconfig
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO_ROOT, name), src / name)
    shutil.copytree(os.path.join(REPO_ROOT, "diffusers_stf"), src / "diffusers_stf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # offline: the build backend of this environment, no isolated download (its setuptools needs no `wheel`)
    build = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                            "--outdir", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for template in os.listdir(os.path.join(REPO_ROOT, "diffusers_stf", "model_cards")):
        assert f"diffusers_stf/model_cards/{template}" in names
    assert "diffusers_stf/hub/bundle.py" in names and "diffusers_stf/push.py" in names
    assert not any(n.startswith(("examples/", "tests/")) for n in names)

    # a fresh virtual environment that reuses the installed dependencies of this one (offline), not its
    # editable diffusers_stf: a plain path entry, so the editable finder's .pth is not processed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT)
    venv_python = str(venv / "bin" / "python")
    venv_site = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(venv_site, "_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", venv_python, "install", "--no-deps",
                              "--no-index", wheel], capture_output=True, text=True, timeout=TIMEOUT)
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    trained = subprocess.run([venv_python, "-c", WHEEL_DRIVER, str(venv), os.path.join(REPO_ROOT, "examples"),
                              json.dumps(TRAINING_RUNS)], cwd=work, env=env, capture_output=True, text=True,
                             timeout=2 * TIMEOUT)  # five training runs
    assert trained.returncode == 0, trained.stderr[-4000:]
    outputs = json.loads(trained.stdout.strip().splitlines()[-1])
    assert set(outputs) == {script[:-3] for script in TRAINING_RUNS}

    loaded = run_blocked(tmp_path, f"""
        import json
        import torch
        from diffusers import DiffusionPipeline
        for script, folder in json.loads({json.dumps(json.dumps(outputs))}).items():
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            image = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                         output_type="np").images[0]
            assert image.shape[-1] == 1 and torch.isfinite(torch.as_tensor(image)).all(), script
            print(script, type(pipe).__name__)
    """)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert len(loaded.stdout.strip().splitlines()) == len(TRAINING_RUNS)
