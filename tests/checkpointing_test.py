"""Tests for dtvit/checkpointing.py (round trips, atomicity, pruning, partial restore errors, sharded restore on
8 fake CPU devices) and dtvit/workdir.py (the workdir guard)."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dtvit import checkpoint_trees, checkpointing
from dtvit import workdir as workdir_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(scale=1.0):
  return {
      'Dense_0': {'kernel': scale * jnp.arange(32.0).reshape(4, 8), 'bias': jnp.full((8,), scale)},
      'head': {'kernel': jnp.ones((8, 3)) * scale},
  }


def _train_state():
  params = _params()
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.1 * p + 1.0, params)
  updates, opt_state = tx.update(grads, opt_state, params)  # non-zero moments and count
  params = optax.apply_updates(params, updates)
  return {
      'params': params,
      'batch_stats': {'bn': {'mean': jnp.arange(3.0), 'var': jnp.ones(3)}},
      'opt_state': opt_state,
      'step': jnp.int32(7),
  }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_namedtuples(tmp_path):
  state = _train_state()
  meta = {'data': {'epoch': 1, 'index': np.int64(5)}, 'phase': 'ann', 'config': {'lr': 0.1, 'depth': [2, 2]}}
  with checkpointing.Checkpointer(str(tmp_path / 'ckpt')) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, meta)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    restored, restored_meta = ckpt.restore(_abstract(state))
  _assert_trees_equal(restored, state)
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  assert int(restored['opt_state'][0].count) == 1
  assert restored_meta == {'data': {'epoch': 1, 'index': 5}, 'phase': 'ann',
                           'config': {'lr': 0.1, 'depth': [2, 2]}}
  # A new process (new Checkpointer) sees the same checkpoint.
  with checkpointing.Checkpointer(str(tmp_path / 'ckpt')) as ckpt:
    assert ckpt.latest_step() == 7
    restored, _ = ckpt.restore(state)  # concrete arrays work as the target too
  _assert_trees_equal(restored, state)


def test_latest_step_pruning_intervals_and_repeated_steps(tmp_path):
  directory = tmp_path / 'ckpt'
  abstract = {'x': jax.ShapeDtypeStruct((2,), jnp.float32)}
  with checkpointing.Checkpointer(str(directory), max_to_keep=2, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(s, {'x': jnp.full((2,), float(s))}, {'step': s}) for s in range(1, 7)]
    assert saved == [True, True, False, True, False, True]  # the first save into an empty dir always happens
    assert ckpt.save(7, {'x': jnp.full((2,), 7.0)}, {'step': 7}, force=True)
    ckpt.wait()
    assert not ckpt.save(7, {'x': jnp.zeros(2)}, {'step': 7}, force=True)  # already saved: no error, no write
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert ckpt.all_steps() == [6, 7]
    restored, meta = ckpt.restore(abstract, step=6)
    np.testing.assert_array_equal(restored['x'], np.full((2,), 6.0))
    assert meta == {'step': 6}
    restored, _ = ckpt.restore(abstract)
    np.testing.assert_array_equal(restored['x'], np.full((2,), 7.0))
    with pytest.raises(FileNotFoundError, match=r'step 2 .* has steps \[6, 7\]'):
      ckpt.restore(abstract, step=2)
    assert ckpt.save(8, {'x': jnp.zeros(2), 'epoch': 3}, {'step': 8})  # Python scalars round-trip too
    restored, _ = ckpt.restore({**abstract, 'epoch': 0})
    assert restored['epoch'] == 3 and isinstance(restored['epoch'], int)
  assert sorted(os.listdir(directory)) == ['7', '8']


def test_latest_step_never_reports_a_save_in_flight(tmp_path):
  directory = tmp_path / 'ckpt'
  big = {'x': jnp.asarray(np.random.default_rng(0).random(4_000_000, dtype=np.float32))}
  with checkpointing.Checkpointer(str(directory)) as ckpt:
    ckpt.save(1, {'x': jnp.zeros(3)}, {})
    ckpt.wait()
    ckpt.save(2, big, {})
    # Read latest_step first, then the disk: if step 2 was reported, its final directory must already exist.
    while True:
      latest = ckpt.latest_step()
      finalized = (directory / '2').is_dir()
      assert latest == 1 or (latest == 2 and finalized)
      if latest == 2:
        break
    ckpt.wait()
    assert ckpt.latest_step() == 2


_INTERRUPTED_WRITER = textwrap.dedent("""
    import os, sys, time
    import numpy as np, jax.numpy as jnp
    from dtvit import checkpointing
    directory = sys.argv[1]
    ckpt = checkpointing.Checkpointer(directory)
    ckpt.save(1, {'params': {'w': jnp.arange(4.0)}}, {'step': 1})
    ckpt.wait()
    big = jnp.asarray(np.random.default_rng(0).random(16_000_000, dtype=np.float32))
    ckpt.save(2, {'params': {'w': big}}, {'step': 2})
    deadline = time.time() + 5
    while time.time() < deadline:
      names = os.listdir(directory)
      if '2' in names:
        os._exit(3)  # the write finished before we could interrupt it
      if any('.orbax-checkpoint-tmp' in n for n in names):
        os._exit(0)  # die mid-write, like a preempted job: no cleanup, no atexit
      time.sleep(0.001)
    os._exit(4)
