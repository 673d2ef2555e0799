"""Guided sampling under any scheduler: Discriminator Guidance (Kim et al., ICML 2023, "EDM-G++"/"ADM-G++") and
classifier guidance (Dhariwal & Nichol, NeurIPS 2021), alone or combined as DG eq. 6:

    s_guided(x, σ) = s_θ(x, σ) + w_CG·∇_x log p(y | x, σ) + w_DG·∇_x log(d/(1 − d))(x, σ).

One mechanism for every scheduler. The guidance is a correction of the score; with s = (D − x)/σ² it is a
correction of the denoiser,

    ΔD(x; σ) = σ²·∇_x (w_CG·log p(y | x, σ) + w_DG·log r(x, σ)),

computed with the discriminator and the classifier in one convention: the EDM/VE-scale sample x = y + σ·n and its σ.
A diffusers DDPM/DDIM state x_t = √ᾱ_t·y + √(1 − ᾱ_t)·ε is that x scaled by √ᾱ_t, so they see x = x_t/√ᾱ_t and
σ = √((1 − ᾱ_t)/ᾱ_t). ΔD is then written in the model output's own parametrisation before ``scheduler.step``:

==================  ===============================  ====================================================
model output        guided output                    for ε: Dhariwal & Nichol's ε̂ = ε − √(1 − ᾱ_t)·∇_{x_t}(…)
==================  ===============================  ====================================================
EDM's F (eq. 7)     F + ΔD/c_out(σ)                  (our schedulers' preconditioning; ``EDMEulerScheduler``)
ε                   ε − ΔD/σ                         = ε − σ·∇_x(…) = ε − √(1 − ᾱ_t)·∇_{x_t}(…)
x₀ (``sample``)     x₀ + ΔD
v                   v − ΔD·√(1 + σ²)/σ               (v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀)
==================  ===============================  ====================================================

For EDM (Algorithm 1) the Euler direction (x − D)/σ gains −w·σ·∇_x log r, exactly DG's ``edm_sampler``. Following
DG, the first-order (Euler) evaluation of each Heun step uses ``dg_weight_1st_order`` (default 2), the Heun corrector
``dg_weight_2nd_order`` (default 0); first-order schedulers use ``dg_weight_1st_order`` on every evaluation. The
discriminator guides only for σ in [``dg_sigma_min``, ``dg_sigma_max``] (DG's VP-time window [0.01, 1], i.e.
σ ∈ [0.0447, 152.3]). Since the Heun update averages the two slopes, the Euler slope's guidance enters a Heun step
with weight w₁/2 and the final Euler step with w₁ (as in DG). Classifier guidance uses ``classifier_guidance_scale``
on every evaluation.
"""

from __future__ import annotations

import inspect
import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

from ..models.classifier import NoiseConditionalClassifier, check_class_labels
from ..models.discriminator import Discriminator
from ..preconditioning import Denoiser, VPPreconditioning
from ..schedulers import EDMHeunScheduler
from ..schedulers.edm_sampling import churn, churn_gamma, churn_sigma, heun_step
from .pipeline_edm import EDMPipeline

_VP = VPPreconditioning()
DG_TIME_MIN, DG_TIME_MAX = 0.01, 1.0  # DG generate.py: the VP-time window in which guidance is applied
DG_GUIDANCE_SIGMA_MIN = float(_VP.sigma(torch.tensor(DG_TIME_MIN, dtype=torch.float64)))  # ≈ 0.0447
DG_GUIDANCE_SIGMA_MAX = float(_VP.sigma(torch.tensor(DG_TIME_MAX, dtype=torch.float64)))  # ≈ 152.3

# DG generate.py, boosting (Appendix D): hard-coded constants of the official sampler.
BOOST_S_CHURN = 4.0  # per-sample S_churn for rejected samples …
BOOST_S_NOISE = 1.0  # … with this S_noise …
BOOST_CHURN_PERIOD = 5  # … on steps i with i % 5 == 0;
BOOST_WEIGHT_PERIOD = 2  # on steps with i % 2 == 0 the guidance of rejected samples is …
BOOST_WEIGHT_FACTOR = 2.0  # … doubled.

