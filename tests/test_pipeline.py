import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import wapar_jax as wap
from wapar_jax import errors, examples
from wapar_jax._src import layers
from wapar_jax._src.emit import pipeline
from wapar_jax._src.verify import hlo
from wapar_jax.examples import _gpt
from wapar_jax.examples._common import class_loss

# Four layers, so that 2 stages x 2 repeats and 4 stages both cut it into equal chunks.
_CFG = _gpt.GPTConfig(4, 64, 4, 256, 32)
_BUILD = {
  "scan": lambda b: _gpt.gpt_linen("scan4", "", _CFG, b, 32, scan_layers=True),
  "linen": lambda b: _gpt.gpt_linen("linen4", "", _CFG, b, 32),
  "nnx": lambda b: _gpt.gpt_nnx("nnx4", "", _CFG, b, 32),
  # Eight layers: 4 stages x 2 repeats.
  "linen8": lambda b: _gpt.gpt_linen("linen8", "", dataclasses.replace(_CFG, n_layer=8), b, 32),
  # The fast tier's: two layers, narrow, short rows (a quarter of the compile).
  "scan2": lambda b: _gpt.gpt_linen("scan2", "", _gpt.GPTConfig(2, 32, 2, 64, 16), b, 16, True),
}


def _inputs(kind, batch_size=8):
  ex = _BUILD[kind](batch_size)
  return ex, ex.init_params(jax.random.key(0)), ex.make_batch(jax.random.key(1))


def _close(got, want, rtol=1e-4):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(np.max(np.abs(np.asarray(w))))  # numpy: no compile per leaf shape
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale + 1e-9)


def _pipelined_grads(ex, params, batch, stages, repeats, micro, data):
  layout = pipeline.stage_layout(ex.loss_fn, ex.params, ex.batch, stages, repeats, micro)
  mesh = Mesh(np.array(jax.devices()[: stages * data]).reshape(stages, data), ("stage", "data"))
  loss_fn = pipeline.pipelined_loss(ex.loss_fn, ex.params, ex.batch, layout, mesh)
  specs = layout.storage_specs([P()] * len(layout.layer_params), [P()] * len(layout.rest))
  named = lambda tree: jax.tree.map(  # noqa: E731
    lambda s: NamedSharding(mesh, s), tree, is_leaf=lambda x: isinstance(x, P)
  )
  storage = jax.device_put(layout.to_storage(params), named(specs))
  rows = jax.tree.map(lambda _: NamedSharding(mesh, P(("data", "stage"))), batch)
  step = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = step(storage, jax.device_put(batch, rows))
  hlo = step.lower(storage, batch).compile().as_text()
  return loss, layout.from_storage(grads, jax.tree.structure(params)), hlo


