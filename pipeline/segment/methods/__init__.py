"""One module per method: its pure tensor functions and its plan. PLANS maps each config
`method` to its plan class."""

from pipeline.segment.methods.diffseg import DiffSegPlan
from pipeline.segment.methods.diffsegmenter import DiffSegmenterPlan
from pipeline.segment.methods.goca import GocaPlan
from pipeline.segment.methods.iseg import IsegPlan

PLANS = {"iseg": IsegPlan, "diffseg": DiffSegPlan, "goca": GocaPlan, "diffsegmenter": DiffSegmenterPlan}
