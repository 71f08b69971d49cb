"""Tests for dtvit/checkpointing.py (round trips, atomicity, pruning, partial restore errors, sharded restore on
8 fake CPU devices) and dtvit/workdir.py (the workdir guard)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dtvit import checkpointing
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


def test_check_workdir(tmp_path):
  workdir = str(tmp_path / 'run')
  config = {'model': {'depth': 4, 'dim': 64}, 'total_steps': 100, 'seed': 0}
  workdir_lib.check_workdir(workdir, config)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == config
  (tmp_path / 'run' / 'marker').write_text('earlier run')

  workdir_lib.check_workdir(workdir, config)  # same config: resume
  extended = {**config, 'total_steps': 200}
  workdir_lib.check_workdir(workdir, extended)  # resume-neutral key
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['total_steps'] == 200

  changed = {**extended, 'model': {'depth': 6, 'dim': 64}, 'seed': 1}
  with pytest.raises(ValueError, match=r'(?s)different config.*model\.depth: saved 4, now 6.*seed: saved 0, '
                                       r'now 1.*--overwrite'):
    workdir_lib.check_workdir(workdir, changed)
  with pytest.raises(ValueError, match=r'new_key: saved <absent>, now true'):
    workdir_lib.check_workdir(workdir, {**extended, 'new_key': True})

  workdir_lib.check_workdir(workdir, changed, overwrite=True)
  old = [n for n in os.listdir(tmp_path) if n.startswith('run.old-')]
  assert len(old) == 1
  assert (tmp_path / old[0] / 'marker').read_text() == 'earlier run'
  with open(tmp_path / old[0] / 'config.json') as f:
    assert json.load(f)['model']['depth'] == 4
  assert os.listdir(workdir) == ['config.json']
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f) == changed
  workdir_lib.check_workdir(workdir, changed)
