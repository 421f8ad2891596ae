from .pipeline_cheers import CheersPipeline, CheersPipelineOutput, denoise, guided_velocity
from .scheduling_cheers import CheersFlowMatchScheduler