""")


def test_interrupted_write_is_ignored_and_previous_checkpoint_intact(tmp_path):
  directory = tmp_path / 'ckpt'
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _INTERRUPTED_WRITER, str(directory)], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(directory))
  assert '1' in names and '2' not in names
  tmp_dirs = [n for n in names if n.startswith('2.orbax-checkpoint-tmp')]
  assert tmp_dirs, names

  abstract = {'params': {'w': jax.ShapeDtypeStruct((4,), jnp.float32)}}
  # Read-only restore of another run's checkpoint skips the unfinished step.
  restored = checkpointing.restore_variables(str(directory), {'params': abstract['params']})
  np.testing.assert_array_equal(restored['params']['w'], np.arange(4.0))

  # A directory holding only the unfinished write has no checkpoint, and the error says why.
  only_tmp = tmp_path / 'only_tmp'
  only_tmp.mkdir()
  os.rename(directory / tmp_dirs[0], only_tmp / tmp_dirs[0])
  with pytest.raises(FileNotFoundError, match=r'only_tmp holds no complete checkpoint.*unfinished writes'):
    checkpointing.restore_params(str(only_tmp), abstract['params'])
  os.rename(only_tmp / tmp_dirs[0], directory / tmp_dirs[0])

  with checkpointing.Checkpointer(str(directory)) as ckpt:
    assert ckpt.latest_step() == 1
    state, meta = ckpt.restore(abstract)
    np.testing.assert_array_equal(state['params']['w'], np.arange(4.0))
    assert meta == {'step': 1}
    # The step can be written again; the leftover is gone.
    assert ckpt.save(2, {'params': {'w': jnp.arange(4.0) + 1}}, {'step': 2})
    ckpt.wait()
    assert ckpt.latest_step() == 2
  assert sorted(os.listdir(directory)) == ['1', '2']


@pytest.fixture
def saved_run(tmp_path):
  directory = str(tmp_path / 'ann' / 'checkpoints')
  state = _train_state()
  with checkpointing.Checkpointer(directory) as ckpt:
    ckpt.save(100, state, {'phase': 'ann'})
  return directory, state


def test_restore_variables_loads_only_requested_collections(saved_run):
  directory, state = saved_run
  abstract = {'params': _abstract(state['params']), 'batch_stats': _abstract(state['batch_stats'])}
  restored = checkpointing.restore_variables(directory, abstract)
  assert sorted(restored) == ['batch_stats', 'params']
  _assert_trees_equal(restored['params'], state['params'])
  _assert_trees_equal(restored['batch_stats'], state['batch_stats'])
  _assert_trees_equal(checkpointing.restore_params(directory, _abstract(state['params'])), state['params'])


def test_restore_variables_errors(saved_run, tmp_path):
  directory, state = saved_run
  abstract = _abstract(state['params'])

  with pytest.raises(FileNotFoundError, match=r'init_from: checkpoint directory .*nowhere does not exist'):
    checkpointing.restore_params(str(tmp_path / 'nowhere'), abstract)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r'ann_workdir: .*empty holds no complete checkpoint'):
    checkpointing.restore_params(str(tmp_path / 'empty'), abstract, what='ann_workdir')

  renamed = {**abstract, 'Dense_1': abstract['Dense_0']}
  del renamed['Dense_0']
  with pytest.raises(ValueError, match=r"structure mismatch.*lacks 'params/Dense_1/bias'"):
    checkpointing.restore_params(directory, renamed)
  no_bias = {**abstract, 'Dense_0': {'kernel': abstract['Dense_0']['kernel']}}
  with pytest.raises(ValueError, match=r"structure mismatch.*has 'params/Dense_0/bias' which the target lacks"):
    checkpointing.restore_params(directory, no_bias)
  with pytest.raises(ValueError, match=r"no 'spikes' collection"):
    checkpointing.restore_variables(directory, {'params': abstract, 'spikes': {'x': jnp.zeros(2)}})

  wider = {**abstract, 'Dense_0': {**abstract['Dense_0'], 'kernel': jax.ShapeDtypeStruct((4, 16), jnp.float32)}}
  with pytest.raises(ValueError, match=r"Shape mismatch at 'params/Dense_0/kernel': expected \(4, 16\), "
                                       r"found \(4, 8\)"):
    checkpointing.restore_params(directory, wider)
  as_int = {**abstract, 'head': {'kernel': jax.ShapeDtypeStruct((8, 3), jnp.int32)}}
  with pytest.raises(ValueError, match=r"Dtype mismatch at 'params/head/kernel'"):
    checkpointing.restore_params(directory, as_int)


def test_resume_restore_names_mismatch(saved_run):
  directory, state = saved_run
  abstract = _abstract(state)
  abstract['opt_state'] = _abstract(optax.sgd(0.1, momentum=0.9).init(state['params']))
  with checkpointing.Checkpointer(directory) as ckpt:
    with pytest.raises(ValueError, match=r"structure mismatch.*lacks 'opt_state/0/trace/Dense_0/bias'"):
      ckpt.restore(abstract)


def test_sharded_restore_uses_the_given_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ('data',))
  replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state = {
      'params': {'w': jax.device_put(jnp.arange(24.0).reshape(8, 3), replicated)},
      'batch': jax.device_put(jnp.arange(64.0).reshape(16, 4), by_batch),
  }
  directory = str(tmp_path / 'ckpt')
  with checkpointing.Checkpointer(directory) as ckpt:
    ckpt.save(1, state, {})
    ckpt.wait()
    # Same shardings as saved, and a different one (replicated -> batch-sharded) to show the target wins.
    for w_sharding in (replicated, by_batch):
      abstract = {
          'params': {'w': jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=w_sharding)},
          'batch': jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=by_batch),
      }
      restored, _ = ckpt.restore(abstract)
      assert restored['params']['w'].sharding == w_sharding
      assert restored['batch'].sharding == by_batch
      assert len(restored['batch'].addressable_shards) == 8
      assert restored['batch'].addressable_shards[0].data.shape == (2, 4)
      _assert_trees_equal(restored, state)

  params = checkpointing.restore_params(
      directory, {'w': jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=replicated)})
  assert params['w'].sharding == replicated
  np.testing.assert_array_equal(params['w'], np.arange(24.0).reshape(8, 3))


# ------------------------------------------------------------------------------------------------------------
# A damaged latest checkpoint: moved aside, the step before it restored.


def _three_steps(directory):
  with checkpointing.Checkpointer(str(directory), max_to_keep=5) as ckpt:
    for s in (1, 2, 3):
      ckpt.save(s, {'w': jnp.full((1000,), float(s)), 'step': jnp.int32(s)}, {'step': s}, force=True)
  return {'w': jax.ShapeDtypeStruct((1000,), jnp.float32), 'step': jax.ShapeDtypeStruct((), jnp.int32)}


def _truncate_data(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / 'state') for f in fs
           if os.sep + 'd' + os.sep in os.path.join(d, f)]
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


def _delete_state(step_dir):
  for d, _, fs in os.walk(step_dir / 'state'):
    for f in fs:
      os.remove(os.path.join(d, f))


@pytest.mark.parametrize('damage', [_truncate_data, _delete_state,
                                    lambda d: os.truncate(d / 'meta' / 'metadata', 3)],
                         ids=['truncated_arrays', 'deleted_state_files', 'truncated_meta'])
def test_unreadable_latest_step_is_moved_aside_and_the_previous_restored(tmp_path, damage, caplog):
  directory = tmp_path / 'ckpt'
  abstract = _three_steps(directory)
  damage(directory / '3')
  caplog.set_level('WARNING')
  with checkpointing.Checkpointer(str(directory), max_to_keep=5) as ckpt:
    assert ckpt.latest_step() == 3  # still listed: it was committed
    state, meta = ckpt.restore_latest(abstract)
    assert meta == {'step': 2} and int(state['step']) == 2
    np.testing.assert_array_equal(state['w'], np.full((1000,), 2.0))
    assert ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(directory)) == ['1', '2', 'corrupt']
  assert os.listdir(directory / 'corrupt') == ['3']  # kept, not deleted
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1, warnings  # one line (Orbax's own warnings about the failure are held back)
  assert '\n' not in warnings[0]
  assert re.match(rf'Checkpoint step 3 in {re.escape(str(directory))} is unreadable \(\w+: .+\); moved it to '
                  rf'{re.escape(str(directory / "corrupt" / "3"))} and resuming from the step before it\.$',
                  warnings[0]), warnings[0]


def test_two_unreadable_steps_stop_and_a_mismatch_moves_nothing(tmp_path):
  directory = tmp_path / 'ckpt'
  abstract = _three_steps(directory)
  with checkpointing.Checkpointer(str(directory), max_to_keep=5) as ckpt:
    with pytest.raises(checkpoint_trees.CheckpointMismatch, match="Shape mismatch at 'w'"):
      ckpt.restore_latest({**abstract, 'w': jax.ShapeDtypeStruct((7,), jnp.float32)})
  assert sorted(os.listdir(directory)) == ['1', '2', '3']  # another tree is no damage
  _delete_state(directory / '3')
  _truncate_data(directory / '2')
  with checkpointing.Checkpointer(str(directory), max_to_keep=5) as ckpt:
    with pytest.raises(checkpointing.UnreadableCheckpointError, match=r'Checkpoints 3 and 2 .* are both '
                       r'unreadable .*Step 3 was moved to .*corrupt/3'):
      ckpt.restore_latest(abstract)
  assert sorted(os.listdir(directory)) == ['1', '2', 'corrupt']
  # A step moved aside once and written and damaged again goes next to the first.
  with checkpointing.Checkpointer(str(directory), max_to_keep=5) as ckpt:
    ckpt.save(3, {'w': jnp.zeros(1000), 'step': jnp.int32(3)}, {'step': 3}, force=True)
  _delete_state(directory / '3')
  os.rename(directory / '2', directory / 'spare')  # so that the fallback reaches a good step
  with checkpointing.Checkpointer(str(directory), max_to_keep=5) as ckpt:
    assert ckpt.restore_latest(abstract)[1] == {'step': 1}
  assert sorted(os.listdir(directory / 'corrupt')) == ['3', '3.1']


def test_extra_meta_is_merged_into_every_save(tmp_path):
  clock = iter([1.5, 4.0])
  with checkpointing.Checkpointer(str(tmp_path / 'c'), extra_meta=lambda: {'t': next(clock)}) as ckpt:
    ckpt.save(1, {'x': jnp.zeros(2)}, {'step': 1}, force=True)
    ckpt.save(2, {'x': jnp.zeros(2)}, {'step': 2}, force=True)
    ckpt.wait()
    abstract = {'x': jax.ShapeDtypeStruct((2,), jnp.float32)}
    assert ckpt.restore(abstract, step=1)[1] == {'step': 1, 't': 1.5}
    assert ckpt.restore(abstract, step=2)[1] == {'step': 2, 't': 4.0}


# ------------------------------------------------------------------------------------------------------------
# The workdir guard: which config changes a resume accepts, and the record of each launch.


def _base_config():
  phase = lambda steps: {'train_steps': steps, 'log_every': 50, 'eval_every': 0, 'checkpoint_every': 500,  # noqa: E731
                         'max_to_keep': 2, 'nonfinite': 'error', 'optimizer': {'lr': 1e-3, 'warmup_steps': 5}}
  return {'phases': 'ann,snn', 'seed': 0, 'model': {'max_time_steps': 4, 'depth': 4},
          'data': {'name': 'digits', 'num_threads': 2, 'prefetch': 4},
          'ann': phase(100), 'snn': phase(100), 'finetune': phase(0)}


@pytest.fixture
def with_keys(set_dotted):
  """with_keys(config dict, **dotted) -> a copy with those keys set."""
  return lambda config, **dotted: set_dotted(json.loads(json.dumps(config)), dotted)


def _launch(workdir, config, **kwargs):
  launch = workdir_lib.plan_launch(workdir, config, **kwargs)
  workdir_lib.record_launch(launch)
  return launch


def _history(workdir):
  with open(os.path.join(workdir, 'config_history.json')) as f:
    return json.load(f)


def test_resume_accepts_cadences_and_longer_phases_under_real_keys(tmp_path, with_keys):
  workdir = str(tmp_path / 'run')
  config = _base_config()
  launch = workdir_lib.plan_launch(workdir, config)
  assert not os.path.exists(workdir)  # planning writes nothing
  workdir_lib.record_launch(launch)
  os.makedirs(os.path.join(workdir, 'ann', 'checkpoints', '40'))
  neutral = {f'{p}.{k}': v for p in ('ann', 'snn', 'finetune')
             for k, v in [('log_every', 7), ('eval_every', 9), ('checkpoint_every', 11), ('max_to_keep', 5)]}
  changed = with_keys(config, **neutral, **{'data.num_threads': 0, 'data.prefetch': 1, 'ann.train_steps': 300,
                                         'ann.nonfinite': 'skip'})
  launch = _launch(workdir, changed)
  assert launch.allowed == () and launch.resumed_from == {'ann': 40}
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == changed
  first, second = _history(workdir)
  assert first['launch'] == 1 and first['changes'] == {} and first['resumed_from'] == {}
  assert second['launch'] == 2 and second['resumed_from'] == {'ann': 40}
  assert second['changes']['ann.train_steps'] == {'from': 100, 'to': 300}
  assert second['changes']['snn.eval_every'] == {'from': 0, 'to': 9}
  assert len(second['changes']) == len(neutral) + 4
  assert second['notes'] == ['ann extended from 100 to 300 steps: its learning-rate and mask-temperature '
                             'schedules are recomputed for 300 steps and followed from step 40 on']
  refused = {'ann.train_steps': 50,            # shorter: the checkpoints may lie beyond the new end
             'model.max_time_steps': 8,           # T_max, not a phase length
             'ann.optimizer.lr': 1e-4, 'seed': 1, 'data.name': 'cifar10'}
  for key, value in refused.items():
    with pytest.raises(ValueError, match=rf'(?s)different config.*{re.escape(key)}: saved .*, now '
                                         rf'{re.escape(json.dumps(value))}.*--allow_changes={re.escape(key)} '):
      workdir_lib.plan_launch(workdir, with_keys(changed, **{key: value}))
  with pytest.raises(ValueError, match=r"ann.nonfinite: saved \"skip\", now \"error\""):
    workdir_lib.plan_launch(workdir, with_keys(changed, **{'ann.nonfinite': 'error'}))  # skipped steps were run
  assert len(_history(workdir)) == 2  # a refused launch leaves no trace


def _under_old_names(config):
  """`config` as dtvit recorded it before the renames of `config_lib.RENAMED`."""
  old = json.loads(json.dumps(config))
  old['model']['num_steps'] = old['model'].pop('max_time_steps')
  old['model']['neuron'] = {'neuron': 'spikformer'}
  for p in workdir_lib.PHASES:
    old[p]['num_steps'] = old[p].pop('train_steps')
  return old


def test_a_run_recorded_under_old_names_resumes_without_allow_changes(tmp_path):
  """A long training started before the renames resumes under today's code, as if nothing had changed."""
  workdir = tmp_path / 'run'
  os.makedirs(workdir / 'ann' / 'checkpoints' / '40')
  (workdir / 'config.json').write_text(json.dumps(_under_old_names(_base_config()), indent=2))
  config = {**_base_config(), 'model': {**_base_config()['model'], 'neuron': {'neuron': 'spikingjelly_lif'}}}
  launch = _launch(str(workdir), config)
  assert launch.earlier and launch.changes == {} and launch.allowed == () and launch.resumed_from == {'ann': 40}
  with open(workdir / 'config.json') as f:
    assert json.load(f) == config  # rewritten under today's names
  # The old names still mean what they meant: a changed T_max is refused, a longer ANN phase accepted.
  (workdir / 'config.json').write_text(json.dumps(_under_old_names(_base_config())))
  with pytest.raises(ValueError, match='model.max_time_steps: saved 4, now 8'):
    workdir_lib.plan_launch(str(workdir), {**config, 'model': {**config['model'], 'max_time_steps': 8}})
  longer = {**config, 'ann': {**config['ann'], 'train_steps': 300}}
  assert workdir_lib.plan_launch(str(workdir), longer).notes[0].startswith('ann extended from 100 to 300 steps')