GUIDED_SCHEDULERS = (
    "EDMHeunScheduler",
    "EDMStochasticScheduler",
    "EDMEulerScheduler",
    "EulerDiscreteScheduler",
    "DDPMScheduler",
    "DDIMScheduler",
)


def _per_sample(sigma, batch: int):
    """σ as a python float (one level for the batch) or a float64 tensor (batch,) where it is."""
    if isinstance(sigma, (int, float)):
        return float(sigma)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)


def _squared(sigma, like: torch.Tensor):
    """σ² ready to multiply ``like``: a python float, or a per-sample tensor on its device."""
    if isinstance(sigma, float):
        return sigma**2
    return (sigma.to(like.device) ** 2).reshape(-1, *([1] * (like.ndim - 1)))


def _choose(mask: torch.Tensor, if_true: float, if_false: float) -> torch.Tensor:
    """Per-sample float64 values: ``if_true`` where ``mask``, ``if_false`` elsewhere (fill kernels: no host copy)."""
    return torch.full(mask.shape, if_false, dtype=torch.float64, device=mask.device).masked_fill(mask, if_true)


def _sigma_squared_gradient(log_density, dtype: torch.dtype, sample: torch.Tensor, sigma):
    """(σ²·∇_x f(x, σ) in float64, f per sample, detached) for a per-sample log-density f: the gradient w.r.t. the
    input only, in the model's ``dtype``, with autograd on even inside the pipeline's ``no_grad``."""
    sigma = _per_sample(sigma, sample.shape[0])
    with torch.enable_grad():
        x = sample.detach().to(dtype).requires_grad_(True)
        value = log_density(x, sigma)
        (grad,) = torch.autograd.grad(value.sum(), x)
    return _squared(sigma, sample) * grad.to(torch.float64), value.detach()


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
        discriminator: a :class:`~diffusers_stf.Discriminator` (anything with ``log_ratio(x, σ, labels)``).
        sample: x, the EDM/VE-scale sample (any float dtype), shape (batch, C, H, W).
        sigma: σ, a scalar or one per sample.
        class_labels: for a class-conditional discriminator.

    Returns:
        (correction in float64 with the shape of ``sample``, log(d/(1 − d)) per sample, clipped, detached)
    """
    log_ratio = lambda x, s: discriminator.log_ratio(x, s, class_labels)  # noqa: E731
    return _sigma_squared_gradient(log_ratio, discriminator.dtype, sample, sigma)


def classifier_correction(
    classifier: NoiseConditionalClassifier,
    sample: torch.Tensor,
    sigma: Union[float, torch.Tensor],
    class_labels: torch.Tensor,
) -> torch.Tensor:
    """σ²·∇_x log p(y | x, σ), the denoiser form of Dhariwal & Nichol's classifier gradient (their Algorithms 1–2
    add s·∇_{x_t} log p_φ(y | x_t) to the score).

    Args:
        classifier: a :class:`~diffusers_stf.NoiseConditionalClassifier` (anything with ``log_prob(x, σ, y)``).
        sample: x, the EDM/VE-scale sample, shape (batch, C, H, W).
        sigma: σ, a scalar or one per sample.
        class_labels: y, one class index per sample.

    Returns:
        the correction in float64, with the shape of ``sample``.
    """
    log_prob = lambda x, s: classifier.log_prob(x, s, class_labels)  # noqa: E731
    return _sigma_squared_gradient(log_prob, classifier.dtype, sample, sigma)[0]


class DiscriminatorGuidedPipeline(EDMPipeline):
    """Sampling with Discriminator Guidance and/or classifier guidance under our EDM schedulers
    (:class:`EDMHeunScheduler`, :class:`EDMStochasticScheduler`) or diffusers' ``DDPMScheduler``, ``DDIMScheduler``,
    ``EulerDiscreteScheduler`` and ``EDMEulerScheduler`` (module docstring). Without a discriminator and a classifier,
    or with all weights 0, it is exactly unguided sampling (:class:`EDMPipeline`, diffusers' ``DDPMPipeline``, …).

    Args:
        unet: the score network: F of the scheduler's preconditioning for our schedulers, or the ε/x₀/v network of
            the scheduler's ``prediction_type``.
        scheduler: one of the schedulers above (any other scheduler samples unguided only).
        discriminator: a :class:`~diffusers_stf.Discriminator` trained on real vs. this model's samples (optional).
        classifier: a :class:`~diffusers_stf.NoiseConditionalClassifier` of the data's classes (optional).
    """

    _optional_components = ["discriminator", "classifier"]
    model_cpu_offload_seq = "unet->discriminator->classifier"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: EDMHeunScheduler,
        discriminator: Optional[Discriminator] = None,
        classifier: Optional[NoiseConditionalClassifier] = None,
    ):
        super().__init__(unet=unet, scheduler=scheduler)
        self.register_modules(discriminator=discriminator, classifier=classifier)
        self._check_components()

    def _check_components(self):
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else tuple(size)[0]
        channels = self.unet.config.in_channels
        for name in ("discriminator", "classifier"):
            model = getattr(self, name, None)
            if model is None:
                continue
            if model.config.sample_size != size or model.config.in_channels != channels:
                verb = "judges" if name == "discriminator" else "classifies"
                raise ValueError(
                    f"{name} {verb} {model.config.in_channels}-channel {model.config.sample_size}x{model.config.sample_size} "
                    f"images but the unet generates {channels}-channel {size}x{size} images"
                )

    # --------------------------------------------------------------------------------------------------------------
    # Arguments

    def _guidance_weights(self, w1, w2, w_cg) -> Tuple[float, float, float]:
        """Defaults: DG's (2, 0) with a discriminator, (0, 0) without; w_CG 0."""
        if w1 is None:
            w1 = 2.0 if self.discriminator is not None else 0.0
        if w2 is None:
            w2 = 0.0
        weights = (("dg_weight_1st_order", w1, "discriminator"), ("dg_weight_2nd_order", w2, "discriminator"),
                   ("classifier_guidance_scale", w_cg, "classifier"))
        for name, w, component in weights:
            if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
            if w > 0 and getattr(self, component) is None:
                raise ValueError(f"{name}={w} needs a {component}; this pipeline has none (pass {component}=...)")
        return float(w1), float(w2), float(w_cg)

    def _class_labels(self, class_labels, batch_size: int, w_cg: float) -> Optional[torch.Tensor]:
        """Labels checked once per call (range and count), on the pipeline's device; None when nothing uses them."""
        conditional_disc = self.discriminator is not None and self.discriminator.config.get("num_class_embeds") is not None
        if class_labels is None:
            if w_cg > 0:
                raise ValueError("classifier_guidance_scale > 0 needs class_labels (the class y of each image)")
            return None
        if not (self.unet_is_conditional or conditional_disc or self.classifier is not None):
            raise ValueError("class_labels were given but neither the unet, the discriminator nor a classifier uses them")
        limits = []
        if self.classifier is not None:
            limits.append(("classifier", self.classifier.config.num_classes))
        if conditional_disc:
            limits.append(("discriminator", self.discriminator.config.num_class_embeds))
        if self.unet_is_conditional and self.unet.config.get("num_class_embeds") is not None:
            limits.append(("unet", self.unet.config.num_class_embeds))
        num_classes = min((k for _, k in limits), default=None)
        if num_classes is None:  # a UNet with another kind of class embedding takes the labels as they are
            return class_labels
        return check_class_labels(class_labels, num_classes, batch_size).to(self.device)

    def _guided_scheduler_kind(self) -> str:
        """How the scheduler's sample and model output relate to the EDM convention (module docstring)."""
        scheduler = self.scheduler
        if isinstance(scheduler, EDMHeunScheduler):
            return "preconditioned"
        if isinstance(scheduler, EDMEulerScheduler):
            kind, allowed = "edm", ("epsilon", "v_prediction")
        elif isinstance(scheduler, EulerDiscreteScheduler):
            kind, allowed = "sigma", ("epsilon", "sample", "original_sample", "v_prediction")
        elif isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
            kind, allowed = "alpha", ("epsilon", "sample", "v_prediction")
        else:
            raise ValueError(
                f"guidance cannot convert its correction into the model output of {type(scheduler).__name__}; "
                f"the scheduler must be one of {', '.join(GUIDED_SCHEDULERS)} (or sample unguided)"
            )
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in allowed:
            raise ValueError(
                f"guidance cannot convert the scheduler's prediction_type {prediction_type!r}; "
                f"{type(scheduler).__name__} is guided for prediction_type in {allowed}"
            )
        return kind

    # --------------------------------------------------------------------------------------------------------------
    # The guidance: ΔD in the EDM convention, written in the model output's parametrisation

    def edm_coordinates(self, sample: torch.Tensor, timestep: torch.Tensor, kind: str) -> Tuple[torch.Tensor, float]:
        """(x, σ) of the current evaluation in the EDM/VE convention: x = x_t/√ᾱ_t, σ = √((1 − ᾱ_t)/ᾱ_t) for
        DDPM/DDIM states, the sample and the scheduler's σ otherwise. ``timestep`` is on the CPU (no device sync)."""
        scheduler = self.scheduler
        if kind == "preconditioned":
            return sample, scheduler.current_sigma
        if kind in ("edm", "sigma"):
            return sample, float(scheduler.sigmas[scheduler.step_index])
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
        return sample / math.sqrt(alpha_bar), math.sqrt((1 - alpha_bar) / alpha_bar)

    def output_per_denoised(self, sigma: float, kind: str) -> float:
        """∂(model output)/∂D at fixed x: the factor that turns ΔD into the output's parametrisation."""
        scheduler = self.scheduler
        if kind == "preconditioned":
            return 1.0 / float(scheduler.preconditioning.c_out(torch.tensor(sigma, dtype=torch.float64)))
        prediction_type = scheduler.config.prediction_type
        if kind == "edm":  # diffusers' EDMEulerScheduler.precondition_outputs
            sd = scheduler.config.sigma_data
            c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
            return (1.0 if prediction_type == "epsilon" else -1.0) / c_out
        if prediction_type == "epsilon":  # D = x − σ·ε
            return -1.0 / sigma
        if prediction_type in ("sample", "original_sample"):  # D = x₀
            return 1.0
        return -math.sqrt(1 + sigma**2) / sigma  # v_prediction: v = √ᾱ·ε − √(1 − ᾱ)·x₀

    def denoiser_correction(
        self, x: torch.Tensor, sigma, dg_weight: float, cg_weight: float, window, class_labels
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(ΔD = σ²·∇_x(w_CG·log p(y | x, σ) + w_DG·log r), log r) at (x, σ); (None, None) when nothing guides.

        ``sigma`` is a python float (the whole batch) or a tensor (one per sample: boosting); the discriminator
        guides only samples whose σ lies in ``window``, and log r is +inf for the others (DG's "accepted")."""
        delta = log_ratio = None
        batch = x.shape[0]
        if dg_weight > 0:
            sigma = _per_sample(sigma, batch)
            labels = class_labels if self.discriminator.config.get("num_class_embeds") is not None else None
            if isinstance(sigma, float):  # one level: the window is decided on the host
                if window[0] <= sigma <= window[1]:
                    delta, log_ratio = discriminator_correction(self.discriminator, x, sigma, labels)
                    delta, log_ratio = dg_weight * delta, log_ratio.to(torch.float64)
                else:
                    log_ratio = torch.full((batch,), math.inf, dtype=torch.float64, device=x.device)
            else:  # one level per sample (boosting): masked on the device, no host sync
                inside = ((sigma >= window[0]) & (sigma <= window[1])).to(x.device)
                correction, log_ratio = discriminator_correction(self.discriminator, x, sigma, labels)
                log_ratio = torch.where(inside, log_ratio.to(torch.float64), torch.full_like(log_ratio, math.inf, dtype=torch.float64))
                delta = dg_weight * correction * inside.reshape(-1, *([1] * (x.ndim - 1)))
        if cg_weight > 0:
            correction = cg_weight * classifier_correction(self.classifier, x, sigma, class_labels)
            delta = correction if delta is None else delta + correction
        return delta, log_ratio

    def guided_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor, timestep, dg_weight: float, cg_weight: float,
        window, class_labels=None, kind: Optional[str] = None,
    ) -> torch.Tensor:
        """The model output with the guidance added in its own parametrisation (module docstring); the output itself
        when nothing guides at this evaluation. A learned-variance network's extra channels are left alone."""
        kind = kind or self._guided_scheduler_kind()
        x, sigma = self.edm_coordinates(sample, timestep, kind)
        delta, _ = self.denoiser_correction(x, sigma, dg_weight, cg_weight, window, class_labels)
        if delta is None:
            return model_output
        guided = model_output.to(torch.promote_types(model_output.dtype, sample.dtype)).clone()
        channels = sample.shape[1]
        guided[:, :channels] += (self.output_per_denoised(sigma, kind) * delta).to(guided.dtype)
        return guided

    # --------------------------------------------------------------------------------------------------------------
    # img2img (SDEdit, DG §5.3)

    def _prepare_image(self, image) -> torch.Tensor:
        """PIL image(s), a [0, 1] NCHW/CHW tensor or a [0, 1] NHWC/HWC array → NCHW in [−1, 1]."""
        from PIL import Image

        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and image and all(isinstance(im, Image.Image) for im in image):
            mode = "L" if self.unet.config.in_channels == 1 else "RGB"
            arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in image]
            image = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])  # (N, H, W, C)
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
        image = image.to(device=self.device, dtype=torch.float64)
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 1:
            raise ValueError(
                f"image values must be in [0, 1] (PIL images are converted), got values from {low:g} to {high:g}"
                + ("; divide 8-bit pixel values by 255" if high > 1.5 else "")
            )
        return (image * 2 - 1).to(self.sample_dtype)

    def _first_step(self, num_inference_steps: int, strength: float) -> int:
        """SDEdit: start at step N − round(strength·N) (diffusers' img2img convention)."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
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
        dg_sigma_min: float = DG_GUIDANCE_SIGMA_MIN,
        dg_sigma_max: float = DG_GUIDANCE_SIGMA_MAX,
        boosting: bool = False,
        classifier_guidance_scale: float = 0.0,
        image=None,
        strength: float = 1.0,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images with Discriminator Guidance and/or classifier guidance.

        Args:
            batch_size: number of images (with ``image``: taken from the image batch).
            num_inference_steps: sampler steps N (2N − 1 network evaluations with EDM Heun).
            generator: ``torch.Generator`` (or one per image) for the latents and the sampler's noise.
            latents: standard-normal latents (batch, C, H, W) instead of drawing them (the SDEdit noise with ``image``).
            class_labels: one class index per image (or one for all): y of classifier guidance, and the labels of a
                class-conditional UNet or discriminator.
            dg_weight_1st_order: w₁, discriminator guidance weight on each step's first-order evaluation (every
                evaluation of a first-order scheduler); default 2 with a discriminator (DG's CIFAR-10 setting), 0 without.
            dg_weight_2nd_order: w₂, the weight on the Heun corrector evaluation of our EDM schedulers (default 0).
            dg_sigma_min, dg_sigma_max: the discriminator guides only where σ of the evaluation is in this window
                (default: DG's VP time window [0.01, 1]).
            boosting: DG Appendix D: samples the discriminator rejects (log r < 0 at the previous step) are churned
                with S_churn = 4 every 5th step and have their guidance doubled every 2nd step. Needs w₁ > 0 and one
                of our EDM schedulers.
            classifier_guidance_scale: w_CG, the classifier guidance weight on every evaluation (default 0).
            image: SDEdit image-to-image (DG §5.3): start from this image ([0, 1]; PIL, a list of PIL images, array or
                tensor) noised to the level of step N − round(strength·N), instead of from pure noise.
            strength: fraction of the schedule to run from ``image`` (1: all steps).
            eta: DDIM's η, for ``DDIMScheduler`` (ignored by schedulers whose ``step`` takes no ``eta``).
            output_type: ``pil``, ``np``, ``pt`` or ``latent`` (the final sample, unclamped, in the sampling dtype).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        w1, w2, w_cg = self._guidance_weights(dg_weight_1st_order, dg_weight_2nd_order, classifier_guidance_scale)
        if not 0 <= dg_sigma_min <= dg_sigma_max:
            raise ValueError(f"need 0 <= dg_sigma_min <= dg_sigma_max, got {dg_sigma_min}, {dg_sigma_max}")
        if boosting and w1 == 0:
            raise ValueError("boosting=True needs dg_weight_1st_order > 0 (it acts on the first-order log ratio)")
        if boosting and not isinstance(self.scheduler, EDMHeunScheduler):
            raise ValueError("boosting=True needs one of our EDM schedulers (EDMHeunScheduler, EDMStochasticScheduler)")
        self._check_components()
        guided = w1 > 0 or w2 > 0 or w_cg > 0
        kind = self._guided_scheduler_kind() if guided else None
        source = None
        if image is not None:
            source = self._prepare_image(image)
            batch_size = source.shape[0]
        elif strength != 1.0:
            raise ValueError("strength is only used together with image")
        batch_size, num_inference_steps = self._check_inputs(batch_size, num_inference_steps, output_type, generator)
        class_labels = self._class_labels(class_labels, batch_size, w_cg)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        first_step = self._first_step(num_inference_steps, strength) if source is not None else 0
        begin = first_step * self.scheduler.order

        if source is None:
            sample = self.prepare_latents(batch_size, generator, latents)
        else:  # SDEdit: the image noised to the level of the first evaluation
            noise = self.prepare_latents(batch_size, generator, latents) / self.scheduler.init_noise_sigma
            sample = self.scheduler.add_noise(source, noise, self.scheduler.timesteps[begin : begin + 1])
        window = (dg_sigma_min, dg_sigma_max)
        if boosting:
            sample = self._sample_boosted(sample, first_step, w1, w2, w_cg, window, class_labels, generator)
        else:
            sample = self._sample(sample, begin, w1, w2, w_cg, window, class_labels, generator, eta, kind)
        image = self.postprocess(self.check_finite(sample), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _sample(self, sample, begin, w1, w2, w_cg, window, class_labels, generator, eta, kind):
        """The scheduler's own loop, with the model output guided before ``step`` (module docstring)."""
        scheduler = self.scheduler
        timesteps = scheduler.timesteps
        if begin > 0:
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(begin)
            timesteps = timesteps[begin:]
        timesteps_cpu = timesteps.cpu()  # ᾱ_t and the window are read on the CPU, never from the device
        if kind == "alpha" and scheduler.alphas_cumprod.device.type != "cpu":  # add_noise (SDEdit) moved it
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.cpu()
        step_kwargs = {"generator": generator}
        if "eta" in inspect.signature(scheduler.step).parameters:
            step_kwargs["eta"] = eta
        for i, t in enumerate(self.progress_bar(timesteps)):
            out = self.model_output(sample, t, class_labels)
            if kind is not None:
                dg_weight = w1 if getattr(scheduler, "state_in_first_order", True) else w2
                out = self.guided_model_output(out, sample, timesteps_cpu[i], dg_weight, w_cg, window, class_labels, kind)
            sample = scheduler.step(out, t, sample, **step_kwargs).prev_sample
        return sample

    def _sample_boosted(self, sample, first_step, w1, w2, w_cg, window, class_labels, generator):
        """DG's EDM-G++ sampler with boosting (``generate.py:edm_sampler``, Appendix D): per-sample σ̂ on the shared
        EDM sampler core (:func:`~diffusers_stf.schedulers.edm_sampling.heun_step`).

        The scheduler provides the noise levels σ_i and its own churn σ̂_i (EDM Algorithm 2); samples with log r < 0
        at the previous Euler evaluation are churned with S_churn = 4 on every 5th step and get their discriminator
        guidance doubled on every 2nd step. All per-sample decisions stay on the device (no host sync per step);
        the churn noise is drawn on every step, as DG's ``randn_like``, and scaled by zero where nothing churns.
        """
        scheduler = self.scheduler
        precond = scheduler.preconditioning
        config = scheduler.config
        s_churn, s_noise = float(config.get("s_churn", 0.0)), float(config.get("s_noise", 1.0))
        s_tmin, s_tmax = float(config.get("s_tmin", 0.0)), float(config.get("s_tmax", math.inf))
        denoiser = Denoiser(self.unet, precond)
        unet_labels = class_labels if self.unet_is_conditional else None
        n, batch, device = scheduler.num_inference_steps, sample.shape[0], sample.device
        sigmas = scheduler.sigmas
        # prepare_latents scaled the noise by init_noise_sigma (σ̂_0 folded in): undo it and churn step 0 here.
        x = sample if first_step > 0 else sample / scheduler.init_noise_sigma * float(sigmas[0])
        log_ratio = torch.full((batch,), math.inf, dtype=torch.float64, device=device)

        for i in self.progress_bar(range(first_step, n)):
            sdedit_start = first_step > 0 and i == first_step  # the source was noised to σ̂_i already: no churn
            level = float(scheduler.sigmas_hat[i] if sdedit_start else sigmas[i])
            sigma = torch.full((batch,), level, dtype=torch.float64, device=device)
            boost = (log_ratio < 0) & (i % BOOST_CHURN_PERIOD == 0)
            base_churn = 0.0 if sdedit_start else s_churn
            gamma = churn_gamma(sigma, n, _choose(boost, BOOST_S_CHURN, base_churn), s_tmin, s_tmax)
            sigma_hat = churn_sigma(sigma, gamma, precond.round_sigma)
            noise = randn_tensor(x.shape, generator=generator, device=device, dtype=torch.float32)
            x_hat = churn(x, sigma, sigma_hat, _choose(boost, BOOST_S_NOISE, s_noise), noise)
            # σ̂_i ∈ [σ_i, √2·σ_i] (γ ≤ √2 − 1): decided on the host whether any sample can be inside the window
            reachable = level <= window[1] and math.sqrt(2) * level >= window[0]
            verdict = {"log_ratio": torch.full((batch,), math.inf, dtype=torch.float64, device=device)}

            def correction(x_eval, sigma_eval, first_order, step=i, reachable=reachable, verdict=verdict):
                weight = (w1 if reachable else 0.0) if first_order else w2
                dg, lr = self.denoiser_correction(x_eval, sigma_eval, weight, 0.0, window, class_labels)
                if first_order and dg is not None:
                    if step % BOOST_WEIGHT_PERIOD == 0:
                        dg = dg * _choose(lr < 0, BOOST_WEIGHT_FACTOR, 1.0).reshape(-1, *([1] * (x_eval.ndim - 1)))
                    verdict["log_ratio"] = lr
                total = torch.zeros_like(x_eval) if dg is None else dg
                if w_cg > 0:
                    total = total + w_cg * classifier_correction(self.classifier, x_eval, sigma_eval, class_labels)
                return total

            x = heun_step(lambda x_, s_: denoiser(x_, s_, unet_labels), x_hat, sigma_hat, float(sigmas[i + 1]), correction)
            log_ratio = verdict["log_ratio"]
        return x
