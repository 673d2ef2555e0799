"""Sampling of a preconditioned network under any scheduler, with guidance terms."""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..guidance import Autoguidance, ClassifierFreeGuidance, GuidanceTerm, GuidedEvaluation, check_interval
from ..hub import RemoteCodeMixin
from ..models.classifier import check_class_labels
from ..preconditioning import EvaluationFrame, Preconditioning, preconditioning_for
from ..schedulers import EDMHeunScheduler
from . import components

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _as_int(value, name: str) -> int:
    """A python int >= 1 from an int, a numpy integer or a 0-d integer tensor; ValueError otherwise (bools too)."""
    if torch.is_tensor(value) and value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def add_output_change(model_output: torch.Tensor, sample: torch.Tensor, denoised_change: torch.Tensor,
                      preconditioning: Preconditioning, sigma) -> torch.Tensor:
    """The model output with ΔF = ΔD/c_out(σ) added to its first C channels (a learned-variance network's extra
    channels are left alone), in the wider of the output's and the sample's dtypes."""
    guided = model_output.to(torch.promote_types(model_output.dtype, sample.dtype)).clone()
    channels = sample.shape[1]
    guided[:, :channels] += preconditioning.output_change(denoised_change, sigma).to(guided.dtype)
    return guided


def same_scalings(first: Preconditioning, second: Preconditioning) -> bool:
    """Whether two preconditionings relate the network to D(x; σ) alike: c_skip, c_out, c_in and c_noise agree over
    σ from 0.002 to 80."""
    sigma = torch.logspace(math.log10(0.002), math.log10(80.0), 9, dtype=torch.float64)
    return all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(first.scalings(sigma), second.scalings(sigma)))


