"""The parallel plan, computed before anything runs: pipeline layouts and placement, the stages
each rank builds, the parallel sizes and their divisibility rules, the context-parallel index."""

from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import Stage, StagePlan

__all__ = ["Stage", "StagePlan", "build_stage_plan"]
