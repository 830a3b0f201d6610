"""lm-eval task configs of the package (``arith``, ``listops``, ``gsm8k_local``) and their local data.

lm-eval finds them through ``--include_path``, which names the folder holding the YAMLs: :data:`TASKS_DIR`.
Print it with ``python -c 'from l2pd_harness.lm_eval_tasks import TASKS_DIR; print(TASKS_DIR)'``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
