"""Pod-scale runs planned on any machine: compile nps's own programs for a TPU topology or a GPU
cluster with abstract weights, and say per device whether they fit and how fast they can go.

    from nps.plan import Workload, make_plan, format_plan, resolve, PRESETS
    plan = make_plan(Workload("np-dpo", PRESETS["qwen2.5-7b"], batch=16, targets=4), resolve("v5e:4x4"))
    print(format_plan(plan))

``nps plan`` is ``plan_command``, the same from the command line; ``docs/scale.md`` has the measured table.
"""

from nps.plan.models import PRESETS, decoder_config
from nps.plan.planner import Plan, default_mesh, format_plan, make_plan, parse_mesh, plan_command
from nps.plan.programs import JOBS, Workload
from nps.plan.topology import Target, compile_only_environment, resolve

__all__ = ["JOBS", "PRESETS", "Plan", "Target", "Workload", "decoder_config", "default_mesh", "format_plan",
           "compile_only_environment", "make_plan", "parse_mesh", "plan_command", "resolve"]
