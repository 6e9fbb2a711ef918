"""The scenarios daytune evaluates, by name."""

from daytune.eval.scenarios.base import DataRoot, Instance, Scenario, Settings, default_data_root
from daytune.eval.scenarios.generation import GSM8K, WikiText2, XSum
from daytune.eval.scenarios.helm import HELM_SCENARIOS
from daytune.eval.scenarios.multiple_choice import BBQ, MMLU, OpenBookQA, TruthfulQA
from daytune.eval.scenarios.sni import SNI

SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls for cls in (MMLU, TruthfulQA, BBQ, GSM8K, XSum, OpenBookQA, WikiText2, SNI, *HELM_SCENARIOS)
}

__all__ = ["SCENARIOS", "DataRoot", "Instance", "Scenario", "Settings", "default_data_root"]
