"""Unconditional sampling of a preconditioned ``UNet2DModel`` with the EDM schedulers."""

from __future__ import annotations

import numbers
from typing import List, Optional, Tuple, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..remote_code import RemoteCodeMixin
from ..schedulers import EDMHeunScheduler


def _as_int(value, name: str) -> int:
    """A python int >= 1 from an int, a numpy integer or a 0-d integer tensor; ValueError otherwise (bools too)."""
    if torch.is_tensor(value) and value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class EDMPipeline(RemoteCodeMixin, DiffusionPipeline):
    """Sample a ``UNet2DModel`` with :class:`EDMHeunScheduler` or :class:`EDMStochasticScheduler` (EDM Algorithms 1
    and 2). The latents are kept in float64 as in EDM; the network runs in its own dtype. The loop is the standard
    diffusers one, so the score-based schedulers (``AnnealedLangevinScheduler``, ``PredictorCorrectorScheduler``) work too.
    ``save_pretrained`` writes the code files that let ``DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`` load the folder without this package (see
    :class:`~diffusers_stf.remote_code.RemoteCodeMixin`).

    Args:
        unet: the raw network F of the scheduler's preconditioning (EDM's F for ``edm``, ε for ``ddpm``/``vp``).
        scheduler: an EDM scheduler.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: EDMHeunScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _check_inputs(self, batch_size, num_inference_steps, output_type: str, generator=None) -> Tuple[int, int]:
        """Validated ``(batch_size, num_inference_steps)`` as python ints (numpy and 0-d tensor integers accepted)."""
        batch_size = _as_int(batch_size, "batch_size")
        num_inference_steps = _as_int(num_inference_steps, "num_inference_steps")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the batch has {batch_size} images; "
                "pass one generator per image, or a single generator"
            )
        return batch_size, num_inference_steps

    @property
    def sample_dtype(self) -> torch.dtype:
        """float64 for the schedulers of this package (EDM keeps its state in float64), the network's dtype for
        diffusers' own schedulers (as diffusers' pipelines do)."""
        own = not type(self.scheduler).__module__.startswith("diffusers.")  # ours, or its remote-code copy
        return torch.float64 if own else self.unet.dtype

    def prepare_latents(self, batch_size, generator, latents=None) -> torch.Tensor:
        """Initial noise x_0 ~ N(0, init_noise_sigma²) (EDM Algorithm 1 line 2), in :attr:`sample_dtype`."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        dtype = self.sample_dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32 if dtype == torch.float64 else dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=self.device, dtype=dtype) * self.scheduler.init_noise_sigma

    def model_output(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels=None) -> torch.Tensor:
        """The raw network output (F, ε, x₀ or v) at the scheduler's current evaluation. ``class_labels`` reach the
        UNet only when it is class-conditional."""
        model_input = self.scheduler.scale_model_input(sample, timestep).to(self.unet.dtype)
        t = timestep.to(device=self.device, dtype=torch.float32).expand(sample.shape[0])
        return self.unet(model_input, t, class_labels=class_labels if self.unet_is_conditional else None).sample

    @property
    def unet_is_conditional(self) -> bool:
        config = self.unet.config
        return config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None

    @staticmethod
    def check_finite(sample: torch.Tensor) -> torch.Tensor:
        """Once at the end of sampling (never inside a step, where it would wait for the device): NaN is an error."""
        if bool(torch.isnan(sample).any()):
            raise ValueError(
                "sampling produced NaN: check that the scheduler's parametrisation (preconditioning, prediction_type, "
                "beta schedule) is the one the UNet was trained with, and the guidance weights"
            )
        return sample

    def postprocess(self, sample: torch.Tensor, output_type: str):
        """[-1, 1] float64 samples to ``pt`` ([0,1] NCHW float32), ``np`` ([0,1] NHWC) or ``pil``; ``latent`` is the
        final sample itself, unclamped, as diffusers pipelines return it."""
        if output_type == "latent":
            return sample
        image = (sample / 2 + 0.5).clamp(0, 1).to(torch.float32)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 18,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images.

        Args:
            batch_size: number of images.
            num_inference_steps: sampler steps N (EDM Heun: 2N − 1 network evaluations; 18 steps = 35 NFE).
            generator: ``torch.Generator`` (or a list, one per image) for the latents and the churn noise.
            latents: standard-normal latents of shape (batch, C, H, W) to start from, instead of drawing them.
            class_labels: passed to the UNet (class-conditional models).
            output_type: ``pil``, ``np``, ``pt`` or ``latent`` (the final sample, unclamped, in the sampling dtype).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        batch_size, num_inference_steps = self._check_inputs(batch_size, num_inference_steps, output_type, generator)
        if class_labels is not None and not self.unet_is_conditional:
            raise ValueError("class_labels were given but the unet is not class-conditional (num_class_embeds is None)")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sample = self.prepare_latents(batch_size, generator, latents)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.model_output(sample, t, class_labels)
            sample = self.scheduler.step(out, t, sample, generator=generator).prev_sample
        image = self.postprocess(self.check_finite(sample), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
