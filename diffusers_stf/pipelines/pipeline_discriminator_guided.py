"""Guided sampling under any scheduler: Discriminator Guidance (Kim et al., ICML 2023, "EDM-G++"/"ADM-G++") and
classifier guidance (Dhariwal & Nichol, NeurIPS 2021), alone or combined as DG eq. 6:

    s_guided(x, σ) = s_θ(x, σ) + w_CG·∇_x log p(y | x, σ) + w_DG·∇_x log(d/(1 − d))(x, σ).

Each is a guidance term (:mod:`diffusers_stf.guidance`): a correction of the denoiser ΔD = σ²·∇_x(…) in EDM coordinates,
written into the scheduler's own model output by :class:`~diffusers_stf.preconditioning.EvaluationFrame`:

==================  ===============================  ====================================================
model output        guided output (ΔF = ΔD/c_out)    for ε: Dhariwal & Nichol's ε̂ = ε − √(1 − ᾱ_t)·∇_{x_t}(…)
==================  ===============================  ====================================================
EDM's F (eq. 7)     F + ΔD/c_out(σ)                  (our schedulers' preconditioning; diffusers' EDM schedulers)
ε                   ε − ΔD/σ                         = ε − σ·∇_x(…) = ε − √(1 − ᾱ_t)·∇_{x_t}(…)
x₀ (``sample``)     x₀ + ΔD
v                   v − ΔD·√(1 + σ²)/σ               (v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀)
==================  ===============================  ====================================================

For EDM (Algorithm 1) the Euler direction (x − D)/σ gains −w·σ·∇_x log r, exactly DG's ``edm_sampler``. DG's boosting
(Appendix D) runs its own loop on the EDM sampler core, reading the scheduler's public state.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import AutoencoderKL, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..guidance import (
    DG_GUIDANCE_SIGMA_MAX,
    DG_GUIDANCE_SIGMA_MIN,
    ClassifierGuidance,
    DiscriminatorGuidance,
    GuidanceTerm,
    classifier_correction,
)
from ..guidance.base import check_interval, check_weight
from ..models.classifier import NoiseConditionalClassifier, check_class_labels
from ..models.discriminator import Discriminator
from ..preconditioning import Denoiser
from ..schedulers import EDMHeunScheduler
from ..schedulers.edm_sampling import churn, churn_gamma, churn_sigma, heun_step
from .pipeline_edm import EDMPipeline

# DG generate.py, boosting (Appendix D): hard-coded constants of the official sampler.
BOOST_S_CHURN = 4.0  # per-sample S_churn for rejected samples …
BOOST_S_NOISE = 1.0  # … with this S_noise …
BOOST_CHURN_PERIOD = 5  # … on steps i with i % 5 == 0;
BOOST_WEIGHT_PERIOD = 2  # on steps with i % 2 == 0 the guidance of rejected samples is …
BOOST_WEIGHT_FACTOR = 2.0  # … doubled.


def _choose(mask: torch.Tensor, if_true: float, if_false: float) -> torch.Tensor:
    """Per-sample float64 values: ``if_true`` where ``mask``, ``if_false`` elsewhere (fill kernels: no host copy)."""
    return torch.full(mask.shape, if_false, dtype=torch.float64, device=mask.device).masked_fill(mask, if_true)


class DiscriminatorGuidedPipeline(EDMPipeline):
    """Sampling with Discriminator Guidance and/or classifier guidance under this package's schedulers or any
    diffusers scheduler whose model output and noise level :class:`~diffusers_stf.preconditioning.EvaluationFrame`
    can read (DDPM, DDIM, PNDM, DEIS, DPM-Solver, UniPC, Euler, Euler ancestral, Heun, KDPM2, LMS, EDM-Euler,
    EDM-DPMSolver; others are refused by name). Without a discriminator and a classifier, or with all weights 0, it is
    exactly unguided sampling (:class:`EDMPipeline`, diffusers' ``DDPMPipeline``, …).

    Args:
        unet: the score network: F of the scheduler's preconditioning for our schedulers, or the ε/x₀/v network of
            the scheduler's ``prediction_type``.
        scheduler: a scheduler (see above).
        discriminator: a :class:`~diffusers_stf.Discriminator` trained on real vs. this model's samples (optional).
        classifier: a :class:`~diffusers_stf.NoiseConditionalClassifier` of the data's classes (optional).
        guide_unet: the autoguidance guide (optional; see :class:`EDMPipeline`).
        null_class_label: the null label of a class-conditional unet trained with label dropout (see
            :class:`EDMPipeline`).
        vae, latent_scale, latent_bias, vae_pixel_range: a latent model's decoder (see :class:`EDMPipeline`); the
            discriminator and the classifier then judge latents.
    """

    _optional_components = ["discriminator", "classifier", "guide_unet", "vae"]
    model_cpu_offload_seq = "unet->guide_unet->discriminator->classifier->vae"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: EDMHeunScheduler,
        discriminator: Optional[Discriminator] = None,
        classifier: Optional[NoiseConditionalClassifier] = None,
        guide_unet: Optional[UNet2DModel] = None,
        null_class_label: Optional[int] = None,
        vae: Optional[AutoencoderKL] = None,
        latent_scale: Optional[List[float]] = None,
        latent_bias: Optional[List[float]] = None,
        vae_pixel_range: Optional[Tuple[float, float]] = None,
    ):
        super().__init__(unet=unet, scheduler=scheduler, guide_unet=guide_unet, null_class_label=null_class_label,
                         vae=vae, latent_scale=latent_scale, latent_bias=latent_bias, vae_pixel_range=vae_pixel_range)
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

    def _class_labels(self, class_labels, batch_size: int, classifier_guided: bool) -> Optional[torch.Tensor]:
        """Labels checked once per call (range and count), on the pipeline's device; None when nothing uses them."""
        conditional_disc = self.discriminator is not None and self.discriminator.config.get("num_class_embeds") is not None
        if class_labels is None:
            if classifier_guided:
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
            null = self.config.get("null_class_label")  # the null label is the last index; never a request
            limits.append(("unet", self.unet.config.num_class_embeds if null is None else null))
        num_classes = min((k for _, k in limits), default=None)
        if num_classes is None:  # a UNet with another kind of class embedding takes the labels as they are
            return class_labels
        return check_class_labels(class_labels, num_classes, batch_size).to(self.device)

    def _check_weights(self, w1, w2, w_cg):
        """(w₁, w₂, w_CG) with DG's defaults (2, 0 with a discriminator; 0, 0 without); a weight > 0 without its
        component is an error."""
        w1 = (2.0 if self.discriminator is not None else 0.0) if w1 is None else w1
        w2 = 0.0 if w2 is None else w2
        for name, w, component in (("dg_weight_1st_order", w1, "discriminator"), ("dg_weight_2nd_order", w2, "discriminator"),
                                   ("classifier_guidance_scale", w_cg, "classifier")):
            check_weight(name, w)
            if w > 0 and getattr(self, component) is None:
                raise ValueError(f"{name}={w} needs a {component}; this pipeline has none (pass {component}=...)")
        return float(w1), float(w2), float(w_cg)

    def guidance_terms(self, class_labels=None, dg_weight_1st_order: Optional[float] = None,
                       dg_weight_2nd_order: Optional[float] = None, dg_sigma_min: float = DG_GUIDANCE_SIGMA_MIN,
                       dg_sigma_max: float = DG_GUIDANCE_SIGMA_MAX,
                       classifier_guidance_scale: float = 0.0) -> List[GuidanceTerm]:
        """The DG and classifier-guidance terms of the call arguments (see ``__call__``); zero weights give no term,
        so sampling is then exactly unguided."""
        w1, w2, w_cg = self._check_weights(dg_weight_1st_order, dg_weight_2nd_order, classifier_guidance_scale)
        check_interval("(dg_sigma_min, dg_sigma_max)", (dg_sigma_min, dg_sigma_max), strict=False)
        terms: List[GuidanceTerm] = []
        if w1 > 0 or w2 > 0:
            terms.append(DiscriminatorGuidance(self.discriminator, w1, w2, dg_sigma_min, dg_sigma_max, class_labels))
        if w_cg > 0:
            terms.append(ClassifierGuidance(self.classifier, class_labels, w_cg))
        return terms

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
            given = tuple(image.shape)
            image = torch.from_numpy(np.asarray(image, dtype=np.float32))
            image = image[..., None] if image.ndim == 2 else image  # (H, W) grey
            image = image[None] if image.ndim == 3 else image  # (H, W, C)
            if image.ndim != 4 or image.shape[-1] != self.unet.config.in_channels:
                raise ValueError(f"a numpy image is channel-last, (H, W), (H, W, C) or (N, H, W, C) with C = "
                                 f"{self.unet.config.in_channels}, got shape {given}; pass a channel-first image as a "
                                 "torch tensor")
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
        guidance_scale: float = 1.0,
        autoguidance_scale: float = 1.0,
        guidance_interval: Optional[Tuple[float, float]] = None,
        guidance_terms: Optional[Sequence[GuidanceTerm]] = None,
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
            dg_weight_2nd_order: w₂, the weight on the corrector evaluation of a Heun-like step (default 0).
            dg_sigma_min, dg_sigma_max: the discriminator guides only where σ of the evaluation is in this window
                (default: DG's VP time window [0.01, 1]).
            boosting: DG Appendix D: samples the discriminator rejects (log r < 0 at the previous step) are churned
                with S_churn = 4 every 5th step and have their guidance doubled every 2nd step. Needs w₁ > 0 and one
                of our EDM schedulers.
            classifier_guidance_scale: w_CG, the classifier guidance weight on every evaluation (default 0).
            guidance_scale: w of classifier-free guidance (1: off; see :class:`EDMPipeline`).
            autoguidance_scale: w of autoguidance with ``guide_unet`` (1: off).
            guidance_interval: (σ_lo, σ_hi) of classifier-free guidance and autoguidance (DG keeps its own window).
            guidance_terms: further guidance terms (:mod:`diffusers_stf.guidance`), added to the ones above.
            image: SDEdit image-to-image (DG §5.3): start from this image ([0, 1]; PIL, a list of PIL images, array or
                tensor) noised to the level of step N − round(strength·N), instead of from pure noise.
            strength: fraction of the schedule to run from ``image`` (1: all steps).
            eta: DDIM's η, for ``DDIMScheduler`` (ignored by schedulers whose ``step`` takes no ``eta``).
            output_type: ``pil``, ``np``, ``pt`` or ``latent`` (the final sample, unclamped, in the sampling dtype).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        self._check_components()
        self._check_conditioning()
        source = None
        if image is not None:
            source = self._prepare_image(image)
            batch_size = source.shape[0]
        elif strength != 1.0:
            raise ValueError("strength is only used together with image")
        batch_size, num_inference_steps = self._check_inputs(batch_size, num_inference_steps, output_type, generator)
        w1, _, w_cg = self._check_weights(dg_weight_1st_order, dg_weight_2nd_order, classifier_guidance_scale)
        class_labels = self._class_labels(class_labels, batch_size, w_cg > 0)
        terms = self.guidance_terms(class_labels, dg_weight_1st_order, dg_weight_2nd_order, dg_sigma_min,
                                    dg_sigma_max, classifier_guidance_scale)
        terms += self.cfg_and_autoguidance_terms(class_labels, guidance_scale, autoguidance_scale, guidance_interval)
        terms += list(guidance_terms or ())
        if boosting:
            self._check_boosting(w1, terms)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        frame = None if boosting else self.evaluation_frame(terms)
        first_step = self._first_step(num_inference_steps, strength) if source is not None else 0
        begin = first_step * self.scheduler.order

        if source is None:
            sample = self.prepare_latents(batch_size, generator, latents)
        else:  # SDEdit: the image noised to the level of the first evaluation
            noise = self.prepare_latents(batch_size, generator, latents) / self.scheduler.init_noise_sigma
            sample = self.scheduler.add_noise(source, noise, self.scheduler.timesteps[begin : begin + 1])
        if boosting:
            sample = self._sample_boosted(sample, first_step, terms, class_labels, generator)
        else:
            sample = self.denoising_loop(sample, class_labels, terms, generator, begin, {"eta": eta}, frame)
        image = self.postprocess(self.check_finite(sample), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _check_boosting(self, w1: float, terms: Sequence[GuidanceTerm]):
        if w1 == 0:
            raise ValueError("boosting=True needs dg_weight_1st_order > 0 (it acts on the first-order log ratio)")
        if not (hasattr(self.scheduler, "sigmas_hat") and hasattr(self.scheduler, "preconditioning")):
            raise ValueError("boosting=True needs one of our EDM schedulers (EDMHeunScheduler, EDMStochasticScheduler)")
        if not all(isinstance(term, (DiscriminatorGuidance, ClassifierGuidance)) for term in terms):
            raise ValueError("boosting=True runs DG's own sampler, which combines with classifier guidance only; "
                             "pass no guidance_terms")

    def _sample_boosted(self, sample, first_step, terms: Sequence[GuidanceTerm], class_labels, generator):
        """DG's EDM-G++ sampler with boosting (``generate.py:edm_sampler``, Appendix D): per-sample σ̂ on the shared
        EDM sampler core (:func:`~diffusers_stf.schedulers.edm_sampling.heun_step`).

        The scheduler provides the noise levels σ_i, its churn σ̂_i (EDM Algorithm 2) and its preconditioning; samples
        with log r < 0 at the previous Euler evaluation are churned with S_churn = 4 on every 5th step and get their
        discriminator guidance doubled on every 2nd step. All per-sample decisions stay on the device (no host sync
        per step); the churn noise is drawn on every step, as DG's ``randn_like``, and scaled by zero where nothing
        churns. Classifier guidance is added at every evaluation.
        """
        scheduler = self.scheduler
        precond = scheduler.preconditioning
        config = scheduler.config
        s_churn, s_noise = float(config.get("s_churn", 0.0)), float(config.get("s_noise", 1.0))
        s_tmin, s_tmax = float(config.get("s_tmin", 0.0)), config.get("s_tmax")
        s_tmax = math.inf if s_tmax is None else float(s_tmax)  # None: no upper bound
        denoiser = Denoiser(self.unet, precond)
        unet_labels = class_labels if self.unet_is_conditional else None
        n, batch, device = scheduler.num_inference_steps, sample.shape[0], sample.device
        sigmas = scheduler.sigmas
        dg = next(term for term in terms if isinstance(term, DiscriminatorGuidance))
        classifier_terms = [term for term in terms if isinstance(term, ClassifierGuidance)]
        window = dg.sigma_interval
        w1, w2 = dg.weights
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
                total = torch.zeros_like(x_eval, dtype=torch.float64)
                if weight > 0:
                    guided, lr = dg.correction_and_log_ratio(x_eval, sigma_eval, weight)
                    if first_order:
                        if step % BOOST_WEIGHT_PERIOD == 0:
                            guided = guided * _choose(lr < 0, BOOST_WEIGHT_FACTOR, 1.0).reshape(-1, *([1] * (x_eval.ndim - 1)))
                        verdict["log_ratio"] = lr
                    total = total + guided
                for term in classifier_terms:
                    total = total + term.guidance_scale * classifier_correction(term.classifier, x_eval, sigma_eval,
                                                                                term.class_labels)
                return total

            x = heun_step(lambda x_, s_: denoiser(x_, s_, unet_labels), x_hat, sigma_hat, float(sigmas[i + 1]), correction)
            log_ratio = verdict["log_ratio"]
        return x
