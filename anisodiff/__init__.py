"""anisodiff: fast, exact anisotropic forward noise for diffusion models.

Squeezed Diffusion Models (SDM/HDM: noise rescaled along the principal colour axes with a
time-varying strength) and spectrally anisotropic Gaussian diffusion (SAGD: power-law and band
weights per spatial frequency) as one fused operation, ``n = A(t) eps`` with
``A(t) = S(t) (x) T_w``. See README.md and docs/design.md.
"""
from . import reference
from ._ext import available_backends, build_info
from ._version import __version__
from .flow import FlowSchedule
from .diagnostics import DataStatistics, TerminalSNR, terminal_snr
from .fit import ChannelPCA, Spectrum, fit_channel_pca, fit_spectrum, fit_statistics
from .ops import add_noise, apply_operator, covariance, shaped_noise, white_noise
from .sampling import AnisotropicNoise
from .schedule import VPSchedule
from .spec import Band, NoiseSpec, OffsetNoise, PowerLaw, PyramidNoise, SpectralTable, Squeeze, TwoBand

__all__ = [
    "AnisotropicNoise", "NoiseSpec", "Squeeze", "PowerLaw", "Band", "TwoBand", "SpectralTable", "OffsetNoise",
    "PyramidNoise",
    "VPSchedule", "FlowSchedule",
    "white_noise", "apply_operator", "shaped_noise", "add_noise", "covariance",
    "fit_channel_pca", "fit_spectrum", "fit_statistics", "ChannelPCA", "Spectrum",
    "terminal_snr", "TerminalSNR", "DataStatistics",
    "build_info", "available_backends", "reference", "__version__",
]

# diffusers.DiffusionPipeline.from_pretrained finds the anisodiff pipelines once diffusers is
# imported (anisodiff never imports diffusers itself; see anisodiff/integrations/diffusers_registry.py).
from .integrations import diffusers_registry as _diffusers_registry  # noqa: E402

_diffusers_registry.install()
