"""Unconditional sampling of a preconditioned ``UNet2DModel`` with the EDM schedulers."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..schedulers import EDMHeunScheduler


class EDMPipeline(DiffusionPipeline):
    """Sample a ``UNet2DModel`` with :class:`EDMHeunScheduler` or :class:`EDMStochasticScheduler` (EDM Algorithms 1
    and 2). The latents are kept in float64 as in EDM; the network runs in its own dtype. The loop is the standard
    diffusers one, so the score-based schedulers (``AnnealedLangevinScheduler``, ``PredictorCorrectorScheduler``) work too.

    Args:
        unet: the raw network F of the scheduler's preconditioning (EDM's F for ``edm``, ε for ``ddpm``/``vp``).
        scheduler: an EDM scheduler.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: EDMHeunScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        """Save as diffusers does, then name our components ``["diffusers_stf", "<Class>"]`` in ``model_index.json``.

        diffusers records the defining module (``diffusers_stf.schedulers.scheduling_edm_heun``), which would make our
        internal file layout part of the on-disk format; the package re-exports every component class instead.
        """
        super().save_pretrained(save_directory, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        for name, value in index.items():
            if isinstance(value, list) and value and isinstance(value[0], str) and value[0].startswith("diffusers_stf."):
                index[name] = ["diffusers_stf", value[1]]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load from a local folder written by ``save_pretrained``, or from a Hub repo id.

        A repo id is downloaded first with ``huggingface_hub.snapshot_download`` and then loaded from the local snapshot:
        diffusers' own download step cannot resolve components defined in an installed package. ``revision``,
        ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go to the download; all other keyword
        arguments (e.g. ``discriminator=None``, ``torch_dtype``) go to ``DiffusionPipeline.from_pretrained``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            download_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download")
            download_kwargs = {k: kwargs.pop(k) for k in download_keys if k in kwargs}
            path = snapshot_download(path, **download_kwargs)
        return super().from_pretrained(path, **kwargs)

    def _check_inputs(self, batch_size: int, num_inference_steps: int, output_type: str):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")

    def prepare_latents(self, batch_size, generator, latents=None) -> torch.Tensor:
        """Initial noise x_0 ~ N(0, init_noise_sigma²) in float64 (EDM Algorithm 1 line 2)."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=self.device, dtype=torch.float64) * self.scheduler.init_noise_sigma

    def model_output(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels=None) -> torch.Tensor:
        """The raw network output F at the scheduler's current evaluation."""
        model_input = self.scheduler.scale_model_input(sample, timestep).to(self.unet.dtype)
        t = timestep.to(device=self.device, dtype=torch.float32).expand(sample.shape[0])
        return self.unet(model_input, t, class_labels=class_labels).sample

    def postprocess(self, sample: torch.Tensor, output_type: str):
        """[-1, 1] float64 samples to ``pt`` ([0,1] NCHW float32), ``np`` ([0,1] NHWC) or ``pil``."""
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
            output_type: ``pil``, ``np`` or ``pt``.
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        self._check_inputs(batch_size, num_inference_steps, output_type)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        sample = self.prepare_latents(batch_size, generator, latents)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.model_output(sample, t, class_labels)
            sample = self.scheduler.step(out, t, sample, generator=generator).prev_sample
        image = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
