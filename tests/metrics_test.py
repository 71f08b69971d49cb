"""Tests for dtvit/metrics.py: event files read back, log lines, just_logging, Averager, progress bar."""
import glob
import io
import logging
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import events
from dtvit import metrics


@pytest.fixture
def info_logs(caplog):
  caplog.set_level(logging.INFO)
  return caplog


def _messages(caplog):
  return [r.getMessage() for r in caplog.records]


def test_scalars_reach_event_files_and_log(tmp_path, info_logs):
  logdir = str(tmp_path / 'tb')
  with metrics.MetricWriter(logdir, prefix='train') as writer:
    writer.write_scalars(1, {'loss': jnp.float32(0.5), 'accuracy': 0.25})
    writer.write_scalars(2, {'loss': np.array([0.125])})
  assert events.read_scalars(logdir) == {
      'train/loss': [(1, 0.5), (2, 0.125)],
      'train/accuracy': [(1, 0.25)],
  }
  assert '[1] train/loss=0.5, train/accuracy=0.25' in _messages(info_logs)
  assert '[2] train/loss=0.125' in _messages(info_logs)


def test_histograms_and_texts(tmp_path, info_logs):
  logdir = str(tmp_path / 'tb')
  writer = metrics.create_default_writer(logdir)  # process 0: writes files
  writer.write_histograms(3, {'spike_rate': jnp.array([0.0, 0.5, 1.0, 1.0])}, num_buckets=4)
  writer.write_texts(3, {'note': 'hello spikes'})
  writer.close()

  histos, texts = {}, {}
  for event in events.read_events(logdir):
    for value in event.summary.value:
      if value.HasField('histo'):
        histos[value.tag] = (event.step, value.histo)
      elif value.HasField('tensor'):
        texts[value.tag] = (event.step, value.tensor.string_val[0].decode())
  step, histo = histos['spike_rate']
  assert step == 3
  assert (histo.num, histo.min, histo.max, histo.sum) == (4, 0.0, 1.0, 2.5)
  assert texts['note/text_summary'] == (3, 'hello spikes')
  logged = _messages(info_logs)
  assert '[3] spike_rate: n=4 min=0 mean=0.625 max=1' in logged
  assert '[3] note: hello spikes' in logged


def test_just_logging_writes_no_files(tmp_path, info_logs):
  logdir = tmp_path / 'tb'
  for writer in (metrics.MetricWriter(str(logdir), just_logging=True),
                 metrics.create_default_writer(str(logdir), just_logging=True),
                 metrics.MetricWriter(None)):
    writer.write_scalars(5, {'loss': 2.0})
    writer.write_texts(5, {'t': 'x'})
    writer.flush()
    writer.close()
  assert not logdir.exists() or not list(logdir.iterdir())
  assert _messages(info_logs).count('[5] loss=2') == 3


def test_read_scalars_stops_at_a_torn_record(tmp_path):
  logdir = str(tmp_path / 'tb')
  with metrics.MetricWriter(logdir) as writer:
    writer.write_scalars(1, {'a': 1.0})
    writer.write_scalars(2, {'a': 2.0})
  (path,) = glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:  # as if the writer died while appending the last record
    f.truncate(size - 5)
  assert events.read_scalars(logdir) == {'a': [(1, 1.0)]}


def test_averager_weighted_means():
  avg = metrics.Averager()
  avg.update({'loss': 1.0, 'accuracy': jnp.array(0.5)}, weight=2)
  avg.update({'loss': jnp.array([3.0, 5.0])}, weight=jnp.array(1))  # arrays count as their mean
  avg.update({'accuracy': np.float32(1.0)}, weight=6)
  assert len(avg) == 2
  result = avg.result()
  assert result == pytest.approx({'loss': (2 * 1.0 + 1 * 4.0) / 3, 'accuracy': (2 * 0.5 + 6 * 1.0) / 8})
  assert all(type(v) is float for v in result.values())
  assert avg.result() == result  # result does not consume
  avg.reset()
  assert avg.result() == {} and len(avg) == 0
  avg.update({'loss': 3.0}, weight=0)
  assert math.isnan(avg.result()['loss'])


def test_progress_bar_visibility(capsys, monkeypatch):
  monkeypatch.delenv('DTVIT_PROGRESS', raising=False)
  bar = metrics.progress_bar(10, desc='quiet')  # stderr is captured, not a TTY
  assert bar.disable
  bar.close()

  monkeypatch.setenv('DTVIT_PROGRESS', '1')
  bar = metrics.progress_bar(10, initial=4, desc='train')
  assert not bar.disable and bar.n == 4
  bar.update(3)
  bar.close()
  err = capsys.readouterr().err
  assert 'train' in err and '7/10' in err and 'quiet' not in err

  assert metrics.progress_bar(10, disable=True).disable


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def _render(text: str) -> list[str]:
  """The lines a terminal shows for `text`: '\\r' returns to column 0 and overwrites, '\\n' ends the line."""
  lines, line, col = [], [], 0
  for ch in text:
    if ch == '\n':
      lines.append(''.join(line).rstrip())
      line, col = [], 0
    elif ch == '\r':
      col = 0
    else:
      line[col:col + 1] = [ch]
      col += 1
  return lines + [''.join(line).rstrip()]


