"""lm-eval task configs of the package (``arith``, ``listops``, ``pairsum``, ``changeone``, ``gsm8k_local``) and data.

lm-eval finds them through ``--include_path``, which names the folder holding the YAMLs: :data:`TASKS_DIR`.
Print it with ``python -c 'from l2pd_harness.lm_eval_tasks import TASKS_DIR; print(TASKS_DIR)'``.
"""

from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).resolve().parent


class TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose ``!function`` values name code that only lm-eval needs."""


TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def known_tasks() -> set[str]:
    """The task names and tags of the task YAMLs in :data:`TASKS_DIR`."""
    names = set()
    for path in TASKS_DIR.glob("*.yaml"):
        task = yaml.load(path.read_text(), Loader=TaskYamlLoader)
        tags = task.get("tag", [])
        names |= {task.get("task", path.stem), *([tags] if isinstance(tags, str) else tags)}
    return names
