"""EDM sampling with Discriminator Guidance (Kim et al., ICML 2023), "EDM-G++".

A discriminator d(x, σ) estimates the density ratio p_data,σ/p_model,σ = d/(1 − d), so its log-gradient corrects the
model score towards the data score (DG eq. 9): s_guided = s_θ + w·∇_x log(d/(1 − d)). With D the denoiser and
s = (D − x)/σ², the same correction on the denoiser reads

    D_guided(x; σ) = D(x; σ) + w·σ²·∇_x log(d/(1 − d))(x, σ),

and the Euler direction (x − D)/σ of EDM Algorithms 1–2 gains −w·σ·∇_x log r, as in DG's ``edm_sampler``.
Following DG, the first-order (Euler) evaluation of each step uses ``dg_weight_1st_order`` (default 2), the Heun
corrector ``dg_weight_2nd_order`` (default 0), and guidance is on only for σ in [``dg_sigma_min``, ``dg_sigma_max``]
(DG's VP-time window [0.01, 1], i.e. σ ∈ [0.0447, 152.3]). Since the Heun update averages the two slopes, the Euler
slope's guidance enters a Heun step with weight w₁/2 and the final Euler step with w₁ (as in DG).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..models.discriminator import Discriminator
from ..preconditioning import Denoiser, VPPreconditioning
from ..schedulers import EDMHeunScheduler
from .pipeline_edm import EDMPipeline

_VP = VPPreconditioning()
DG_TIME_MIN, DG_TIME_MAX = 0.01, 1.0  # DG generate.py: the VP-time window in which guidance is applied
DG_SIGMA_MIN = float(_VP.sigma(torch.tensor(DG_TIME_MIN, dtype=torch.float64)))  # ≈ 0.0447
DG_SIGMA_MAX = float(_VP.sigma(torch.tensor(DG_TIME_MAX, dtype=torch.float64)))  # ≈ 152.3

# DG generate.py, boosting (Appendix D): hard-coded constants of the official sampler.
BOOST_S_CHURN = 4.0  # per-sample S_churn for rejected samples …
BOOST_S_NOISE = 1.0  # … with this S_noise …
BOOST_CHURN_PERIOD = 5  # … on steps i with i % 5 == 0;
BOOST_WEIGHT_PERIOD = 2  # on steps with i % 2 == 0 the guidance of rejected samples is …
BOOST_WEIGHT_FACTOR = 2.0  # … doubled.


def discriminator_correction(
    discriminator: Discriminator,
    sample: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    class_labels: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """σ²·∇_x log(d/(1 − d))(x, σ), the term that D_guided = D + w·(this) adds (DG eq. 9 in denoiser form).

    The gradient is taken w.r.t. the input only, in the discriminator's dtype (fp32 for an fp32 model), with autograd
    enabled even inside the pipeline's ``no_grad``; d is clipped to [1e-5, 1 − 1e-5] (zero gradient where clipped).
    The σ ↔ VP-time/input-scale translation happens inside the discriminator, so the chain-rule factor of DG's
    ``-(σ²·mean_vp)·∇_{x_vp}`` is included.

    Args:
        discriminator: a :class:`~diffusers_stf.Discriminator`.
        sample: x (any float dtype), shape (batch, C, H, W).
        sigma: σ, a scalar or one per sample.
        class_labels: for a class-conditional discriminator.

    Returns:
        (correction in float64 with the shape of ``sample``, log(d/(1 − d)) per sample, clipped, detached)
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=sample.device)
    sigma = sigma.expand(sample.shape[0]) if sigma.ndim == 0 else sigma.reshape(sample.shape[0])
    with torch.enable_grad():
        x = sample.detach().to(discriminator.dtype).requires_grad_(True)
        log_ratio = discriminator.log_ratio(x, sigma, class_labels)
        (grad,) = torch.autograd.grad(log_ratio.sum(), x)
    correction = sigma.reshape(-1, *([1] * (sample.ndim - 1))) ** 2 * grad.to(torch.float64)
    return correction, log_ratio.detach()


