"""jaxflow: how stable are diffusion and flow-matching generative models?

Closed-form laws on Gaussian paths give exact fields; diffrax integrates the
PF-ODE and reverse SDE; forward-mode autodiff gives Jacobians, singular values
and the instability measures of paper 000.
"""

import importlib.metadata

from . import data as data
from . import nn as nn
from ._batch_generate import AbstractSchedule as AbstractSchedule
from ._batch_generate import Chunks as Chunks
from ._batch_generate import JointSteps as JointSteps
from ._batch_generate import LaneRefill as LaneRefill
from ._batch_generate import batch_generate as batch_generate
from ._batching import batch_map as batch_map
from ._batching import chunk_size as chunk_size
from ._batching import use_cpu_devices as use_cpu_devices
from ._fields import AbstractField as AbstractField
from ._fields import AbstractVelocityField as AbstractVelocityField
from ._fields import AnalyticField as AnalyticField
from ._instability import InstabilityProbability as InstabilityProbability
from ._instability import SegmentBound as SegmentBound
from ._instability import amplified_error_bound as amplified_error_bound
from ._instability import geometric_mean_singular_value as geometric_mean_singular_value
from ._instability import instability_coefficient as instability_coefficient
from ._instability import instability_lower_bound as instability_lower_bound
from ._instability import instability_probability as instability_probability
from ._instability import intrinsic_instability as intrinsic_instability
from ._instability import jacobian as jacobian
from ._instability import log_abs_det_jacobian as log_abs_det_jacobian
from ._instability import singular_values as singular_values
from ._lanes import LaneStats as LaneStats
from ._laws import AbstractLaw as AbstractLaw
from ._laws import Empirical as Empirical
from ._laws import Gaussian as Gaussian
from ._laws import GaussianMixture as GaussianMixture
from ._laws import GaussianNeighbours as GaussianNeighbours
from ._learned import InterpolantField as InterpolantField
from ._learned import LearnedField as LearnedField
from ._logdet import generate_with_jacobian as generate_with_jacobian
from ._logdet import geometric_mean_from_log_det as geometric_mean_from_log_det
from ._logdet import invert_with_log_det as invert_with_log_det
from ._logdet import log_det_estimate as log_det_estimate
from ._logdet import log_det_generation as log_det_generation
from ._lyapunov import LyapunovSpectrum as LyapunovSpectrum
from ._lyapunov import alignment as alignment
from ._lyapunov import lyapunov_spectrum as lyapunov_spectrum
from ._lyapunov import lyapunov_spectrum_of_map as lyapunov_spectrum_of_map
from ._matrix_free._operator import GenerationMap as GenerationMap
from ._matrix_free._operator import generation_map as generation_map
from ._matrix_free._slq import log_det_slq as log_det_slq
from ._matrix_free._svd import SingularTriplets as SingularTriplets
from ._matrix_free._svd import smallest_singular_values as smallest_singular_values
from ._matrix_free._svd import top_singular_values as top_singular_values
from ._matrix_free._trace import Estimate as Estimate
from ._matrix_free._trace import trace_estimate as trace_estimate
from ._objectives import denoising_score_matching_loss as denoising_score_matching_loss
from ._objectives import flow_matching_loss as flow_matching_loss
from ._objectives import ot_pairing as ot_pairing
from ._paths import AbstractPath as AbstractPath
from ._paths import Cosine as Cosine
from ._paths import OrnsteinUhlenbeck as OrnsteinUhlenbeck
from ._paths import RectifiedFlow as RectifiedFlow
from ._results import RESULTS as RESULTS
from ._results import Outcome as Outcome
from ._results import result_messages as result_messages
from ._sample import ddpm_coefficients as ddpm_coefficients
from ._sample import ddpm_step as ddpm_step
from ._sample import reverse_sde_step as reverse_sde_step
from ._sample import sample_ddpm as sample_ddpm
from ._sample import sample_sde as sample_sde
from ._solve import default_tolerances as default_tolerances
from ._solve import generate as generate
from ._solve import invert as invert
from ._solve import reconstruct as reconstruct
from ._solve import reconstruction_error as reconstruction_error
from ._train import TrainResult as TrainResult
from ._train import TrainState as TrainState
from ._train import load_checkpoint as load_checkpoint
from ._train import train as train

try:
    __version__ = importlib.metadata.version("jaxflow")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
