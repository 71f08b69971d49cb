"""The learned-mask phase's score dynamics at each paper setting's real step count, simulated with dtvit's own
cost (`dtvit.masks.time_step_cost`, the recipe's kind, weight, target and temperature) and optimizer
(`dtvit.optim.make_optimizer` with the recipe's `snn.optimizer`: the score group, its lr and any clipping).

  python experiments/paper_scale/score_dynamics.py            # every setting and mode, both scenarios
  python experiments/paper_scale/score_dynamics.py --only=cifar10_4_384 --full   # run to the phase's end

Only the scores are simulated; the network is not. The cross-entropy's gradient on the scores is MODELLED: each
score (module l, step t) gets a constant pull up a[l, t] = pull x U(0, 1) x (time_cost / modules) - how much the
step helps the loss, as a share of the cost's push on one score - plus Gaussian noise of std noise x
(time_cost / modules) per step, both through the straight-through mask's gradient sigmoid'(s / tau) / tau, as the
real cross-entropy's gradient reaches the scores. The scores start as the model's do (`MaskConfig.score_init`
+- `score_init_spread`, uniform). Scenarios: 'cost alone' (pull 0, noise 0: the calibration's
own case) and 'modelled CE' (pull 0.9, noise 2: nine tenths of the scores' pulls below the push, most steps
useful). T_avg is the mean over modules of the hard step counts, as the evaluation reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dtvit import masks as masks_lib
from dtvit import models
from dtvit import optim
from dtvit.models import paths
from experiments.paper_scale import settings as settings_lib

SCENARIOS = {"cost alone": (0.0, 0.0), "modelled CE": (0.9, 2.0)}
DEADLINE = 0.6  # the SNN phase's fraction by which T_avg must reach its target


@dataclasses.dataclass(frozen=True)
class Phase:
  """What the dynamics depend on: the SNN phase of a resolved config."""
  steps: int
  modules: int
  t_max: int
  pc: object
  mask: object

  @property
  def key(self):
    return (self.steps, self.modules, self.t_max, json.dumps(self.pc.to_dict(), sort_keys=True, default=str))


def phase_of(setting: str, mode: str) -> Phase:
  config = settings_lib.get_config(f"{setting},{mode}")
  model = models.build_model(config.model, 10, phase="snn")
  return Phase(config.snn.train_steps, len(paths.masked_modules(model)), config.model.max_time_steps, config.snn,
               config.model.mask)


def simulate(ph: Phase, *, pull: float, noise: float, seed: int = 0, full: bool = False) -> dict:
  """Runs the phase's score updates; stops at the first step with T_avg <= target unless `full`.

  Returns {'reached_step' (None if never), 'reached_fraction', 'T_avg_end', 'T_avg_at' {fraction: T_avg}}."""
  pc, mask = ph.pc, ph.mask
  names = [f"m{i}" for i in range(ph.modules)]
  init = models.MaskConfig(**mask.to_dict()).score_initializer()  # the model's own (with its spread)
  key_init = jax.random.key(seed + 1)
  params = {n: {paths.MODULE_MASK: {paths.SCORES: init(jax.random.fold_in(key_init, i), (ph.t_max,))}}
            for i, n in enumerate(names)}
  initial = np.sort(np.concatenate([np.asarray(params[n][paths.MODULE_MASK][paths.SCORES]) for n in names]))
  tx, _ = optim.make_optimizer(pc.optimizer, train_steps=ph.steps, trainable=("weights", "neuron", "scores"))
  push = pc.time_cost / ph.modules
  key_pull, key_noise = jax.random.split(jax.random.key(seed))
  pull_MT = pull * push * jax.random.uniform(key_pull, (ph.modules, ph.t_max))
  tau = pc.temperature_start

  def cost(p):
    scores = {n: p[n][paths.MODULE_MASK][paths.SCORES] for n in names}
    return pc.time_cost * masks_lib.time_step_cost(
        scores, kind=pc.cost_kind, target=pc.target_steps or None, temperature=tau, monotone=mask.monotone,
        semantics=mask.semantics)

  def t_avg(p):
    return jnp.mean(jnp.stack([jnp.sum(masks_lib.hard_mask(p[n][paths.MODULE_MASK][paths.SCORES],
                                                            monotone=mask.monotone)) for n in names]))

  def step(carry, i):
    p, opt_state = carry
    s_MT = jnp.stack([p[n][paths.MODULE_MASK][paths.SCORES] for n in names])
    surrogate = jax.nn.sigmoid(s_MT / tau) * (1 - jax.nn.sigmoid(s_MT / tau)) / tau
    xi = noise * push * jax.random.normal(jax.random.fold_in(key_noise, i), s_MT.shape)
    ce_MT = -(pull_MT + xi) * surrogate  # d(modelled CE)/ds: the pull up, through the STE gradient
    grads = jax.grad(cost)(p)
    grads = {n: {paths.MODULE_MASK: {paths.SCORES: grads[n][paths.MODULE_MASK][paths.SCORES] + ce_MT[k]}}
             for k, n in enumerate(names)}
    updates, opt_state = tx.update(grads, opt_state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    return (p, opt_state), t_avg(p)

  def run(p):
    (p, _), t_avg_N = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(ph.steps))
    return t_avg_N

  if full:
    t_avg_N = np.asarray(_optimised(run, params)(params))
  else:
    t_avg_N = _until_reached(step, params, tx, ph.steps, pc.target_steps)
  hit = np.flatnonzero(t_avg_N <= pc.target_steps)
  reached = int(hit[0]) + 1 if hit.size else None
  at = {f: float(t_avg_N[min(int(f * ph.steps), len(t_avg_N)) - 1]) for f in (0.25, 0.5, 0.6, 1.0)
        if int(f * ph.steps) <= len(t_avg_N)}
  return {"steps": ph.steps, "modules": ph.modules, "initial_scores": initial, "reached_step": reached,
          "reached_fraction": None if reached is None else reached / ph.steps, "T_avg_end": float(t_avg_N[-1]),
          "T_avg_at": at}


def _optimised(fn, *args):
  """`fn` jitted for `args` with XLA's backend optimisations on, even where XLA_FLAGS turn them off (the test
  suite does, to compile faster): a simulation of up to 2 M steps runs about twice as fast with them."""
  lowered = jax.jit(fn).lower(*args)
  try:
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 3})
  except Exception:  # a backend without that option
    return lowered.compile()


def _until_reached(step, params, tx, num_steps: int, target: float, chunk: int = 20_000) -> np.ndarray:
  """Runs `step` in scanned chunks until T_avg <= target or the phase ends; the T_avg of every step run."""

  def run_chunk(carry, start):
    return jax.lax.scan(step, carry, start + jnp.arange(chunk))

  carry, out, done = (params, tx.init(params)), [], 0
  run_chunk = _optimised(run_chunk, carry, jnp.int32(0))
  while done < num_steps:
    carry, t_avg_N = run_chunk(carry, jnp.int32(done))
    out.append(np.asarray(t_avg_N)[:num_steps - done])
    done += chunk
    if (out[-1] <= target).any():
      break
  return np.concatenate(out)


def unique_phases() -> dict:
  """{phase key: (phase, [(setting, mode), ...])}: settings whose SNN phases have identical dynamics share one
  simulation (CIFAR-10 and CIFAR-100; the three ImageNet variants, which all have 16 masked modules)."""
  groups = {}
  for s in settings_lib.SETTINGS:
    for mode in ("hybrid", "direct"):
      ph = phase_of(s.name, mode)
      groups.setdefault(ph.key, (ph, []))[1].append((s.name, mode))
  return groups


def main(argv=None) -> list:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="", help="comma-separated settings")
  parser.add_argument("--full", action="store_true", help="simulate to the end of the phase")
  args = parser.parse_args(argv)
  only = set(filter(None, args.only.split(",")))
  rows = []
  print("| settings (mode) | SNN steps | modules | scenario | T_avg <= target at step | % of the phase | "
        "T_avg at 25 / 50 / 60 / 100% |")
  print("| --- | ---: | ---: | --- | ---: | ---: | --- |")
  for ph, members in unique_phases().values():
    if only and not only & {s for s, _ in members}:
      continue
    for scenario, (pull, noise) in SCENARIOS.items():
      r = simulate(ph, pull=pull, noise=noise, full=args.full)
      r.update(settings=members, scenario=scenario)
      rows.append(r)
      names = ", ".join(f"{s} ({m})" for s, m in members)
      pct = "never" if r["reached_fraction"] is None else f"{100 * r['reached_fraction']:.1f}%"
      at = " / ".join(f"{v:.2f}" for v in r["T_avg_at"].values())
      print(f"| {names} | {ph.steps:,} | {ph.modules} | {scenario} | {r['reached_step'] or '-'} | {pct} | {at} |")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
