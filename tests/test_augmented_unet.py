"""EDM's augmentation conditioning is a network input of its own, apart from class conditioning (NVlabs' label_dim and
augment_dim): an augmentation-conditioned UNet2DModel with zero augmentation labels is exactly the UNet2DModel with the
same weights, whatever the classes; folders of the layout that stored the augmentation width in num_class_embeds load."""

import json

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from diffusers_stf import AugmentConditionedUNet2DModel, DiscriminatorGuidedPipeline, EDMHeunScheduler, EDMPipeline
from diffusers_stf.models import NoiseConditionalClassifier

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            add_attention=False, norm_num_groups=4)


def twins(num_class_embeds=None, seed=0):
    """A UNet2DModel and the augmentation-conditioned UNet carrying the same weights (plus its augmentation map)."""
    torch.manual_seed(seed)
    plain = UNet2DModel(**UNET, num_class_embeds=num_class_embeds)
    augmented = AugmentConditionedUNet2DModel(**UNET, num_class_embeds=num_class_embeds, augment_dim=9)
    state = {k.replace("class_embedding.", "class_embedding.labels."): v for k, v in plain.state_dict().items()}
    missing, unexpected = augmented.load_state_dict(state, strict=False)
    assert missing == ["class_embedding.augment.weight"] and not unexpected
    return plain, augmented


@pytest.mark.parametrize("num_class_embeds", [None, 10])
def test_zero_augmentation_labels_give_the_plain_unet(num_class_embeds):
    plain, augmented = twins(num_class_embeds)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, -0.5, 1.0])
    labels = None if num_class_embeds is None else torch.tensor([0, 9, 4])
    assert torch.equal(augmented(x, t, class_labels=labels).sample, plain(x, t, class_labels=labels).sample)
    moved = augmented(x, t, class_labels=labels, augment_labels=torch.randn(3, 9)).sample
    assert not torch.allclose(moved, plain(x, t, class_labels=labels).sample)
    assert augmented.config.num_class_embeds == num_class_embeds and augmented.config.augment_dim == 9


def test_classifier_guidance_on_an_augmentation_conditioned_unet():
    """The classes of classifier guidance are the classifier's (10 here), not the augmentation width (9): label 9 is
    valid, and the guided samples are those of the plain UNet with the same weights."""
    plain, augmented = twins(None, seed=1)
    torch.manual_seed(2)
    classifier = NoiseConditionalClassifier(sample_size=8, in_channels=1, num_classes=10, block_out_channels=(8, 16),
                                            norm_num_groups=4)
    labels = torch.tensor([9, 0, 5])
    kwargs = dict(batch_size=3, num_inference_steps=4, output_type="pt", class_labels=labels,
                  classifier_guidance_scale=2.0)
    images = []
    for unet in (augmented, plain):
        pipe = DiscriminatorGuidedPipeline(unet, EDMHeunScheduler(), classifier=classifier)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(generator=torch.Generator().manual_seed(0), **kwargs).images)
    assert torch.equal(images[0], images[1])
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 9\]"):
        pipe(generator=torch.Generator().manual_seed(0), **{**kwargs, "class_labels": torch.tensor([10, 0, 1])})


def test_a_folder_that_stored_the_augmentation_width_in_num_class_embeds_loads(tmp_path):
    _, model = twins(None, seed=3)
    pipe = EDMPipeline(model, EDMHeunScheduler())
    pipe.save_pretrained(tmp_path / "new")
    folder = tmp_path / "new" / "unet"
    config = json.loads((folder / "config.json").read_text())
    config["num_class_embeds"] = config.pop("augment_dim")  # the older layout: one embedding, the augmentation map
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    weights["class_embedding.weight"] = weights.pop("class_embedding.augment.weight")
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")

    loaded = AugmentConditionedUNet2DModel.from_pretrained(folder)
    assert loaded.config.augment_dim == 9 and loaded.config.num_class_embeds is None
    x, t, a = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 0.7]), torch.randn(2, 9)
    assert torch.equal(loaded(x, t, augment_labels=a).sample, model(x, t, augment_labels=a).sample)
    reloaded = EDMPipeline.from_pretrained(tmp_path / "new")
    assert not reloaded.unet_is_conditional
    assert torch.equal(reloaded.unet(x, t, augment_labels=a).sample, model(x, t, augment_labels=a).sample)


def test_bad_augmentation_input():
    _, model = twins(None)
    with pytest.raises(ValueError, match=r"augment_labels must have shape \(2, 9\)"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(2), augment_labels=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="not class-conditional"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(2), class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="augment_dim must be an integer >= 1"):
        AugmentConditionedUNet2DModel(**UNET, augment_dim=0)
