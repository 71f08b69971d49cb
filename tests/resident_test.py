"""`data.placement='device'` (dtvit/data/resident.py): the train split resident on the device, the host sending
record indices. Its crop and flip equal the host pipeline's ops, its batches equal the host pipeline's records
when nothing random is applied, its order is a function of (seed, step) split over processes as the host
pipeline's is, the same on 1 or 8 devices, and a run with it resumes bitwise. Configs it cannot serve are
refused before anything is written."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dtvit import sharding
from dtvit import train
from dtvit.data import augment
from dtvit.data import pipeline
from dtvit.data import resident
from dtvit.data import sources


def _data_config(**augment_overrides):
  c = pipeline.default_data_config()
  c.placement = "device"
  c.augment.crop_padding = 0
  c.augment.update(augment_overrides)
  return c


def test_shift_flip_equals_the_host_crop_and_flip_for_every_offset():
  image = np.random.default_rng(0).random((5, 6, 3)).astype(np.float32)
  pad = 2
  cases = [(dy, dx, f) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1) for f in (False, True)]
  dy_B, dx_B, flip_B = (jnp.asarray([c[i] for c in cases]) for i in range(3))
  out = np.asarray(resident.shift_flip(jnp.broadcast_to(image, (len(cases), 5, 6, 3)), dy_B, dx_B, flip_B))
  for b, (dy, dx, flip) in enumerate(cases):
    want = augment.shift(image, dy, dx)
    np.testing.assert_array_equal(out[b], want[:, ::-1] if flip else want)


@pytest.mark.parametrize("source", ["digits", "image_folder"])
def test_without_random_ops_a_batch_is_the_host_pipelines_records(source, image_folder, tmp_path):
  cfg = _data_config()
  if source == "image_folder":  # uint8 records, stored at 12 px, resized to the model's 8 px
    cfg.name, cfg.archive, cfg.image_size = "image_folder", image_folder(str(tmp_path), 12, 3, per_class=4), 8
  ds = sources.load(cfg)
  table = resident.load_table(cfg)
  index_B = np.array([3, 0, 7, 3, ds.info.num_train - 1], np.int32)
  fetch = resident.make_fetch(cfg, seed=0, num_classes=ds.info.num_classes)
  chunk = np.stack([index_B[::-1], index_B], axis=1)  # step 1 takes the second column
  got = jax.jit(fetch)(jnp.int32(1), {"index": chunk, **table})
  want = pipeline._train_batch({"index": index_B.astype(np.int64), "seed": np.arange(5, dtype=np.int64)}, ds=ds,
                               aug=ml_collections.FrozenConfigDict(cfg.augment), method=cfg.resize_method,
                               num_classes=ds.info.num_classes)
  np.testing.assert_allclose(got["image"], want["image"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got["label"], want["label"])
  np.testing.assert_array_equal(got["target"], want["target"])


def test_each_epoch_visits_every_record_once_and_a_batch_depends_only_on_seed_and_step():
  stream = resident.index_batches(10, global_batch_size=4, seed=1)
  first, second = next(stream), next(stream)
  assert first is second and first["index"].shape == (4, resident.CHUNK)  # one transfer for a chunk of steps
  steps = [b["index"][:, s] for s, b in enumerate([first, second] + [next(stream) for _ in range(8)])]
  flat = np.concatenate(steps)  # 10 steps x 4 = 4 epochs of 10
  for epoch in range(4):
    assert sorted(flat[10 * epoch:10 * (epoch + 1)]) == list(range(10))
  assert not np.array_equal(flat[:10], flat[10:20])  # each epoch reshuffled
  resumed = resident.index_batches(10, global_batch_size=4, seed=1, start_step=3)
  np.testing.assert_array_equal(np.concatenate([next(resumed)["index"][:, s] for s in (3, 4)]), flat[12:20])
  beyond = resident.index_batches(10, global_batch_size=4, seed=1, start_step=resident.CHUNK - 1)
  last, after = next(beyond), next(beyond)  # the chunk ends: the next step gets the next chunk
  whole = resident.index_batches(10, global_batch_size=4, seed=1, start_step=resident.CHUNK)
  np.testing.assert_array_equal(after["index"], next(whole)["index"])
  assert last is not after
  halves = [next(resident.index_batches(10, global_batch_size=4, seed=1, start_step=3, process_index=p,
                                        process_count=2))["index"][:, 3] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), flat[12:16])  # process p: its slice of the batch
  other = next(resident.index_batches(10, global_batch_size=4, seed=2))["index"][:, :3]
  assert not np.array_equal(other.T.reshape(-1), flat[:12])


def test_crops_and_flips_cover_their_range_and_do_not_depend_on_the_device_count():
  cfg = _data_config(crop_padding=2, flip=True)
  table = resident.load_table(cfg)
  fetch = resident.make_fetch(cfg, seed=0, num_classes=10)
  index_B = np.repeat(np.arange(64, dtype=np.int32)[:, None], 8, axis=1)  # a chunk of 8 steps
  outs = []
  for num_devices in (1, 8):
    mesh = sharding.make_mesh(num_devices)
    rep = sharding.replicated(mesh)
    batch = {"index": sharding.global_batch(mesh, {"index": index_B})["index"],
             **{k: jax.device_put(v, rep) for k, v in table.items()}}
    outs.append(jax.device_get(jax.jit(fetch)(jnp.int32(5), batch)))
  np.testing.assert_array_equal(outs[0]["image"], outs[1]["image"])
  dy_B, dx_B, flip_B = resident.draw_shift_flip(resident.augment_key(0, 5), 4096, padding=2, flip=True)
  assert set(np.asarray(dy_B)) == set(np.asarray(dx_B)) == set(range(-2, 3))
  assert 0.45 < float(jnp.mean(flip_B)) < 0.55
  other_step = jax.jit(fetch)(jnp.int32(6), {"index": index_B, **table})
  assert not np.array_equal(np.asarray(other_step["image"]), outs[0]["image"])  # a new draw every step


@pytest.mark.parametrize("overrides, message", [
    ({"data.augment.randaugment_ops": 2}, "data.augment.randaugment_ops=2 needs the host pipeline"),
    ({"data.augment.random_resized_crop": True}, "data.augment.random_resized_crop=True needs the host"),
    ({"data.placement": "gpu"}, "data.placement='gpu'; choose 'host'"),
])
def test_configs_it_cannot_serve_are_refused_before_anything_is_written(tiny_config, tmp_path, overrides, message):
  config = tiny_config(**{"data.placement": "device", **overrides})
  with pytest.raises(ValueError, match=message):
    train.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.slow
def test_a_run_on_resident_data_trains_and_resumes_bitwise(tiny_config, tmp_path, saved_state, same_tree):
  config = tiny_config(**{"phases": "ann", "ann.train_steps": 6, "ann.checkpoint_every": 3, "ann.log_every": 3,
                          "data.placement": "device", "data.augment.flip": True,
                          "data.augment.mixup_alpha": 0.5, "mesh.num_devices": 2})
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  summary = train.run(config, whole)
  train.run(config, parts, stop_at_step=3)
  train.run(config, parts)
  for step in (3, 6):
    same_tree(saved_state(os.path.join(parts, "ann", "checkpoints"), step),
              saved_state(os.path.join(whole, "ann", "checkpoints"), step))
  first = saved_state(os.path.join(whole, "ann", "checkpoints"), 3)["params"]
  last = saved_state(os.path.join(whole, "ann", "checkpoints"), 6)["params"]
  assert not np.array_equal(first["head"]["kernel"], last["head"]["kernel"])  # it trained
  assert summary["ann"]["train_loss_last"] < summary["ann"]["train_loss_first"]


def test_a_run_from_before_data_placement_resumes_under_the_default(tiny_config, tmp_path):
  config = tiny_config(**{"phases": "ann", "ann.train_steps": 2, "mesh.num_devices": 1})
  workdir = str(tmp_path)
  summary = train.run(config, workdir)
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["data"]["placement"]
  with open(path, "w") as f:
    json.dump(saved, f)
  assert train.run(config, workdir) == summary  # accepted: 'host' is what the older run did
  config.data.placement = "device"
  with pytest.raises(ValueError, match=r"data.placement: saved <absent>, now \"device\""):
    train.run(config, workdir)
