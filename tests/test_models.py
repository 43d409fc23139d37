"""The UNet and DSNO share one backbone; zeroed TimeConvs give the teacher; PD's parameter names."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dsno_jax import diffusion, models
from param_utils import assert_trees_close, random_params

B = 2


def teacher_params(config, seed=0):
  """Random (not initialiser) values, so that zero-initialised layers are not identities."""
  return random_params(models.param_shapes(models.init_teacher, config), seed)


def student_params(config, seed=1):
  return random_params(models.param_shapes(models.init_student, config), seed)


def perturbed(params, seed, scale=0.05):
  return jax.tree_util.tree_map(lambda p, q: p + q, params,
                                random_params(params, seed, scale))


def zero_time_convs(params):
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {p: (jnp.zeros_like(v) if models.build.is_time_conv_path(p) else v)
       for p, v in flat.items()})


def jit_apply(model, train=False, **kw):
  """model.apply(variables, *args) jitted once per model (eager CPU execution is slow)."""
  return jax.jit(lambda variables, *args: model.apply(variables, *args, train=train, **kw))


def make_config(conditional=True, resblock_resample=False, mean_type="x"):
  config = tiny.get_config()
  config.data.num_classes = 10 if conditional else 1
  config.model.resblock_resample = resblock_resample
  config.teacher.mean_type = mean_type
  return config


@pytest.fixture(scope="module", params=[(True, False), (False, True)],
                ids=["conditional-conv_resample", "unconditional-resblock_resample"])
def setup(request):
  conditional, resample = request.param
  config = make_config(conditional, resample)
  tparams = teacher_params(config)
  sparams = models.student_params_from_teacher(tparams, student_params(config), "x")
  key = jax.random.PRNGKey(3)
  noise = jax.random.normal(key, (B, 8, 8, 1))
  labels = jnp.array([3, 7]) if conditional else None
  logsnr = diffusion.save_logsnrs(config)
  return config, tparams, sparams, noise, labels, jnp.asarray(logsnr)


def test_zeroed_time_convs_give_the_teacher_at_every_time(setup):
  config, teacher_params, student_params, noise, labels, logsnr = setup
  k = logsnr.shape[0]
  student = jit_apply(models.student_from_config(config))
  out = student({"params": zero_time_convs(student_params)}, noise, logsnr, labels)
  assert out.shape == (B, k, 8, 8, 1)
  # the teacher once on the K*B frames: frame i*B + b is noise b at logsnr i
  teacher = jit_apply(models.teacher_from_config(config))
  tiled = lambda a: None if a is None else jnp.concatenate([a] * k)
  want = teacher({"params": teacher_params}, tiled(noise), jnp.repeat(logsnr, B), tiled(labels))
  for i in range(k):
    np.testing.assert_allclose(out[:, i], want[i * B:(i + 1) * B], atol=1e-5, rtol=1e-5)
  # the comparison means something: the teacher's outputs differ across times
  assert float(jnp.abs(out[:, 0] - out[:, -1]).max()) > 1e-3
  # and non-zero TimeConvs do change the output
  moved = student({"params": perturbed(student_params, 9, 1.0)},
                   noise, logsnr, labels)
  assert float(jnp.abs(moved - out).max()) > 1e-3


def test_teacher_paths_are_in_the_student_and_extras_are_time_convs(setup):
  config, teacher_params, student_params, *_ = setup
  t = flax.traverse_util.flatten_dict(teacher_params)
  s = flax.traverse_util.flatten_dict(student_params)
  for path, value in t.items():
    assert path in s, path
    assert s[path].shape == value.shape, path
  extra = sorted({p[0] for p in s if p not in t})
  levels = len(config.model.ch_mult)
  nb = config.model.num_res_blocks
  want = ([f"down_{i}.time_conv_{j}" for i in range(levels) for j in range(nb)]
          + ["mid.time_conv"]
          + [f"up_{i}.time_conv_{j}" for i in range(levels) for j in range(nb + 1)])
  assert extra == sorted(want)
  for name in want:
    assert set(student_params[name]) == {"weight_real", "weight_imag"}


def test_pd_parameter_names_and_shapes():
  """The Progressive-Distillation layout: names and shapes of a conditional teacher."""
  config = make_config(conditional=True)
  shapes = models.param_shapes(models.init_teacher, config)
  flat = {"/".join(p): v.shape for p, v in flax.traverse_util.flatten_dict(shapes).items()}
  ch, emb = config.model.ch, config.model.emb_ch
  assert flat["dense0/kernel"] == (ch, emb)
  assert flat["dense1/kernel"] == (emb, emb)
  assert flat["class_emb/kernel"] == (10, emb)
  assert flat["conv_in/kernel"] == (3, 3, 1, ch)
  assert flat["down_0.block_0/norm1/scale"] == (ch,)
  assert flat["down_0.block_0/temb_proj/kernel"] == (emb, 2 * ch)
  assert flat["down_0.downsample/kernel"] == (3, 3, ch, ch)
  assert flat["down_1.block_0/nin_shortcut/kernel"] == (ch, 2 * ch)
  assert flat["down_1.attn_0/q/kernel"] == (2 * ch, 1, 2 * ch)
  assert flat["down_1.attn_0/proj_out/kernel"] == (1, 2 * ch, 2 * ch)
  assert flat["mid.attn_1/norm/bias"] == (2 * ch,)
  assert flat["up_1.block_0/conv1/kernel"] == (3, 3, 4 * ch, 2 * ch)
  assert flat["up_1.upsample/kernel"] == (3, 3, 2 * ch, 2 * ch)
  assert flat["up_0.block_1/conv2/kernel"] == (3, 3, ch, ch)
  assert flat["norm_out/scale"] == (ch,)
  assert flat["conv_out/kernel"] == (3, 3, ch, 1)
  assert "up_0.upsample/kernel" not in flat and "down_1.downsample/kernel" not in flat


def test_both_teacher_initialises_the_student_with_the_x_half():
  config = make_config(conditional=False, mean_type="both")
  tparams = teacher_params(config)
  assert tparams["conv_out"]["kernel"].shape[-1] == 2
  fresh = student_params(config)
  sparams = models.student_params_from_teacher(tparams, fresh, "both")
  np.testing.assert_array_equal(sparams["mid.time_conv"]["weight_real"],
                                fresh["mid.time_conv"]["weight_real"])  # TimeConvs kept
  np.testing.assert_array_equal(sparams["conv_out"]["kernel"], tparams["conv_out"]["kernel"][..., :1])
  np.testing.assert_array_equal(sparams["conv_out"]["bias"], tparams["conv_out"]["bias"][:1])
  np.testing.assert_array_equal(sparams["dense0"]["kernel"], tparams["dense0"]["kernel"])


@pytest.mark.parametrize("mean_type", ["eps", "v"])
def test_student_from_an_eps_or_v_teacher_is_refused_naming_the_options(mean_type):
  """Their conv_out is no x-hat (x-hat needs z_t, which the student never sees): no copy."""
  config = make_config(conditional=False, mean_type=mean_type)
  with pytest.raises(ValueError, match=rf"(?s)teacher.mean_type='{mean_type}'.*"
                     r"train.init_from_teacher=False.*\('x', 'both'\)"):
    models.student_params_from_teacher(teacher_params(config), student_params(config),
                                       mean_type)


def test_student_from_a_teacher_of_another_config_is_refused():
  small = teacher_params(make_config())
  config = make_config()
  config.model.ch = 64
  with pytest.raises(ValueError, match=r"wrongly shaped: \['conv_in/bias: [^']*\(32,\), "
                     r"expected \(64,\)'"):
    models.student_params_from_teacher(small, student_params(config), "x")


def test_student_from_a_teacher_with_missing_or_extra_entries_is_refused():
  """All or nothing: every missing and unexpected entry is named; TimeConvs are not missing."""
  config = make_config()
  teacher = flax.traverse_util.flatten_dict(teacher_params(config))
  del teacher[("dense0", "bias")]
  teacher[("extra", "kernel")] = np.zeros((2,), np.float32)
  with pytest.raises(ValueError) as raised:
    models.student_params_from_teacher(flax.traverse_util.unflatten_dict(teacher),
                                       student_params(config), "x")
  message = str(raised.value)
  assert "missing: ['dense0/bias']" in message
  assert "unexpected: ['extra/kernel']" in message
  assert "wrongly shaped: []" in message and "time_conv" not in message


def test_bfloat16_compute_is_finite_and_close(setup):
  config, _, student_params, noise, labels, logsnr = setup
  student_params = perturbed(student_params, 5, 0.02)
  f32 = jit_apply(models.student_from_config(config))({"params": student_params}, noise, logsnr,
                                                     labels)
  config.model.dtype = "bfloat16"
  bf16 = jit_apply(models.student_from_config(config))({"params": student_params}, noise,
                                                      logsnr, labels)
  config.model.dtype = "float32"
  assert bool(jnp.all(jnp.isfinite(bf16)))
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert rel < 2e-2, rel


def test_remat_gives_the_same_outputs_and_gradients(setup):
  """nn.remat recomputes blocks in the backward pass: same numbers, fewer saved activations."""
  config, _, student_params, noise, labels, logsnr = setup
  student_params = perturbed(student_params, 6, 0.02)

  def loss_and_grad(remat):
    config.model.remat = remat
    model = models.student_from_config(config)
    config.model.remat = False
    loss = lambda p: jnp.mean(model.apply({"params": p}, noise, logsnr, labels, train=False) ** 2)
    return jax.jit(jax.value_and_grad(loss))(student_params), model

  (plain_loss, plain_grad), _ = loss_and_grad(False)
  (remat_loss, remat_grad), model = loss_and_grad(True)
  assert model.remat
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5)
  assert_trees_close(remat_grad, plain_grad, rtol=1e-4)
  assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(plain_grad)) > 0


def test_dropout_is_active_only_in_training():
  config = make_config()
  config.model.dropout = 0.5
  model = models.teacher_from_config(config)
  params = teacher_params(config)
  x, y, lam = jnp.ones((1, 8, 8, 1)), jnp.array([1]), jnp.zeros((1,))
  train = jax.jit(lambda p, r: model.apply({"params": p}, x, lam, y, train=True,
                                           rngs={"dropout": r}))
  evaluate = jit_apply(model)
  a, b = train(params, jax.random.PRNGKey(1)), train(params, jax.random.PRNGKey(2))
  c, d = evaluate({"params": params}, x, lam, y), evaluate({"params": params}, x, lam, y)
  assert float(jnp.abs(a - b).max()) > 1e-4
  np.testing.assert_array_equal(c, d)


@pytest.fixture(scope="module")
def shape_params():
  config = make_config()
  return (config, models.param_shapes(models.init_teacher, config),
          models.param_shapes(models.init_student, config))


@pytest.mark.parametrize("case, match", [
    ("rank", r"shape \(8, 8, 1\); expected rank 4"),
    ("non_square", r"8x4 pixels; expected a square image"),
    ("size", r"16x16 pixels; expected 8x8"),
    ("logsnr_len", r"logsnr has shape \(3,\); expected \(4,\)"),
    ("labels_missing", r"labels missing: the model is conditional on 10 classes"),
    ("labels_shape", r"labels have shape \(3,\); expected \(2,\)"),
])
def test_student_bad_input_raises_value_error(shape_params, case, match):
  config, _, sparams = shape_params
  student = models.student_from_config(config)
  x, y, lam = jnp.zeros((2, 8, 8, 1)), jnp.array([1, 2]), jnp.zeros((4,))
  args = {"rank": (x[0], lam, y), "non_square": (x[:, :, :4], lam, y),
          "size": (jnp.zeros((2, 16, 16, 1)), lam, y), "logsnr_len": (x, lam[:3], y),
          "labels_missing": (x, lam, None), "labels_shape": (x, lam, jnp.array([1, 2, 3]))}[case]
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda p: student.apply({"params": p}, *args, train=False), sparams)


def test_teacher_bad_input_raises_value_error(shape_params):
  config, tparams, _ = shape_params
  teacher = models.teacher_from_config(config)
  x = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match=r"logsnr has shape \(3,\); expected \(2,\)"):
    jax.eval_shape(lambda p: teacher.apply({"params": p}, x, jnp.zeros(3), jnp.array([1, 2]),
                                           train=False), tparams)
  unconditional = make_config(conditional=False)
  with pytest.raises(ValueError, match=r"labels given to an unconditional model"):
    models.teacher_from_config(unconditional).init(jax.random.PRNGKey(0), x, jnp.zeros(2),
                                                   jnp.array([1, 2]), train=False)


def test_image_size_that_levels_cannot_halve():
  config = make_config()
  config.model.ch_mult = (1, 1, 1)
  config.data.image_size = 6
  with pytest.raises(ValueError, match=r"image.size\W*6 cannot be halved 2 times"):
    models.param_shapes(models.init_teacher, config)


def test_overview_prints_both_tables_and_totals(shape_params):
  from dsno_jax.models.__main__ import overview
  config, tshapes, sshapes = shape_params
  text = overview(config, max_lines=5)
  assert f"teacher parameters: {models.count_params(tshapes):,}" in text
  assert f"student parameters: {models.count_params(sshapes):,}" in text
  assert "== teacher ==" in text and "== student ==" in text
