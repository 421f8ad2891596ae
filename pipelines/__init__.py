from .pipeline_cheers import CheersPipeline, CheersPipelineOutput
from .sampling import denoise, guided_velocity
from .scheduling_cheers import CheersFlowMatchScheduler