def test_a_log_line_written_while_the_bar_is_open_comes_out_on_its_own_line():
  term = _Terminal()
  handler = logging.StreamHandler(term)  # a log handler on the bar's stream, as absl's is on stderr
  handler.setFormatter(logging.Formatter('LOG %(message)s'))
  root = logging.getLogger()
  root.addHandler(handler)
  old_level = root.level
  root.setLevel(logging.INFO)
  try:
    bar = metrics.progress_bar(10, desc='train', disable=False, file=term)
    bar.update(3)
    bar.refresh()
    logging.getLogger('dtvit.test').info('[3] loss=0.5')
    bar.update(3)
    bar.close()
    assert handler.stream is term  # given back
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
  lines = _render(term.getvalue())
  assert 'LOG [3] loss=0.5' in lines  # whole, not appended to a bar
  assert any(line.startswith('train:  60%') for line in lines)
  assert lines.index('LOG [3] loss=0.5') < max(i for i, line in enumerate(lines) if '6/10' in line)


def test_without_the_redirect_the_line_would_land_on_the_bar():
  # The failure the test above guards against, shown with a plain tqdm bar.
  term = _Terminal()
  bar = metrics.tqdm.tqdm(total=10, desc='train', file=term)
  bar.update(3)
  bar.refresh()
  term.write('LOG [3] loss=0.5\n')
  bar.close()
  assert 'LOG [3] loss=0.5' not in _render(term.getvalue())


def test_throughput_rates_pauses_and_eta():
  now = [100.0]
  meter = metrics.Throughput(total=50, batch_size=32, clock=lambda: now[0])
  assert meter.rates(5) == {}  # not started
  meter.start(1)
  now[0] += 2.0
  meter.pause()
  now[0] += 30.0  # evaluation: not training time
  meter.resume()
  now[0] += 2.0
  assert meter.rates(9) == pytest.approx({'steps_per_s': 2.0, 'images_per_s': 64.0, 'eta_s': 41 / 2.0})
  meter.start(9)
  assert meter.rates(9) == {}
  now[0] += 4.0
  assert meter.rates(50)['eta_s'] == 0.0


def test_hparams_are_the_flattened_config_in_the_event_file(tmp_path):
  from tensorboardX.proto import plugin_hparams_pb2
  config = {'seed': 0, 'data': {'name': 'digits', 'mean': (), 'augment': {'flip': False}},
            'snn': {'optimizer': {'lr': 1e-4}}, 'model': {'neuron': {'alpha': None}}}
  flat = metrics.flatten_hparams(config)
  assert flat == {'seed': 0, 'data.name': 'digits', 'data.mean': '()', 'data.augment.flip': False,
                  'snn.optimizer.lr': 1e-4, 'model.neuron.alpha': 'None'}
  logdir = str(tmp_path / 'tb')
  with metrics.MetricWriter(logdir) as writer:
    writer.write_hparams(flat, metrics=('loss', 'val_accuracy'))
  found = {}
  for event in events.read_events(logdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == 'hparams':
        found[value.tag] = plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
  hp = found['_hparams_/session_start_info'].session_start_info.hparams
  assert hp['snn.optimizer.lr'].number_value == pytest.approx(1e-4)
  assert hp['data.name'].string_value == 'digits' and hp['data.augment.flip'].bool_value is False
  assert hp['model.neuron.alpha'].string_value == 'None'
  experiment = found['_hparams_/experiment'].experiment
  assert [m.name.tag for m in experiment.metric_infos] == ['loss', 'val_accuracy']


def test_read_curves_sorts_and_keeps_one_value_per_step(tmp_path):
  logdir = str(tmp_path / 'tb')
  with metrics.MetricWriter(logdir) as writer:
    for step, loss in ((2, 1.0), (4, 0.5), (4, 0.25), (1, 2.0)):  # a resumed run wrote step 4 again
      writer.write_scalars(step, {'loss': loss, 'other': 0.0})
  curves = events.read_curves(logdir, tags=('loss', 'absent'))
  assert list(curves) == ['loss']
  steps_N, values_N = curves['loss']
  np.testing.assert_array_equal(steps_N, [1, 2, 4])
  np.testing.assert_array_equal(values_N, [2.0, 1.0, 0.25])
