"""The GPU run's plan: which stage runs in which command, under which budget, and why that budget.

Pure Python (no JAX), read by `benchmarks/gpu.sh` (each command's stages and their timeouts), by
`benchmarks/gpu_report.py` (each stage's budget beside what it took) and by the tests (every command's
worst case, header, kill graces and report included, is at most `COMMAND_LIMIT_S`).

  python benchmarks/gpu_plan.py stages 1     # "NAME SECONDS" per line: what gpu.sh runs
  python benchmarks/gpu_plan.py worst        # each command's worst case, summed term by term
  python benchmarks/gpu_plan.py shell        # the header's, report's and kill's limits, for gpu.sh

The budget model. A stage is one process, so its time on the GPU is

    T = start + sum over compiled programs of c(program) + measuring

with these figures (H100/H200, jax 0.11 with CUDA 13; none measured on one yet: the first GPU run's
`compile` records, one per program with its seconds, replace them):
- start = 10 s: Python, `import jax` and the CUDA client's start (cuDNN, cuBLAS handles); +5 s in stages
  that also start PyTorch on the GPU. The device tool's notes put a whole `import jax; jax.devices()` on
  these machines at a few seconds; 10 s leaves room for the plugin's first-use PTX loads.
- c(small) = 3 s for a program of a few ops (a matmul, an init, one layer's loss): openxla/xla#44517
  measured XLA:GPU at 0.36 s for a trivial program and 2.85 s for a 1024^2 matmul-reduce on sm_86 with
  jax 0.10.2 (its 100 s figures are Blackwell's sm_120 only; Hopper is sm_90).
- c(ViT-B step) = 15 s and c(ViT-L step) = 25 s for a whole train step (forward, backward, AdamW, EMA)
  with `scan` over layers: scan compiles one block body whatever the depth, so B and L differ in GEMM
  shapes (and autotuning), not in program size. The CPU dry run compiles the same programs at Pico size in
  1-4 s each (its report prints them); XLA:GPU adds autotuning per distinct GEMM shape, which
  tue-bmd/zea#599 found can take 10-100 s on large shapes when the Triton fusion autotuner is on.
- measuring: (warmup 2 + 3 reps x 5 steps) steps; a ViT-L/16 distill step at batch 32 is ~15 TFLOP, about
  40 ms at 40% of an H100's bf16 peak, so under 2 s per setting; PyTorch's eager steps likewise.
A stage's budget is its modelled T times about 1.4 (none of the figures is a measurement), rounded.
The program counts are the dry run's (its report shows each stage's compiles, so a stage that grows shows
before a lease). A stage that runs past its budget is killed, and keeps every figure it wrote before.

What does not fit two commands of 240 s at that model: ViT-L and the other ViT-B modes against PyTorch,
and the Pallas test file compiled. They make command 3, which runs when a lease has time left after 1 and
2 (the kernels stage's checks already compare the compiled Pallas kernels with the direct loss).
"""

from __future__ import annotations

import dataclasses
import sys

COMMAND_LIMIT_S = 240  # each command ends at most this long after it starts, everything included
KILL_GRACE_S = 2  # `timeout -k`: SIGTERM at the limit, SIGKILL this much later
# The header: nvidia-smi, then one Python that prints versions and devices and asserts the backend.
HEADER_TIMEOUTS_S = (5, 25)
REPORT_TIMEOUT_S = 5  # gpu_report.py's summary of the command's records (no JAX)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  budget_s: int
  programs: str  # what it compiles, as the budget model counts it
  model_s: float  # T of the budget model above, before the safety factor

  def __post_init__(self):
    assert self.budget_s >= self.model_s, self


COMMANDS: dict[str, tuple[Stage, ...]] = {
  "1": (
    Stage("preflight", 20, "3 small (two 8192^2 matmuls, one precision check)", 10 + 3 * 3 + 1),
    Stage(
      "recipe",
      98,
      "ViT-L/16 distill and scratch steps + 3 small (state and teacher init)",
      10 + 2 * 25 + 3 * 3 + 2,
    ),
    Stage(
      "torch_headline",
      73,
      "ViT-B/16 distill step, fp32 and bf16 + 4 small; PyTorch eager",
      15 + 2 * 15 + 4 * 3 + 5,
    ),
  ),
  "2": (
    Stage(
      "kernels",
      65,
      "12 small (8 CE checks, 4 cuDNN vs XLA) + 2 Ti/16 distill steps (fused+pallas, materialised)",
      10 + 12 * 3 + 2 * 5,
    ),
    Stage(
      "fused",
      80,
      "ViT-L/16 fused scratch and fused+pallas distill steps + 3 small",
      10 + 2 * 25 + 3 * 3 + 2,
    ),
    Stage("loss_memory", 45, "9 small (3 token counts x 3 losses)", 10 + 9 * 3),
  ),
  "3": (
    Stage(
      "torch_l16",
      95,
      "ViT-L/16 scratch and distill steps, bf16 + 4 small; PyTorch eager",
      15 + 2 * 25 + 4 * 3 + 3,
    ),
    Stage(
      "torch_b16",
      95,
      "ViT-B/16 scratch and copy, fp32 and bf16 (4 steps) + 4 small; PyTorch eager",
      15 + 4 * 15 + 4 * 3 - 20,  # - 20: the weights and PyTorch's start are shared by four rows
    ),
  ),
}
STAGES: dict[str, Stage] = {s.name: s for stages in COMMANDS.values() for s in stages}


def worst_case_s(command: str) -> int:
  """The longest `gpu.sh COMMAND` can run: every timeout reached, every kill grace used."""
  header = sum(t + KILL_GRACE_S for t in HEADER_TIMEOUTS_S)
  stages = sum(s.budget_s + KILL_GRACE_S for s in COMMANDS[command])
  return header + stages + REPORT_TIMEOUT_S + KILL_GRACE_S


def worst_case_terms(command: str) -> str:
  """The sum `worst_case_s` makes, written out: what gpu.sh's comment shows."""
  g = KILL_GRACE_S
  terms = [f"header {'+'.join(f'({t}+{g})' for t in HEADER_TIMEOUTS_S)}"]
  terms += [f"{s.name} ({s.budget_s}+{g})" for s in COMMANDS[command]]
  terms.append(f"report ({REPORT_TIMEOUT_S}+{g})")
  return f"command {command}: " + " + ".join(terms) + f" = {worst_case_s(command)} s"


def main(argv: list[str]) -> int:
  if len(argv) == 3 and argv[1] == "stages" and argv[2] in COMMANDS:
    for s in COMMANDS[argv[2]]:
      print(s.name, s.budget_s)
    return 0
  if len(argv) == 2 and argv[1] == "shell":  # gpu.sh's limits outside the stages
    smi, header = HEADER_TIMEOUTS_S
    print(KILL_GRACE_S, smi, header, REPORT_TIMEOUT_S)  # grace, smi_s, header_s, report_s
    return 0
  if len(argv) == 2 and argv[1] == "worst":
    for command in COMMANDS:
      print(worst_case_terms(command))
    return 0
  print(f"usage: {argv[0]} stages {'|'.join(COMMANDS)} | worst | shell", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv))