def test_checkpoint_paths_beside_the_workdir_are_recorded_from_it(tmp_path):
  """A sweep point's init_from ({root}/ann/ann/checkpoints) is stored as '{workdir}/../ann/ann/checkpoints': no
  path of this machine in the record; read back, it is the absolute path again, and the run resumes."""
  root = tmp_path / 'root'
  source = str(root / 'ann' / 'ann' / 'checkpoints')
  elsewhere = str(tmp_path / 'other' / 'ann' / 'checkpoints')
  config = _base_config()
  config['snn']['init_from'], config['ann']['init_from'] = source, elsewhere
  workdir = str(root / 'point')
  _launch(workdir, config)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['snn']['init_from'] == '{workdir}/../ann/ann/checkpoints'
  assert saved['ann']['init_from'] == elsewhere   # not beside the workdir: as given
  assert workdir_lib.read_config(workdir) == config
  assert _launch(workdir, config).changes == {}


def test_extending_a_phase_a_later_phase_started_from_is_refused(tmp_path, with_keys):
  workdir = str(tmp_path / 'run')
  _launch(workdir, _base_config())
  os.makedirs(os.path.join(workdir, 'ann', 'checkpoints', '100'))
  os.makedirs(os.path.join(workdir, 'snn', 'checkpoints', '20'))
  with pytest.raises(ValueError, match=r'ann.train_steps: saved 100, now 200 \(snn already started from the '
                                       r'100-step ann\)'):
    workdir_lib.plan_launch(workdir, with_keys(_base_config(), **{'ann.train_steps': 200}))
  assert _launch(workdir, with_keys(_base_config(), **{'snn.train_steps': 200})).notes  # the last phase may grow


