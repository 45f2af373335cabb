"""Presenting meta-test results."""

import numpy as np


def format_adaptation_table(table: dict[str, np.ndarray]) -> str:
    """:return: a Markdown table of ``MetaPolicyGradient.evaluate_adaptation``'s result"""
    lines = ["| inner steps | mean return | std over tasks |", "|---:|---:|---:|"]
    for steps, mean, std in zip(table["inner_steps"], table["mean"], table["std"]):
        lines.append(f"| {steps} | {mean:.2f} | {std:.2f} |")
    return "\n".join(lines)