class DiscriminatorGuidedPipeline(EDMPipeline):
    """EDM sampling (Algorithms 1 and 2, through :class:`EDMHeunScheduler` or :class:`EDMStochasticScheduler`) with
    Discriminator Guidance. Without a discriminator, or with both weights 0, it is exactly :class:`EDMPipeline`.

    Args:
        unet: the score network F of the scheduler's preconditioning.
        scheduler: an EDM scheduler.
        discriminator: a :class:`~diffusers_stf.Discriminator` trained on real vs. this model's samples (optional).
    """

    _optional_components = ["discriminator"]
    model_cpu_offload_seq = "unet->discriminator"

    def __init__(self, unet: UNet2DModel, scheduler: EDMHeunScheduler, discriminator: Optional[Discriminator] = None):
        super().__init__(unet=unet, scheduler=scheduler)
        self.register_modules(discriminator=discriminator)
        self._check_discriminator()

    def _check_discriminator(self):
        disc = self.discriminator
        if disc is None:
            return
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else tuple(size)[0]
        if disc.config.sample_size != size or disc.config.in_channels != self.unet.config.in_channels:
            raise ValueError(
                f"discriminator judges {disc.config.in_channels}-channel {disc.config.sample_size}x{disc.config.sample_size} "
                f"images but the unet generates {self.unet.config.in_channels}-channel {size}x{size} images"
            )

    def _guidance_weights(self, w1, w2) -> Tuple[float, float]:
        """Defaults: DG's (2, 0) with a discriminator, (0, 0) without."""
        if w1 is None:
            w1 = 2.0 if self.discriminator is not None else 0.0
        if w2 is None:
            w2 = 0.0
        for name, w in (("dg_weight_1st_order", w1), ("dg_weight_2nd_order", w2)):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
            if w > 0 and self.discriminator is None:
                raise ValueError(f"{name}={w} needs a discriminator; this pipeline has none (pass discriminator=...)")
        return float(w1), float(w2)

    def guided_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float, weight: float, class_labels=None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """F corrected so that the scheduler's D = c_skip·x + c_out·F becomes D + w·σ²·∇_x log r.

        Returns (F in float64, log r per sample)."""
        correction, log_ratio = discriminator_correction(self.discriminator, sample, sigma, class_labels)
        c_out = self.scheduler.preconditioning.c_out(torch.tensor(sigma, dtype=torch.float64)).to(sample.device)
        guided = model_output.to(torch.float64).clone()
        channels = sample.shape[1]  # a learned-variance network's extra channels are not part of D
        guided[:, :channels] += weight * correction / c_out
        return guided, log_ratio

    # --------------------------------------------------------------------------------------------------------------
    # img2img (SDEdit, DG §5.3)

    def _prepare_image(self, image) -> torch.Tensor:
        """PIL image(s), a [0, 1] NCHW/CHW tensor or a [0, 1] NHWC/HWC array → float64 NCHW in [−1, 1]."""
        from PIL import Image

        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, list) and image and isinstance(image[0], Image.Image):
            mode = "L" if self.unet.config.in_channels == 1 else "RGB"
            image = np.stack([np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in image])
        if isinstance(image, np.ndarray):  # channel-last, as pipelines return with output_type="np"
            image = torch.from_numpy(np.asarray(image, dtype=np.float32))
            image = image[..., None] if image.ndim == 2 else image  # (H, W) grey
            image = image[None] if image.ndim == 3 else image  # (H, W, C)
            if image.ndim != 4:
                raise ValueError(f"a numpy image must be (H, W), (H, W, C) or (N, H, W, C), got shape {tuple(image.shape)}")
            image = image.permute(0, 3, 1, 2)
        if not torch.is_tensor(image):
            raise ValueError("image must be a PIL image, a list of them, a numpy array or a torch tensor in [0, 1]")
        image = image[None] if image.ndim == 3 else image
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        expected = (self.unet.config.in_channels, *size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"image must have shape (batch, {', '.join(map(str, expected))}), got {tuple(image.shape)}")
        return image.to(device=self.device, dtype=torch.float64) * 2 - 1

    def _first_step(self, num_inference_steps: int, strength: float) -> int:
        """SDEdit: start at step N − round(strength·N) (diffusers' img2img convention)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return num_inference_steps - max(1, int(round(strength * num_inference_steps)))

    # --------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 18,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        dg_weight_1st_order: Optional[float] = None,
        dg_weight_2nd_order: Optional[float] = None,
        dg_sigma_min: float = DG_SIGMA_MIN,
        dg_sigma_max: float = DG_SIGMA_MAX,
        boosting: bool = False,
        image=None,
        strength: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images with Discriminator Guidance.

        Args:
            batch_size: number of images (with ``image``: taken from the image batch).
            num_inference_steps: sampler steps N (2N − 1 network evaluations with Heun).
            generator: ``torch.Generator`` (or a list) for the latents and the churn noise.
            latents: standard-normal latents (batch, C, H, W) instead of drawing them (the SDEdit noise with ``image``).
            class_labels: for class-conditional UNets and discriminators.
            dg_weight_1st_order: w₁, guidance weight on each step's Euler evaluation (default 2 with a discriminator,
                0 without; DG's CIFAR-10 setting).
            dg_weight_2nd_order: w₂, guidance weight on the Heun corrector evaluation (default 0).
            dg_sigma_min, dg_sigma_max: guidance is applied only where σ of the evaluation is in this window (default:
                DG's VP time window [0.01, 1]).
            boosting: DG Appendix D: samples the discriminator rejects (log r < 0 at the previous step) are churned
                with S_churn = 4 every 5th step and have their guidance doubled every 2nd step. Needs w₁ > 0.
            image: SDEdit image-to-image (DG §5.3): start from this image ([0, 1]; PIL, array or tensor) perturbed
                to the noise level of step N − round(strength·N), instead of from pure noise.
            strength: fraction of the schedule to run from ``image`` (1: all steps).
            output_type: ``pil``, ``np`` or ``pt``.
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        w1, w2 = self._guidance_weights(dg_weight_1st_order, dg_weight_2nd_order)
        if not 0 <= dg_sigma_min <= dg_sigma_max:
            raise ValueError(f"need 0 <= dg_sigma_min <= dg_sigma_max, got {dg_sigma_min}, {dg_sigma_max}")
        if boosting and w1 == 0:
            raise ValueError("boosting=True needs dg_weight_1st_order > 0 (it acts on the first-order log ratio)")
        self._check_discriminator()
        source = None
        if image is not None:
            source = self._prepare_image(image)
            batch_size = source.shape[0]
        elif strength != 1.0:
            raise ValueError("strength is only used together with image")
        self._check_inputs(batch_size, num_inference_steps, output_type)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        first_step = self._first_step(num_inference_steps, strength) if source is not None else 0

        if source is None:
            sample = self.prepare_latents(batch_size, generator, latents)
        else:
            noise = self.prepare_latents(batch_size, generator, latents) / self.scheduler.init_noise_sigma
            sample = source + float(self.scheduler.sigmas_hat[first_step]) * noise
        window = (dg_sigma_min, dg_sigma_max)
        if boosting:
            sample = self._sample_boosted(sample, first_step, w1, w2, window, class_labels, generator)
        else:
            sample = self._sample(sample, first_step, w1, w2, window, class_labels, generator)
        image = self.postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _sample(self, sample, first_step, w1, w2, window, class_labels, generator):
        """The scheduler's own loop, with F corrected before ``step`` on guided evaluations."""
        timesteps = self.scheduler.timesteps
        if first_step > 0:
            begin = 2 * first_step  # every earlier step has an Euler and a Heun evaluation
            self.scheduler.set_begin_index(begin)
            timesteps = timesteps[begin:]
        for t in self.progress_bar(timesteps):
            out = self.model_output(sample, t, class_labels)
            weight = w1 if self.scheduler.state_in_first_order else w2
            sigma = self.scheduler.current_sigma
            if weight > 0 and window[0] <= sigma <= window[1]:
                out, _ = self.guided_model_output(out, sample, sigma, weight, class_labels)
            sample = self.scheduler.step(out, t, sample, generator=generator).prev_sample
        return sample

    def _sample_boosted(self, sample, first_step, w1, w2, window, class_labels, generator):
        """DG's EDM-G++ sampler with boosting (``generate.py:edm_sampler``, Appendix D), with per-sample σ̂.

        The scheduler provides the noise levels σ_i and its own churn σ̂_i (EDM Algorithm 2); samples with log r < 0 at
        the previous Euler evaluation are churned further on every 5th step (γ = min(4/N, √2 − 1)) and get their
        guidance doubled on every 2nd step. This loop calls the preconditioned network directly because the
        scheduler's ``step`` takes one σ̂ per batch.
        """
        scheduler, precond = self.scheduler, self.scheduler.preconditioning
        denoiser = Denoiser(self.unet, precond)
        n = scheduler.num_inference_steps
        sigmas, sigmas_hat = scheduler.sigmas.to(sample.device), scheduler.sigmas_hat.to(sample.device)
        s_noise = float(getattr(scheduler.config, "s_noise", 1.0))
        s_tmin, s_tmax = float(getattr(scheduler.config, "s_tmin", 0.0)), float(getattr(scheduler.config, "s_tmax", math.inf))
        boost_gamma = min(BOOST_S_CHURN / n, math.sqrt(2) - 1)
        batch = sample.shape[0]
        view = (-1,) + (1,) * (sample.ndim - 1)
        # prepare_latents scaled the noise by init_noise_sigma (σ̂_0 folded in): undo it and churn step 0 explicitly.
        x = sample if first_step > 0 else sample / scheduler.init_noise_sigma * float(sigmas[0])
        if first_step > 0:  # SDEdit: the source was noised to σ̂; treat it as x̂ of this step with no extra churn
            sigmas = sigmas.clone()
            sigmas[first_step] = sigmas_hat[first_step]
        log_ratio = torch.full((batch,), math.inf, dtype=torch.float64, device=sample.device)

        def guidance(x_eval, sigma_eval, weight):
            inside = (sigma_eval >= window[0]) & (sigma_eval <= window[1])
            if weight == 0 or not bool(inside.any()):
                return torch.zeros_like(x_eval), torch.full_like(sigma_eval, math.inf)
            correction, lr = discriminator_correction(self.discriminator, x_eval, sigma_eval, class_labels)
            lr = torch.where(inside, lr.to(torch.float64), torch.full_like(sigma_eval, math.inf))
            return weight * correction * inside.reshape(view), lr

        for i in self.progress_bar(range(first_step, n)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            gamma = torch.full((batch,), float(sigmas_hat[i] / sigma - 1), dtype=torch.float64, device=x.device)
            noise_scale = torch.full_like(gamma, s_noise)
            rejected = log_ratio < 0
            if i % BOOST_CHURN_PERIOD == 0 and s_tmin <= float(sigma) <= s_tmax:
                gamma[rejected] = boost_gamma
                noise_scale[rejected] = BOOST_S_NOISE
            sigma_hat = precond.round_sigma(sigma * (1 + gamma))
            extra = (sigma_hat**2 - sigma**2).clamp(min=0).sqrt() * noise_scale
            if bool((extra > 0).any()):
                z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
                x = x + extra.reshape(view) * z
            denoised = denoiser(x, sigma_hat, class_labels)
            correction, log_ratio = guidance(x, sigma_hat, w1)
            if i % BOOST_WEIGHT_PERIOD == 0:
                correction = correction * torch.where(log_ratio < 0, BOOST_WEIGHT_FACTOR, 1.0).reshape(view)
            d = (x - denoised - correction) / sigma_hat.reshape(view)
            x_next = x + (sigma_next - sigma_hat).reshape(view) * d
            if sigma_next > 0:
                sigma_next_b = sigma_next.expand(batch)
                denoised = denoiser(x_next, sigma_next_b, class_labels)
                correction, _ = guidance(x_next, sigma_next_b, w2)
                d_prime = (x_next - denoised - correction) / sigma_next
                x_next = x + (sigma_next - sigma_hat).reshape(view) * (d + d_prime) / 2
            x = x_next
        return x