def test_a_phase_that_has_not_started_may_change_every_setting(tmp_path, with_keys):
  workdir = str(tmp_path / 'run')
  _launch(workdir, _base_config())
  os.makedirs(os.path.join(workdir, 'ann', 'checkpoints', '40'))
  snn = {'snn.optimizer.lr': 1e-4, 'snn.train_steps': 10, 'snn.nonfinite': 'skip', 'finetune.optimizer.lr': 1.0}
  launch = _launch(workdir, with_keys(_base_config(), **snn))
  assert launch.allowed == () and set(launch.changes) == set(snn)
  with pytest.raises(ValueError, match=r'ann.optimizer.lr: saved 0.001, now 0.0001'):   # ann has started
    workdir_lib.plan_launch(workdir, with_keys(_base_config(), **snn, **{'ann.optimizer.lr': 1e-4}))


def test_other_changes_need_allow_changes_and_are_recorded(tmp_path, with_keys):
  workdir = str(tmp_path / 'run')
  config = _base_config()
  _launch(workdir, config)
  os.makedirs(os.path.join(workdir, 'snn', 'checkpoints', '10'))   # snn has started: its settings are fixed
  lower = with_keys(config, **{'snn.optimizer.lr': 1e-4, 'snn.optimizer.warmup_steps': 0})
  with pytest.raises(ValueError, match=r'--allow_changes=snn.optimizer.lr,snn.optimizer.warmup_steps '):
    workdir_lib.plan_launch(workdir, lower)
  with pytest.raises(ValueError, match=r'Changed keys:\n  snn.optimizer.warmup_steps: saved 5, now 0\n'):
    workdir_lib.plan_launch(workdir, lower, allow_changes=['snn.optimizer.lr'])
  with pytest.raises(ValueError, match=r"allow_changes names 'snn.optimzer', which is not a config key"):
    workdir_lib.plan_launch(workdir, lower, allow_changes=['snn.optimzer'])
  launch = _launch(workdir, lower, allow_changes=['snn.optimizer'])  # a key names its subtree
  assert launch.allowed == ('snn.optimizer.lr', 'snn.optimizer.warmup_steps')
  entry = _history(workdir)[-1]
  assert entry['allowed'] == ['snn.optimizer.lr', 'snn.optimizer.warmup_steps']
  assert entry['changes'] == {'snn.optimizer.lr': {'from': 1e-3, 'to': 1e-4},
                              'snn.optimizer.warmup_steps': {'from': 5, 'to': 0}}
  assert time.strptime(entry['time'], '%Y-%m-%dT%H:%M:%S%z')
  _launch(workdir, lower)  # the changed config is now the run's: resuming it again needs nothing
  with pytest.raises(ValueError, match=r'new_key: saved <absent>, now true'):
    workdir_lib.plan_launch(workdir, {**lower, 'new_key': True})