def _saved_scheduler_config(model) -> Optional[dict]:
    """The scheduler config saved beside a model loaded from a pipeline folder (``<folder>/scheduler``), if any."""
    folder = model.config.get("_name_or_path")
    path = os.path.join(os.fspath(folder), "scheduler", "scheduler_config.json") \
        if isinstance(folder, (str, os.PathLike)) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class EDMPipeline(RemoteCodeMixin, DiffusionPipeline):
    """Sample a preconditioned network with :class:`EDMHeunScheduler` (EDM Algorithms 1 and 2) or any other
    scheduler of this package or of diffusers, optionally guided. The latents are kept in float64 with this package's
    schedulers, as in EDM; the network runs in its own dtype. ``save_pretrained`` writes the code files that let
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` load the folder without this package
    (:class:`~diffusers_stf.hub.RemoteCodeMixin`).

    Guidance enters as terms (:mod:`diffusers_stf.guidance`): at each network evaluation the active terms' ΔD(x, σ)
    are summed in EDM coordinates and written into the scheduler's own model output
    (:class:`~diffusers_stf.preconditioning.EvaluationFrame`), so the same term guides every scheduler.

    Classifier-free guidance (``guidance_scale``, Ho & Salimans 2022) needs a class-conditional network trained with
    label dropout, whose null label is ``null_class_label``; autoguidance (``autoguidance_scale``, Karras et al. 2024)
    needs a weaker ``guide_unet`` of the same task and parametrisation.

    Args:
        unet: the raw network F of the scheduler's preconditioning (EDM's F for ``edm``, ε for ``ddpm``/``vp``).
        scheduler: a scheduler.
        guide_unet: the autoguidance guide (optional): a smaller or shorter-trained network of the same data, image
            size, channels and preconditioning.
        null_class_label: the label index a class-conditional ``unet`` was trained with for "no class" (label
            dropout; the training scripts use the last index), which classifier-free guidance evaluates; None for a
            network without one.
        vae: for a latent model, the autoencoder whose decoder turns the sampled latents into images (optional).
        latent_scale, latent_bias: the per-channel map from the VAE's latents to the network's, latents = raw · scale
            + bias (EDM2's ``StabilityVAEEncoder``); decoding is image = vae.decode((latents − bias) / scale).
        vae_pixel_range: (lo, hi), the pixel range of the VAE's images: [-1, 1] (the default) as in Stable
            Diffusion, [0, 1] for EDM2's latent models.
    """

    model_cpu_offload_seq = "unet->guide_unet->vae"
    _optional_components = ["guide_unet", "vae"]
    component_library = components

    def __init__(self, unet: UNet2DModel, scheduler: EDMHeunScheduler, guide_unet: Optional[UNet2DModel] = None,
                 null_class_label: Optional[int] = None, vae: Optional[AutoencoderKL] = None,
                 latent_scale: Optional[List[float]] = None, latent_bias: Optional[List[float]] = None,
                 vae_pixel_range: Optional[Tuple[float, float]] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, guide_unet=guide_unet, vae=vae)
        self.register_to_config(null_class_label=null_class_label, latent_scale=latent_scale, latent_bias=latent_bias,
                                vae_pixel_range=vae_pixel_range)
        if vae is not None or latent_scale is not None or latent_bias is not None:
            self._check_latent_decoding()
        self._check_conditioning()

    # --------------------------------------------------------------------------------------------------------------
    # Components and labels

    def _check_conditioning(self):
        """The null label is one of the network's labels; the guide generates what the unet generates."""
        null, num_classes = self.config.get("null_class_label"), self.unet.config.get("num_class_embeds")
        if null is not None and (isinstance(null, bool) or not isinstance(null, int) or num_classes is None
                                 or not 0 <= null < num_classes):
            raise ValueError(f"null_class_label must be a label index of the class-conditional unet, in "
                             f"[0, {num_classes - 1 if num_classes else 'none'}], got {null!r}")
        guide = getattr(self, "guide_unet", None)
        if guide is None:
            return
        for key in ("sample_size", "in_channels", "out_channels"):
            if guide.config.get(key) != self.unet.config.get(key):
                raise ValueError(f"guide_unet has {key}={guide.config.get(key)!r} but the unet has "
                                 f"{self.unet.config.get(key)!r}; the guide must model the same images")
        guide_scheduler = _saved_scheduler_config(guide)
        if guide_scheduler is not None and not same_scalings(preconditioning_for(guide_scheduler),
                                                             preconditioning_for(self.scheduler)):
            raise ValueError("guide_unet was trained with another preconditioning (its folder's scheduler config) "
                             "than the unet's scheduler; autoguidance compares the two denoisers at the same input")

    def _check_latent_decoding(self):
        """latent_scale and latent_bias: one finite number per latent channel (scale non-zero), as many as the unet's
        channels and the VAE's latent channels; vae_pixel_range an increasing pair."""
        channels = self.unet.config.get("in_channels")
        for name in ("latent_scale", "latent_bias"):
            values = self.config.get(name)
            if (not isinstance(values, (list, tuple)) or len(values) != channels
                    or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values)):
                raise ValueError(f"{name} must list one finite number per latent channel ({channels}, the unet's "
                                 f"in_channels), got {values!r}")
        if not all(self.config.latent_scale):
            raise ValueError(f"latent_scale must be non-zero, got {self.config.latent_scale}")
        pixel_range = self.config.get("vae_pixel_range")
        if pixel_range is not None and (len(pixel_range) != 2 or not pixel_range[0] < pixel_range[1]):
            raise ValueError(f"vae_pixel_range must be (lo, hi) with lo < hi, got {pixel_range!r}")
        vae = getattr(self, "vae", None)
        if vae is not None and vae.config.get("latent_channels") != channels:
            raise ValueError(f"the vae has latent_channels={vae.config.get('latent_channels')} but the unet samples "
                             f"{channels} channels")

    def check_class_labels(self, class_labels, batch_size: int) -> Optional[torch.Tensor]:
        """Labels for a class-conditional unet: integer indices in [0, K) (the null label excluded), one per image
        (or one for all), on the pipeline's device; None for an unconditional one (labels given are an error)."""
        num_classes = self.unet.config.get("num_class_embeds")
        if not self.unet_is_conditional:
            if class_labels is not None:
                raise ValueError("class_labels were given but the unet is not class-conditional (num_class_embeds is None)")
            return None
        if class_labels is None:
            raise ValueError("the unet is class-conditional: pass class_labels (one class index per image)")
        if num_classes is None:  # a UNet with another kind of class embedding takes the labels as they are
            return class_labels
        null = self.config.get("null_class_label")
        requested = num_classes if null is None else null  # the null label is the last index; never a request
        return check_class_labels(class_labels, requested, batch_size).to(self.device)

    def cfg_and_autoguidance_terms(self, class_labels, guidance_scale: float = 1.0, autoguidance_scale: float = 1.0,
                                   guidance_interval=None) -> List[GuidanceTerm]:
        """The classifier-free guidance and autoguidance terms of the call arguments (none at scale 1)."""
        interval = (0.0, math.inf) if guidance_interval is None else check_interval("guidance_interval",
                                                                                  guidance_interval)
        terms: List[GuidanceTerm] = []
        cfg = ClassifierFreeGuidance(guidance_scale, self.config.get("null_class_label") or 0, interval)
        if cfg.guidance_scale != 1:
            if not self.unet_is_conditional or class_labels is None:
                raise ValueError(f"guidance_scale={guidance_scale} (classifier-free guidance) needs a class-conditional "
                                 "unet and class_labels")
            if self.config.get("null_class_label") is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs the unet's null label: pass "
                                 "null_class_label=... to the pipeline (the index the network was trained with for "
                                 "dropped labels; the training scripts save it)")
            terms.append(cfg)
        guide = getattr(self, "guide_unet", None)
        autoguidance = Autoguidance(guide, autoguidance_scale, interval,
                                    conditional=guide is not None and guide.config.get("num_class_embeds") is not None)
        if autoguidance.guidance_scale != 1:
            if guide is None:
                raise ValueError(f"autoguidance_scale={autoguidance_scale} needs a guide_unet; this pipeline has none "
                                 "(pass guide_unet=...)")
            terms.append(autoguidance)
        return terms

    def _check_inputs(self, batch_size, num_inference_steps, output_type: str, generator=None) -> Tuple[int, int]:
        """Validated ``(batch_size, num_inference_steps)`` as python ints (numpy and 0-d tensor integers accepted)."""
        batch_size = _as_int(batch_size, "batch_size")
        num_inference_steps = _as_int(num_inference_steps, "num_inference_steps")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type != "latent" and self.config.get("latent_scale") is not None and \
                getattr(self, "vae", None) is None:
            raise ValueError(f"output_type={output_type!r}: this pipeline samples latents (latent_scale is set) but "
                             "has no vae to decode them; pass vae=AutoencoderKL.from_pretrained(...) or "
                             "output_type='latent'")
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
        elif not torch.is_tensor(latents) or not latents.is_floating_point():
            raise ValueError(f"latents must be a floating-point tensor of standard-normal noise, got "
                             f"{latents.dtype if torch.is_tensor(latents) else type(latents).__name__}")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=self.device, dtype=dtype) * self.scheduler.init_noise_sigma

    @property
    def unet_is_conditional(self) -> bool:
        config = self.unet.config
        return config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None

    def network_output(self, model_input: torch.Tensor, timestep: torch.Tensor, class_labels=None,
                       extra_labels: Sequence[Tuple[GuidanceTerm, torch.Tensor]] = ()) -> Tuple[torch.Tensor, Dict]:
        """The raw network output (F, ε, x₀ or v) at ``model_input``, and the outputs for the extra label rows that
        guidance terms asked for, run as one batched forward pass. ``class_labels`` reach the network only when it is
        class-conditional."""
        labels = class_labels if self.unet_is_conditional else None
        batch = model_input.shape[0]
        t = timestep.to(device=self.device, dtype=torch.float32)
        if not extra_labels:
            return self.unet(model_input, t.expand(batch), class_labels=labels).sample, {}
        inputs = torch.cat([model_input] * (1 + len(extra_labels)))
        all_labels = torch.cat([labels] + [rows for _, rows in extra_labels])
        outputs = self.unet(inputs, t.expand(len(inputs)), class_labels=all_labels).sample.split(batch)
        return outputs[0], {id(term): out for (term, _), out in zip(extra_labels, outputs[1:])}

    def evaluation_frame(self, guidance_terms: Sequence[GuidanceTerm]) -> Optional[EvaluationFrame]:
        """The scheduler's :class:`~diffusers_stf.preconditioning.EvaluationFrame` when anything guides (a scheduler
        it cannot read is refused here, before sampling starts), None otherwise."""
        return EvaluationFrame(self.scheduler) if guidance_terms else None

    def denoising_loop(self, sample: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                       guidance_terms: Sequence[GuidanceTerm] = (), generator=None, begin: int = 0,
                       step_kwargs: Optional[Dict] = None, frame: Optional[EvaluationFrame] = None) -> torch.Tensor:
        """The scheduler's own loop from entry ``begin`` of ``timesteps``, each model output guided by the terms
        active at that evaluation before ``scheduler.step``.

        Args:
            sample: the initial state.
            class_labels: labels of a class-conditional network (and of the terms that read them).
            guidance_terms: :class:`~diffusers_stf.guidance.GuidanceTerm` s; none: plain sampling.
            generator: for the scheduler's noise.
            begin: the first entry of ``timesteps`` (img2img).
            step_kwargs: extra arguments of ``scheduler.step`` it takes (e.g. DDIM's ``eta``).
            frame: the scheduler's :meth:`evaluation_frame` when it was made already.
        """
        scheduler = self.scheduler
        timesteps = scheduler.timesteps
        if begin > 0:
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
            timesteps = timesteps[begin:]
        parameters = inspect.signature(scheduler.step).parameters
        kwargs = {"generator": generator} if "generator" in parameters else {}
        kwargs.update({k: v for k, v in (step_kwargs or {}).items() if k in parameters})
        terms = list(guidance_terms)
        frame = frame or self.evaluation_frame(terms)
        timesteps_cpu = timesteps.cpu() if terms else None  # the frame reads timesteps on the host, never the device
        unet_labels = class_labels if self.unet_is_conditional else None
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = scheduler.scale_model_input(sample, t).to(self.unet.dtype)
            active = []
            if frame is not None:
                x, sigma = frame.point(sample, timesteps_cpu[i])
                first_order = bool(getattr(scheduler, "state_in_first_order", True))
                active = [term for term in terms if term.is_active(sigma, first_order)]
            extra = [(term, term.network_labels(unet_labels)) for term in active]
            out, extra_outputs = self.network_output(model_input, t, class_labels,
                                                     [(term, rows) for term, rows in extra if rows is not None])
            if active:
                evaluation = GuidedEvaluation(x, sigma, out, frame.preconditioning, first_order, extra_outputs,
                                              model_input, t, unet_labels)
                out = self._add_corrections(evaluation, active, sample)
            sample = scheduler.step(out, t, sample, **kwargs).prev_sample
        return sample

    @staticmethod
    def _add_corrections(evaluation: GuidedEvaluation, terms: Sequence[GuidanceTerm], sample: torch.Tensor):
        delta = sum(term.correction(evaluation) for term in terms)
        return add_output_change(evaluation.model_output, sample, delta, evaluation.preconditioning, evaluation.sigma)

    def guided_output(self, model_output: torch.Tensor, sample: torch.Tensor, timestep,
                      guidance_terms: Sequence[GuidanceTerm]) -> torch.Tensor:
        """The scheduler's model output at ``sample`` and ``timestep`` with the active terms' ΔD written into it, as
        :meth:`denoising_loop` does at each evaluation (terms that need extra network rows are not served here)."""
        frame = EvaluationFrame(self.scheduler)
        x, sigma = frame.point(sample, torch.as_tensor(timestep).cpu())
        first_order = bool(getattr(self.scheduler, "state_in_first_order", True))
        active = [term for term in guidance_terms if term.is_active(sigma, first_order)]
        if not active:
            return model_output
        evaluation = GuidedEvaluation(x, sigma, model_output, frame.preconditioning, first_order)
        return self._add_corrections(evaluation, active, sample)

    @staticmethod
    def check_finite(sample: torch.Tensor) -> torch.Tensor:
        """Once at the end of sampling (never inside a step, where it would wait for the device): NaN is an error."""
        if bool(torch.isnan(sample).any()):
            raise ValueError(
                "sampling produced NaN: check that the scheduler's parametrisation (preconditioning, prediction_type, "
                "beta schedule) is the one the UNet was trained with, and the guidance weights"
            )
        return sample

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from sampled latents: vae.decode((latents − bias) / scale), its pixel range
        (``vae_pixel_range``) mapped to [-1, 1]."""
        shape = (1, -1, 1, 1)
        scale = torch.tensor(self.config.latent_scale, dtype=latents.dtype, device=latents.device).reshape(shape)
        bias = torch.tensor(self.config.latent_bias, dtype=latents.dtype, device=latents.device).reshape(shape)
        raw = ((latents - bias) / scale).to(device=self.vae.device, dtype=self.vae.dtype)
        decoded = self.vae.decode(raw).sample.to(latents.dtype)
        lo, hi = self.config.get("vae_pixel_range") or (-1.0, 1.0)
        return (decoded - lo) * (2 / (hi - lo)) - 1

    def postprocess(self, sample: torch.Tensor, output_type: str):
        """[-1, 1] float64 samples (decoded by the vae first, for a latent model) to ``pt`` ([0,1] NCHW float32),
        ``np`` ([0,1] NHWC) or ``pil``; ``latent`` is the final sample itself, unclamped, as diffusers pipelines
        return it."""
        if output_type == "latent":
            return sample
        if getattr(self, "vae", None) is not None:
            sample = self.decode_latents(sample)
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
        guidance_scale: float = 1.0,
        autoguidance_scale: float = 1.0,
        guidance_interval: Optional[Tuple[float, float]] = None,
        guidance_terms: Optional[Sequence[GuidanceTerm]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images.

        Args:
            batch_size: number of images.
            num_inference_steps: sampler steps N (EDM Heun: 2N − 1 network evaluations; 18 steps = 35 NFE).
            generator: ``torch.Generator`` (or a list, one per image) for the latents and the sampler's noise.
            latents: standard-normal latents of shape (batch, C, H, W) to start from, instead of drawing them.
            class_labels: one class index per image (or one for all), for a class-conditional unet.
            guidance_scale: w of classifier-free guidance, D_u + w·(D_c − D_u) (1: plain conditional sampling, one
                network evaluation per step; needs ``null_class_label``).
            autoguidance_scale: w of autoguidance, D_guide + w·(D − D_guide) (1: off; needs ``guide_unet``).
            guidance_interval: (σ_lo, σ_hi): classifier-free guidance and autoguidance act only for σ in this interval
                (Kynkäänniemi et al. 2024); default everywhere.
            guidance_terms: further guidance terms (:mod:`diffusers_stf.guidance`) added at every evaluation where
                active.
            output_type: ``pil``, ``np``, ``pt`` or ``latent`` (the final sample, unclamped, in the sampling dtype;
                for a latent model the undecoded latents).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        batch_size, num_inference_steps = self._check_inputs(batch_size, num_inference_steps, output_type, generator)
        class_labels = self.check_class_labels(class_labels, batch_size)
        terms = self.cfg_and_autoguidance_terms(class_labels, guidance_scale, autoguidance_scale, guidance_interval)
        terms += list(guidance_terms or ())
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        frame = self.evaluation_frame(terms)
        sample = self.prepare_latents(batch_size, generator, latents)
        sample = self.denoising_loop(sample, class_labels, terms, generator, frame=frame)
        image = self.postprocess(self.check_finite(sample), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
