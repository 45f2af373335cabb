"""
The MuJoCo locomotion task families (``envs.py``: Gymnasium's v5 envs with a task), their batched physics twin
(``batched.py``: all sub-envs stepped as arrays, bit for bit) and its compiled physics loop (``kernel.py``).
Imported only when one of them is made: MuJoCo is loaded then.
"""