def test_overwrite_moves_the_earlier_run_aside_only_when_recorded(tmp_path, with_keys):
  workdir = str(tmp_path / 'run')
  _launch(workdir, _base_config())
  (tmp_path / 'run' / 'marker').write_text('earlier run')
  changed = with_keys(_base_config(), **{'model.depth': 6})
  launch = workdir_lib.plan_launch(workdir, changed, overwrite=True)
  assert os.path.exists(tmp_path / 'run' / 'marker')  # not yet: a check after planning may still fail
  workdir_lib.record_launch(launch)
  old = [n for n in os.listdir(tmp_path) if n.startswith('run.old-')]
  assert len(old) == 1
  assert (tmp_path / old[0] / 'marker').read_text() == 'earlier run'
  assert sorted(os.listdir(workdir)) == ['config.json', 'config_history.json']
  (entry,) = _history(workdir)
  assert entry['moved_aside'] == str(tmp_path / old[0])
  workdir_lib.plan_launch(workdir, changed)


def test_a_key_newer_than_the_run_is_free_at_its_default_only(tmp_path, with_keys):
  workdir = str(tmp_path / 'run')
  older = _base_config()  # the run was started by a dtvit without data.placement
  config = with_keys(older, **{'data.placement': 'host'})
  _launch(workdir, older)
  defaults = {'data.placement': 'host'}
  launch = workdir_lib.plan_launch(workdir, config, defaults=defaults)
  assert launch.changes == {'data.placement': ('<absent>', 'host')} and launch.allowed == ()
  assert launch.notes == ('data.placement is newer than the run and at its default ("host"), which is what the '
                          'run did',)
  with pytest.raises(ValueError, match=r'data.placement: saved <absent>, now "device"'):
    workdir_lib.plan_launch(workdir, with_keys(older, **{'data.placement': 'device'}), defaults=defaults)
  with pytest.raises(ValueError, match=r'data.placement: saved <absent>, now "host"'):
    workdir_lib.plan_launch(workdir, config)  # without defaults: refused