@pytest.mark.parametrize(
  "kind, stages, repeats, micro, data",
  [
    # PP = 4 circular with a data axis; the scan GPT's PP = 2 GPipe and circular schedules with
    # a data axis are the FSDP-stage tests'.
    pytest.param("linen8", 4, 2, 4, 2, marks=pytest.mark.slow),
    pytest.param("nnx", 2, 2, 4, 1, marks=pytest.mark.slow),
  ],
)
def test_pipeline_gives_the_single_device_loss_and_gradients(kind, stages, repeats, micro, data):
  """GPipe (repeats 1) and circular schedules, with and without a data axis, on a scan over
  layers, a linen Python loop and an NNX list of blocks."""
  ex, params, batch = _inputs(kind)
  want_loss, want_grads = jax.jit(jax.value_and_grad(ex.loss_fn))(params, batch)
  loss, grads, hlo = _pipelined_grads(ex, params, batch, stages, repeats, micro, data)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  _close(grads, want_grads)
  # One permute passes activations on, one passes their gradients back, in loops of
  # R * M + S - 1 pipeline iterations.
  assert len(re.findall(r"collective-permute(?:-start)?\(", hlo)) >= 2
  trips = {int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"', hlo)}
  assert repeats * micro + stages - 1 in trips


def _fsdp_specs(layout, params, data):
  """Storage specs of FSDP inside a stage: each layer weight split over the data axis on its
  largest dim that divides, as the search splits it."""
  specs = []
  for x in layout.storage_shapes(params)["stages"]:
    dims = x.shape[3:]
    free = [d for d in range(len(dims)) if dims[d] % data == 0]
    entries = [None] * len(dims)
    if free:
      entries[max(free, key=lambda d: dims[d])] = "data"
    specs.append(P("stage", None, None, *entries))
  return specs


def _fsdp_train(kind, stages, repeats, micro, data, once, steps=3, lr=0.1):
  """Three SGD steps of the pipeline with FSDP inside its stages, loss and gradients held
  against one device's at every step; the compiled module's text."""
  ex, params, batch = _inputs(kind)
  layout = pipeline.stage_layout(ex.loss_fn, ex.params, ex.batch, stages, repeats, micro)
  layout = dataclasses.replace(layout, gather_once=once)
  mesh = Mesh(np.array(jax.devices()[: stages * data]).reshape(stages, data), ("stage", "data"))
  stage_specs = _fsdp_specs(layout, params, data)
  loss_fn = pipeline.pipelined_loss(
    ex.loss_fn, ex.params, ex.batch, layout, mesh, stage_specs=stage_specs
  )
  specs = {"stages": stage_specs, "rest": [P()] * len(layout.rest)}
  named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  # Jitted whole: eagerly, each op on the sharded leaves would compile on its own.
  storage = jax.jit(layout.to_storage, out_shardings=named)(params)
  from_storage = jax.jit(lambda g: layout.from_storage(g, jax.tree.structure(params)))
  rows = jax.device_put(batch, NamedSharding(mesh, P(("data", "stage"))))
  step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, named))
  compiled = step.lower(storage, rows).compile()
  reference = jax.jit(jax.value_and_grad(ex.loss_fn))
  sgd = jax.jit(lambda p, g: jax.tree.map(lambda x, y: x - lr * y, p, g))
  for _ in range(steps):
    loss, grads = compiled(storage, rows)
    want_loss, want_grads = reference(params, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    _close(from_storage(grads), want_grads)
    storage, params = sgd(storage, grads), sgd(params, want_grads)
  return compiled.as_text()


def _gathers_in_loops(text) -> tuple[int, int]:
  """(all-gathers inside loops, all-gathers outside) of a compiled module."""
  module = hlo.parse_hlo(text)
  runs, _, _ = hlo.multiplicities(module)
  ops = [
    runs[i.computation] > 1
    for body in module.computations.values()
    for i in body
    if i.opcode in ("all-gather", "all-gather-start")
  ]
  return sum(ops), len(ops) - sum(ops)


@pytest.mark.slow
def test_fsdp_in_stages_gathers_each_iteration_like_one_device():
  """GPipe, 2 stages x 2 data: the backward pass's iterations gather the chunk's weights."""
  text = _fsdp_train("scan2", 2, 1, 2, 2, once=False)
  inside, _ = _gathers_in_loops(text)
  assert inside >= 12  # the scan GPT's 12 weight leaves per layer


@pytest.mark.slow
def test_fsdp_in_circular_stages_gathers_each_iteration_like_one_device():
  """Circular: the forward pass's iterations gather their repeat's chunk too."""
  text = _fsdp_train("scan", 2, 2, 2, 2, once=False)
  inside, _ = _gathers_in_loops(text)
  assert inside >= 24


@pytest.mark.slow
def test_fsdp_gathered_once_gathers_outside_the_loops():
  """MaxText's pipeline_fsdp_ag_once, GPipe on an NNX list of blocks: the weights gathered
  before the loops, not in them."""
  text = _fsdp_train("nnx", 2, 1, 2, 2, once=True)
  inside, outside = _gathers_in_loops(text)
  assert inside == 0 and outside >= 12


@pytest.mark.slow
def test_fsdp_pipeline_plan_trains_like_one_device_and_exports(monkeypatch):
  """A planned pipeline with FSDP stages (the search held to that storage): its specs, step,
  explanation, plan file and MaxText config."""
  from wapar_jax._src.search import pipeline as priced

  monkeypatch.setattr(priced, "PIPELINE_STORAGES", frozenset({"fsdp"}))
  ex, params, batch = _inputs("scan", batch_size=16)
  tx = optax.adamw(1e-2)
  plan = wap.plan(
    ex.loss_fn, ex.params, ex.batch, optimizer=tx, devices=4, profile="titanxp-pcie", stages=2
  )
  assert plan.strategy == "fsdp+pp" and plan.mesh_shape == {"stage": 2, "data": 2}
  stored, rows = plan.shard(params), plan.shard_batch(batch)
  assert any("data" in str(x.sharding.spec) for x in stored["stages"])
  opt, step = plan.init_opt_state(stored), plan.train_step()
  want_p, want_o = params, tx.init(params)

  @jax.jit
  def reference(p, o, b):
    loss, grads = jax.value_and_grad(ex.loss_fn)(p, b)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  for _ in range(3):
    stored, opt, loss = step(stored, opt, rows)
    want_p, want_o, want_loss = reference(want_p, want_o, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(plan.user_params(stored)), jax.tree.leaves(want_p)):
    np.testing.assert_allclose(g, w, atol=1e-3)
  assert "each iteration gathers its chunk's" in plan.explain()
  assert "gather_once" not in plan.to_json()  # a searched plan's file is as before
  import yaml

  config = yaml.safe_load(plan.to_maxtext_yaml())
  assert config["mesh_axes"] == ["stage", "fsdp"] and config["ici_fsdp_parallelism"] == 2
  assert config["ici_data_parallelism"] * config["dcn_data_parallelism"] == 1
  assert config["pipeline_fsdp_ag_once"] is False
  once = dataclasses.replace(plan, pipeline=dataclasses.replace(plan.pipeline, gather_once=True))
  again = wap.Plan.from_json(once.to_json())
  assert again.pipeline.gather_once and "gathered once" in again.explain()
  assert yaml.safe_load(again.to_maxtext_yaml())["pipeline_fsdp_ag_once"] is True


@pytest.mark.slow
def test_storage_round_trip_and_circular_chunks():
  ex, params, _ = _inputs("linen")
  layout = pipeline.stage_layout(ex.loss_fn, ex.params, ex.batch, 2, 2, 2)
  assert [layout.chunk_layers(s) for s in range(2)] == [[[0], [2]], [[1], [3]]]
  storage = layout.to_storage(params)
  assert all(x.shape[:3] == (2, 2, 1) for x in storage["stages"])
  back = layout.from_storage(storage, jax.tree.structure(params))
  _close(back, params, rtol=0)
  # Stage 1, repeat 0 holds layer 1: block_1's query kernel.
  query = next(
    i for i, p in enumerate(layout.layer_params) if p[1] == _leaf_index(params, "block_1", "query")
  )
  np.testing.assert_array_equal(
    storage["stages"][query][1, 0, 0], params["block_1"]["query"]["kernel"]
  )


def _leaf_index(params, block, module):
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return paths.index(f"['{block}']['{module}']['kernel']")


def test_stage_layout_refuses_what_a_pipeline_cannot_cut():
  ex, _, _ = _inputs("scan")
  with pytest.raises(errors.InvalidArgumentError, match="do not split into 3 stages"):
    pipeline.stage_layout(ex.loss_fn, ex.params, ex.batch, 3)
  with pytest.raises(errors.InvalidArgumentError, match="at least as many micro-batches"):
    pipeline.stage_layout(ex.loss_fn, ex.params, ex.batch, 2, 2, 1)
  mlp = examples.get_example("mlp")
  with pytest.raises(errors.InvalidArgumentError, match="stack of identical layers"):
    pipeline.stage_layout(mlp.loss_fn, mlp.params, mlp.batch, 2)


@pytest.mark.slow
def test_the_loss_without_its_layers_passes_the_carry_on():
  ex, params, batch = _inputs("linen")
  rest_loss, stack, rest = layers.without_stack(ex.loss_fn, ex.params, ex.batch)
  assert stack.length == 4 and not stack.stacked
  leaves = jax.tree.leaves(params)
  # GPT without blocks: embeddings, final norm, tied head.
  model = _gpt._GPT(_gpt.GPTConfig(0, 64, 4, 256, 32))
  no_blocks = {k: v for k, v in params.items() if not k.startswith("block_")}
  got = rest_loss([leaves[k] for k in rest], batch)
  want = class_loss(model.apply({"params": no_blocks}, batch["inputs"]), batch["targets"])
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_pipeline_plan_trains_like_one_device_and_saves():
  ex, params, batch = _inputs("scan", batch_size=16)
  tx = optax.adamw(1e-2)
  plan = wap.plan(
    ex.loss_fn, ex.params, ex.batch, optimizer=tx, devices=8, profile="titanxp-pcie", strategy="pp"
  )
  c = plan.chosen
  assert c.stages > 1 and plan.mesh_shape["stage"] == c.stages and plan.pipeline.stages == c.stages
  assert c.strategy.endswith("pp")
  stored, opt, rows = plan.shard(params), None, plan.shard_batch(batch)
  opt = plan.init_opt_state(stored)
  step = plan.train_step()
  want_p, want_o = params, tx.init(params)

  @jax.jit
  def reference(p, o, b):
    loss, grads = jax.value_and_grad(ex.loss_fn)(p, b)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  for _ in range(3):
    stored, opt, loss = step(stored, opt, rows)
    want_p, want_o, want_loss = reference(want_p, want_o, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  # Adam turns a tiny gradient's float noise into a step near the learning rate (the trap in
  # DESIGN.md): parameters agree to a tenth of it.
  for g, w in zip(jax.tree.leaves(plan.user_params(stored)), jax.tree.leaves(want_p)):
    np.testing.assert_allclose(g, w, atol=1e-3)

  again = wap.Plan.from_json(plan.to_json())
  assert again.pipeline == plan.pipeline and again.chosen == plan.chosen
  text = plan.to_json().replace(f'"repeats": {plan.pipeline.repeats}', '"repeats": 3', 1)
  with pytest.raises(errors.CorruptPlanFileError, match="pipeline.repeats|chosen"):
    wap.Plan.from_json(text)


def test_pp_strategy_without_layers_is_a_named_error():
  ex = examples.get_example("mlp")
  with pytest.raises(errors.InvalidArgumentError, match="no pipeline plan"):
    wap.plan(ex.loss_fn, ex.params, ex.batch, optimizer=optax.sgd(0.1), devices=4, strategy="pp")


def test_bubble():
  assert pipeline.bubble(4, 1, 4) == pytest.approx(3 / 7)
  assert pipeline.bubble(8, 1, 32) == pytest.approx(7 / 39)


@pytest.mark.slow
def test_explain_and_maxtext_know_the_stage_axis():
  ex, _, _ = _inputs("linen", batch_size=16)
  plan = wap.plan(
    ex.loss_fn,
    ex.params,
    ex.batch,
    optimizer=optax.sgd(0.1),
    devices=4,
    profile="titanxp-pcie",
    strategy="pp",
  )
  text = plan.explain()
  assert "pipeline" in text and "bubble" in text
  for s in range(plan.pipeline.stages):
    assert any(line.strip().startswith(str(s)) for line in text.splitlines())
  import yaml

  config = yaml.safe_load(plan.to_maxtext_yaml())
  assert "stage" in config["mesh_axes"]
  stages = config["ici_pipeline_parallelism"] * config["dcn_pipeline_parallelism"]
  assert stages == plan.pipeline.stages
  assert config["num_pipeline_microbatches"] == plan.pipeline.microbatches
  assert config["num_pipeline_repeats"] == plan.pipeline.repeats


@pytest.mark.slow
def test_stages_fixes_or_forbids_the_pipeline():
  ex, _, _ = _inputs("scan", batch_size=16)
  kw = dict(optimizer=optax.sgd(0.1), devices=8, profile="titanxp-pcie")
  assert wap.plan(ex.loss_fn, ex.params, ex.batch, stages=4, **kw).chosen.stages == 4
  none = wap.plan(ex.loss_fn, ex.params, ex.batch, stages=1, **kw)
  assert none.pipeline is None and all(c.stages == 1 for c in none.candidates)
  with pytest.raises(errors.InvalidArgumentError, match="stages must be"):
    wap.plan(ex.loss_fn, ex.params, ex.batch, stages=0, **kw)
  with pytest.raises(errors.InvalidArgumentError, match="no pipeline plan"):
    wap.plan(ex.loss_fn, ex.params, ex.batch, stages=3, **kw)
  # Every device: the stages stand on plans for fewer devices, which all_devices leaves out.
  every = wap.plan(ex.loss_fn, ex.params, ex.batch, strategy="pp", all_devices=True, **kw)
  assert every.num_devices == 8 and every.chosen.stages > 1


def test_a_pipeline_must_win_by_the_margin_its_model_can_tell():
  from wapar_jax._src.planner.pipelines import PIPELINE_MARGIN, ranked_with_margin
  from wapar_jax._src.search import Candidate

  def cand(step, stages, fits=True):
    return Candidate(
      devices=4,
      data=4 // stages,
      model=1,
      model_groups=(),
      storage="replicated",
      strategy="x",
      step_time=step,
      compute_time=step,
      comm_time=0.0,
      flops=0.0,
      comm_bytes=0.0,
      peak_memory=1.0,
      energy=step,
      fits=fits,
      stages=stages,
    )

  flat, close, far = cand(1.0, 1), cand(1 / (1 + PIPELINE_MARGIN / 2), 2), cand(0.5, 2)
  assert ranked_with_margin([flat, close], "time", False)[0] is flat
  assert ranked_with_margin([flat, close], "time", True)[0] is close
  assert ranked_with_margin([flat, far], "time", False)[0] is far
  unfit = cand(1.0, 1, fits=False)
  assert ranked_with_margin([unfit, close], "time", False)[0] is close
